"""Explanation targets: (feature, sentence) pairs mined from review text.

P5 took its explanation targets from a phrase-level sentiment tool (Sentires) that we do not have. This module
replaces it with a documented, deterministic heuristic, swappable through :data:`EXTRACTORS`:

``feature-opinion`` (default, :class:`FeatureOpinionExtractor`)
  1. *Feature vocabulary*, mined from the corpus itself. Without a part-of-speech tagger we cannot pick nouns,
     so a candidate feature is a lowercase unigram or bigram of alphabetic words of length >= 3 that are neither
     stopwords (:data:`STOPWORDS`) nor opinion words (:data:`OPINION_WORDS`), occurring in a sentence together
     with an opinion word. Candidates found in at least ``min_df`` reviews are ranked by how many such sentences
     they occur in (ties alphabetically) and the top ``top_n`` kept.
  2. *Extraction*: each review is split into sentences; the first sentence of 4-30 words holding a feature and an
     opinion word is the explanation, its best-ranked (most frequent) feature the feature. Whitespace is
     collapsed. Reviews without such a sentence give None.

An extractor is a class with ``fit(reviews) -> self`` and ``extract(reviews) -> list[(feature, sentence) | None]``;
register another with ``@EXTRACTORS.register("name")``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from p5rec.registry import Registry

EXTRACTORS: Registry[type] = Registry("explanation extractor")

# Small built-in opinion lexicon: common evaluative adjectives/adverbs in product reviews.
POSITIVE = """
good great nice excellent awesome amazing perfect fantastic wonderful superb solid sturdy durable reliable
comfortable easy smooth clear crisp warm rich bright fine decent impressive outstanding beautiful lovely gorgeous
pleasant handy useful versatile quality affordable inexpensive cheap sweet cool fun fast quick accurate
accurately loud strong stable tight responsive convenient simple compact lightweight light sleek elegant
favorite best better love loved happy pleased satisfied recommend recommended worth fabulous terrific brilliant
incredible superior quiet soft gentle effective secure
""".split()
NEGATIVE = """
bad poor terrible awful horrible cheap flimsy fragile weak noisy harsh muddy dull thin broken broke defective
useless disappointing disappointed worst worse uncomfortable difficult hard loose wobbly annoying expensive
overpriced faulty junk crappy mediocre inferior unreliable inaccurate slow heavy bulky ugly sharp rough sticky
tinny buzzy unstable unusable problematic lousy pricey
""".split()
OPINION_WORDS: frozenset[str] = frozenset(POSITIVE) | frozenset(NEGATIVE)

STOPWORDS: frozenset[str] = frozenset("""
a about above after again against all almost also although always am among an and another any anyone anything
are aren't around as at away back be because been before being below between both but by can can't cannot could
couldn't did didn't do does doesn't doing don't done down during each either else enough even ever every
everything few first for from further get gets getting got gotten had hadn't has hasn't have haven't having he
her here hers herself him himself his how however i i'd i'll i'm i've if in into is isn't it it's its itself
just keep kind know last least less let like likely little lot lots made make makes making many may maybe me
might mine more most much must my myself need needed needs never new next no nor not nothing now of off often
old on once one ones only or other others otherwise our ours ourselves out over own pretty probably put quite
rather really right said same say says see seem seems seemed several she should shouldn't since so some
something sometimes still such sure take taken than that that's the their theirs them themselves then there
there's these they they're thing things think this those though through thus time times to too took two under
until up upon us use used uses using very want wanted wants was wasn't way ways we well went were weren't what
when where whether which while who whom whose why will with within without won't would wouldn't yet you you're
your yours yourself yes also bought buy buying purchase purchased order ordered item product products amazon
give gave going goes go come comes came look looks looked looking work works worked working does year years
day days bit far around anyway overall actually definitely highly absolutely exactly simply especially
extremely fairly totally completely enough already instead though three four five star stars review reviews
money got thing things stuff able put try tried trying seller back sure find found
small smaller large big long longer short high higher low lower different full real true extra super easily
easier quickly slightly perfectly nicely thought expect expected couple point etc turn add fact gives part
compared plus prefer hear stay close idea tell choice wrong spend basic free open reason help pay decided
opinion cheaper unless included takes amount regular state together inside seen spot believe touch drop plenty
someone update wish half medium flat read people problem problems issue issues place side
""".split())

_SENTENCE = re.compile(r"(?<=[.!?])\s+|(?<=[a-z][.!?])(?=[A-Z])|\s*[\r\n]+\s*")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_SPACES = re.compile(r"\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of a review: split after . ! ? followed by a space or (typo "nice.The") a capital, and at line
    breaks."""
    return [s for s in _SENTENCE.split(text.strip()) if s]


def _content(word: str) -> bool:
    return len(word) >= 3 and word.isalpha() and word not in STOPWORDS and word not in OPINION_WORDS


def _candidates(words: list[str]) -> set[str]:
    ok = [_content(w) for w in words]
    cands = {w for w, o in zip(words, ok) if o}
    cands.update(f"{a} {b}" for a, b, oa, ob in zip(words, words[1:], ok, ok[1:]) if oa and ob)
    return cands


@EXTRACTORS.register("feature-opinion")
class FeatureOpinionExtractor:
    """See the module docstring. ``fit`` mines the feature vocabulary; ``extract`` picks one sentence per review."""

    def __init__(self, top_n: int = 300, min_df: int = 5, min_words: int = 4, max_words: int = 30) -> None:
        self.top_n, self.min_df, self.min_words, self.max_words = top_n, min_df, min_words, max_words
        self.features: dict[str, int] = {}  # feature -> rank (0 = most frequent)

    def fit(self, reviews: Sequence[str]) -> "FeatureOpinionExtractor":
        count: Counter[str] = Counter()
        df: Counter[str] = Counter()
        for text in reviews:
            seen: set[str] = set()
            for sent in split_sentences(text.lower()):
                words = _WORD.findall(sent)
                if OPINION_WORDS.isdisjoint(words):
                    continue
                cands = _candidates(words)
                count.update(cands)
                seen |= cands
            df.update(seen)
        kept = [f for f in count if df[f] >= self.min_df]
        kept.sort(key=lambda f: (-count[f], f))
        self.features = {f: r for r, f in enumerate(kept[: self.top_n])}
        return self

    def extract_one(self, text: str) -> tuple[str, str] | None:
        for sent in split_sentences(text):
            words = _WORD.findall(sent.lower())
            if not (self.min_words <= len(words) <= self.max_words) or OPINION_WORDS.isdisjoint(words):
                continue
            found = [c for c in _candidates(words) if c in self.features]
            if not found:
                continue
            # the corpus' most frequent feature in the sentence (bigrams rank where their counts put them)
            feature = min(found, key=self.features.__getitem__)
            return feature, _SPACES.sub(" ", sent).strip()
        return None

    def extract(self, reviews: Sequence[str]) -> list[tuple[str, str] | None]:
        if not self.features:
            raise RuntimeError("call fit() first (the feature vocabulary is empty)")
        return [self.extract_one(t) for t in reviews]


def extract(reviews: Sequence[str], name: str = "feature-opinion", **kwargs) -> list[tuple[str, str] | None]:
    """Fit extractor ``name`` on ``reviews`` and extract one (feature, sentence) per review (None if none)."""
    extractor = EXTRACTORS.get(name)(**kwargs).fit(reviews)
    if not extractor.features:
        return [None] * len(reviews)
    return extractor.extract(reviews)


def coverage(pairs: Sequence[tuple[str, str] | None]) -> float:
    """Fraction of reviews that got an explanation (0.0 for no reviews)."""
    return sum(p is not None for p in pairs) / len(pairs) if pairs else 0.0
