"""Evaluation metrics, one function per metric name; nothing is downloaded (no hub metric scripts).

Every metric is registered explicitly in :data:`METRICS` with its kind, direction and inputs (RecBole-style
metadata, peft-style explicit registration: a duplicate name raises at import). The functions are pure and
work on plain Python / numpy inputs, so the model's evaluation and the baselines are scored by the same code.

Protocols and conventions (each documented where it is implemented):

* Ranking (sequential, direct): single-target leave-one-out. A user's rank is the 0-based position of the
  one held-out target in that user's ranked list, ``inf`` when absent. ``HR@K``, ``NDCG@K``, ``MAP@K``, ``MRR``
  are means over users. Ties in a score matrix are broken *pessimistically* (see :func:`rank_from_scores`).
* Rating: model outputs are text; :func:`parse_rating` takes a leading number only. Unparseable outputs are
  never dropped silently: they are scored as a fallback value and counted (see :func:`rating_metrics`).
* Text: computed by the libraries behind published numbers. Corpus BLEU by ``sacrebleu`` in P5's convention
  (Google/TensorFlow-NMT ``compute_bleu``: no smoothing, lowercased whitespace tokens, shortest-reference
  brevity penalty, x100) and ROUGE-1/2/L F-measure by ``rouge_score`` (no stemming, x100, mean over examples).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

import numpy as np
from rouge_score import tokenize as rouge_tokenizer
from sacrebleu.metrics import BLEU

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "MetricSpec",
    "accuracy",
    "bleu",
    "distinct_n",
    "hit_ratio",
    "lookup",
    "map_at_k",
    "mrr",
    "ndcg",
    "parse_rating",
    "rank_from_scores",
    "rank_of_target",
    "ranking_metrics",
    "ranking_metrics_from_ranks",
    "rating_metrics",
    "register",
    "rouge",
    "rouge_tokenize",
    "text_metrics",
]

MetricKind = Literal["ranking", "value", "text", "accuracy"]

# ---------------------------------------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------------------------------------


def rank_of_target(ranked: Sequence[Sequence[str]] | np.ndarray, targets: Sequence[str] | np.ndarray) -> np.ndarray:
    """0-based rank of each user's target in that user's ranked list.

    Args:
        ranked: one ranked list per user (best first); lists may have different lengths. Or a 2-D array
            ``[n_users, n_ranked]`` of item ids (ints or strings), compared to ``targets`` elementwise.
        targets: the one held-out item per user, same id type as ``ranked``.

    Returns:
        float array ``[n_users]``: the position of the *first* occurrence of the target, ``np.inf`` when the
        target is absent. Duplicates in a list are not removed here (a model that repeats an item wastes a
        slot, as in P5's beam evaluation); dedupe before calling if the protocol wants it.

    Raises:
        ValueError: if the numbers of lists and targets differ.
    """
    if len(ranked) != len(targets):
        raise ValueError(f"rank_of_target: {len(ranked)} ranked lists but {len(targets)} targets")
    if isinstance(ranked, np.ndarray):
        if ranked.ndim != 2:
            raise ValueError(f"rank_of_target: ranked array must be 2-D, got shape {ranked.shape}")
        hit = ranked == np.asarray(targets)[:, None]
        ranks = np.full(len(targets), np.inf)
        found = hit.any(axis=1)
        ranks[found] = hit[found].argmax(axis=1)
        return ranks
    ranks = np.full(len(targets), np.inf)
    for u, (row, target) in enumerate(zip(ranked, targets)):
        row = list(row)
        if target in row:
            ranks[u] = row.index(target)
    return ranks


def rank_from_scores(
    scores: np.ndarray,
    target_index: np.ndarray | Sequence[int],
    ties: Literal["pessimistic", "optimistic"] = "pessimistic",
) -> np.ndarray:
    """0-based rank of each user's target among that user's scored candidates (higher score = better).

    Ties policy: ``"pessimistic"`` (default, the honest choice) ranks every other candidate whose score
    *equals* the target's above the target, so a model that gives every candidate the same score gets the
    worst rank, not the best. ``"optimistic"`` ranks them below (useful only to report the gap). NaN scores
    are treated as ``-inf`` (a NaN target therefore ties with the other NaN/-inf candidates).

    Args:
        scores: float array ``[n_users, n_candidates]``.
        target_index: int array ``[n_users]``, column of each user's target in ``scores``.

    Returns:
        float array ``[n_users]`` of 0-based ranks (finite; the target is always a candidate).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"rank_from_scores: scores must be 2-D, got shape {scores.shape}")
    target_index = np.asarray(target_index, dtype=np.int64)
    if target_index.shape != (scores.shape[0],):
        raise ValueError(f"rank_from_scores: target_index shape {target_index.shape} != ({scores.shape[0]},)")
    scores = np.where(np.isnan(scores), -np.inf, scores)
    target_score = scores[np.arange(scores.shape[0]), target_index][:, None]
    above = (scores > target_score).sum(axis=1)
    if ties == "optimistic":
        return above.astype(np.float64)
    if ties != "pessimistic":
        raise ValueError(f"rank_from_scores: unknown ties policy {ties!r}")
    tied_others = (scores == target_score).sum(axis=1) - 1  # minus the target itself
    return (above + tied_others).astype(np.float64)


def _check_ranks(ranks: np.ndarray | Sequence[float], k: int | None = None) -> np.ndarray:
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return ranks


def hit_ratio(ranks: np.ndarray | Sequence[float], k: int) -> float:
    """HR@K: fraction of users whose target is in the top ``k`` (rank < k)."""
    ranks = _check_ranks(ranks, k)
    return float(np.mean(ranks < k))


def ndcg(ranks: np.ndarray | Sequence[float], k: int) -> float:
    """NDCG@K for one relevant item per user: ``1/log2(rank+2)`` if rank < k else 0 (ideal DCG = 1), mean."""
    ranks = _check_ranks(ranks, k)
    inside = ranks < k
    gains = np.zeros_like(ranks)
    gains[inside] = 1.0 / np.log2(ranks[inside] + 2.0)
    return float(gains.mean())


def mrr(ranks: np.ndarray | Sequence[float]) -> float:
    """Mean reciprocal rank ``1/(rank+1)``, 0 for an absent target (rank inf), mean over users."""
    ranks = _check_ranks(ranks)
    return float(np.mean(1.0 / (ranks + 1.0)))


def map_at_k(ranks: np.ndarray | Sequence[float], k: int) -> float:
    """MAP@K for one relevant item per user: AP = ``1/(rank+1)`` if rank < k else 0, mean over users."""
    ranks = _check_ranks(ranks, k)
    inside = ranks < k
    ap = np.zeros_like(ranks)
    ap[inside] = 1.0 / (ranks[inside] + 1.0)
    return float(ap.mean())


def ranking_metrics_from_ranks(ranks: np.ndarray | Sequence[float], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``HR@K``, ``NDCG@K``, ``MAP@K`` for every K in ``ks`` plus ``MRR``, from 0-based ranks."""
    ranks = _check_ranks(ranks)
    out: dict[str, float] = {}
    for k in ks:
        out[f"HR@{k}"] = hit_ratio(ranks, k)
        out[f"NDCG@{k}"] = ndcg(ranks, k)
        out[f"MAP@{k}"] = map_at_k(ranks, k)
    out["MRR"] = mrr(ranks)
    return out


def ranking_metrics(
    ranked: Sequence[Sequence[str]] | np.ndarray,
    targets: Sequence[str] | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Leave-one-out ranking metrics: ``{"HR@1": .., "NDCG@1": .., "MAP@1": .., ..., "MRR": ..}``.

    ``ranked`` / ``targets`` as in :func:`rank_of_target`. A list shorter than K simply cannot hit beyond its
    length; ``MRR`` is over the whole list given (so it depends on the list length the caller produced).
    """
    return ranking_metrics_from_ranks(rank_of_target(ranked, targets), ks)


# ---------------------------------------------------------------------------------------------------------
# Rating
# ---------------------------------------------------------------------------------------------------------

_NUMBER_RE = re.compile(r"\s*([+-]?(?:\d+(?:\.\d+)?|\.\d+))(?!\.?\d)")
_WORD_RATINGS = {"zero": 0.0, "one": 1.0, "two": 2.0, "three": 3.0, "four": 4.0, "five": 5.0}
_WORD_RE = re.compile(r"\s*(" + "|".join(_WORD_RATINGS) + r")\b", re.IGNORECASE)


def parse_rating(text: str | float | int | None) -> float | None:
    """Parse a generated rating; ``None`` when it cannot be read.

    Policy: only a *leading* number is read, after leading whitespace: ``"5"``, ``"5.0"``, ``" 4.5 "``,
    ``"4 stars"``, ``"4/5"`` -> 5.0, 5.0, 4.5, 4.0, 4.0. Text after the number is ignored as long as the
    number is complete: ``"5.0.1"`` is rejected, not truncated; ``"4."`` reads 4.0. A leading English number word
    ``zero`` .. ``five`` (any case) is accepted as well. ``"nan"``, ``"inf"``, ``""``, ``"abc"``,
    ``"rating: 4"`` -> None (no ``eval``, no search inside the text). Numbers pass through unchanged unless
    they are NaN/inf (-> None). Clipping to the rating range is the caller's job (:func:`rating_metrics`).
    """
    if text is None:
        return None
    if isinstance(text, (int, float, np.integer, np.floating)) and not isinstance(text, bool):
        value = float(text)
        return value if math.isfinite(value) else None
    if not isinstance(text, str):
        return None
    match = _NUMBER_RE.match(text)
    if match:
        return float(match.group(1))
    match = _WORD_RE.match(text)
    if match:
        return _WORD_RATINGS[match.group(1).lower()]
    return None


def rating_metrics(
    preds: Sequence[str | float | None],
    targets: Sequence[float],
    lo: float = 1.0,
    hi: float = 5.0,
    fallback: float | None = None,
) -> dict[str, float]:
    """RMSE / MAE of predicted ratings against gold ratings.

    Policy for unreadable outputs (never dropped silently): every prediction goes through
    :func:`parse_rating`; the ones that give ``None`` are counted in ``invalid`` and scored as ``fallback``,
    which the caller should set to the *training* global mean (:func:`p5rec.eval.baselines.global_mean_rating`).
    If ``fallback`` is None the midpoint ``(lo+hi)/2`` is used (a warning is logged when it matters); the test
    targets are never used to fill in. Valid predictions are clipped to ``[lo, hi]``.

    Returns:
        ``RMSE``, ``MAE`` over all ``n`` examples (fallback included), ``RMSE_valid``, ``MAE_valid`` over the
        parseable ones only (NaN if none), ``n`` and ``invalid`` (counts, as floats-compatible ints).
    """
    if len(preds) != len(targets):
        raise ValueError(f"rating_metrics: {len(preds)} predictions but {len(targets)} targets")
    if len(preds) == 0:
        raise ValueError("rating_metrics: no examples")
    if lo > hi:
        raise ValueError(f"rating_metrics: lo={lo} > hi={hi}")
    gold = np.asarray([float(t) for t in targets], dtype=np.float64)
    if not np.all(np.isfinite(gold)):
        raise ValueError("rating_metrics: targets contain NaN/inf (implicit rows must not be scored here)")
    parsed = [parse_rating(p) for p in preds]
    valid = np.array([p is not None for p in parsed])
    n_invalid = int((~valid).sum())
    if fallback is None:
        fallback = (lo + hi) / 2.0
        if n_invalid:
            logger.warning("rating_metrics: %d invalid outputs scored as midpoint %.3f (no fallback given)",
                           n_invalid, fallback)
    pred = np.array([fallback if p is None else p for p in parsed], dtype=np.float64)
    pred = np.clip(pred, lo, hi)
    err = pred - gold
    out: dict[str, float] = {
        "RMSE": float(np.sqrt(np.mean(err**2))),
        "MAE": float(np.mean(np.abs(err))),
    }
    if valid.any():
        out["RMSE_valid"] = float(np.sqrt(np.mean(err[valid] ** 2)))
        out["MAE_valid"] = float(np.mean(np.abs(err[valid])))
    else:
        out["RMSE_valid"] = out["MAE_valid"] = float("nan")
    out["n"] = len(gold)
    out["invalid"] = n_invalid
    if n_invalid:
        logger.info("rating_metrics: %d of %d outputs unparseable, scored as %.3f", n_invalid, len(gold), fallback)
    return out


# ---------------------------------------------------------------------------------------------------------
# Accuracy (choice templates)
# ---------------------------------------------------------------------------------------------------------


def _normalise_choice(text: str) -> str:
    return " ".join(str(text).strip().lower().split())


def accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Exact-match accuracy after normalisation (strip, lowercase, collapse inner whitespace)."""
    if len(preds) != len(golds):
        raise ValueError(f"accuracy: {len(preds)} predictions but {len(golds)} golds")
    if len(preds) == 0:
        raise ValueError("accuracy: no examples")
    hits = [_normalise_choice(p) == _normalise_choice(g) for p, g in zip(preds, golds)]
    return float(np.mean(hits))


# ---------------------------------------------------------------------------------------------------------
# Text: BLEU (sacrebleu, in P5's compute_bleu convention) and ROUGE (rouge_score)
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def _bleu_metric(max_order: int) -> BLEU:
    # tokenize="none": sacrebleu then splits on whitespace only, so tokens are P5's text.lower().split();
    # force=True silences its warning about hypotheses ending in " ." (meant for detokenised MT output)
    return BLEU(lowercase=True, force=True, tokenize="none", smooth_method="none", max_ngram_order=max_order,
                effective_order=False)


def bleu(preds: Sequence[str], refs: Sequence[str | Sequence[str]], max_order: int = 4) -> float:
    """Corpus BLEU-``max_order`` x100, P5's convention, computed by ``sacrebleu``.

    P5 called ``compute_bleu(reference_corpus, translation_corpus, max_order, smooth=False)`` of the TensorFlow
    NMT / Google ``bleu.py``: clipped n-gram matches and possible n-grams summed over the corpus, uniform
    weights, geometric mean (0 if any order has no match), brevity penalty ``exp(1 - ref_len/hyp_len)`` with
    ``ref_len`` the sum of each example's *shortest* reference, tokens ``text.lower().split()``. sacrebleu's
    ``BLEU(tokenize="none", lowercase=True, smooth_method="none")`` counts the same n-grams; its brevity penalty
    takes the reference *closest* in length instead, so the score is re-derived from sacrebleu's counts with
    the shortest-reference length (the two differ only with several references per example). Degenerate
    corpora (no hypothesis tokens, or no reference tokens) score 0, where ``compute_bleu`` raises
    ZeroDivisionError.

    Args:
        preds: one hypothesis string per example.
        refs: one reference string per example, or a list of reference strings per example.
    """
    if len(preds) != len(refs):
        raise ValueError(f"bleu: {len(preds)} predictions but {len(refs)} references")
    if max_order < 1:
        raise ValueError(f"bleu: max_order must be >= 1, got {max_order}")
    references = [[r] if isinstance(r, str) else [str(x) for x in r] for r in refs]
    if not all(references):
        raise ValueError("bleu: an example has no reference")
    if not references:
        return 0.0
    # sacrebleu takes one stream per reference position; None pads the examples that have fewer references
    streams = [[rs[i] if i < len(rs) else None for rs in references] for i in range(max(map(len, references)))]
    stats = _bleu_metric(max_order).corpus_score([str(p) for p in preds], streams)
    # sacrebleu's own score uses the closest reference length: on 1,299 random multi-reference corpora it moved
    # 347 BLEU-4 scores, by up to 37.7 points, so P5's shortest-reference length is recomputed here
    ref_len = sum(min(len(r.lower().split()) for r in rs) for rs in references)
    if stats.sys_len == 0 or ref_len == 0:
        return 0.0
    return BLEU.compute_bleu(stats.counts, stats.totals, stats.sys_len, ref_len, smooth_method="none",
                             max_ngram_order=max_order).score


_ROUGE_TYPES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}


@functools.cache
def _rouge_scorer() -> RougeScorer:
    # imported here, not at the top: rouge_scorer imports nltk, which imports scipy.stats, 0.7-0.8 s (measured)
    # that every importer of this module would pay, most of which never score ROUGE (the server's parse_rating,
    # the baselines' rouge_tokenize). No rougeLsum sentence splitting: nltk loads no data (punkt), downloads nothing
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(list(_ROUGE_TYPES), use_stemmer=False)


def rouge_tokenize(text: str) -> list[str]:
    """The tokens ROUGE scores (``rouge_score``'s tokeniser, no stemming): lowercase, ``[a-z0-9]`` runs.

    Non-ASCII letters therefore vanish: "café" -> ["caf"].
    """
    return rouge_tokenizer.tokenize(str(text), None)


def rouge(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2, ROUGE-L F-measure x100, mean over examples, one reference per example.

    ``rouge_score.rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)``: tokens as
    :func:`rouge_tokenize`, ROUGE-L is the sentence-level LCS (not ``rougeLsum``), an empty side scores 0.
    """
    if len(preds) != len(refs):
        raise ValueError(f"rouge: {len(preds)} predictions but {len(refs)} references")
    if len(preds) == 0:
        raise ValueError("rouge: no examples")
    # rouge_score's LCS is a pure-Python DP table: the 805 MI test explanations (15 tokens) score in 82 ms, 2.9x
    # a bit-parallel LCS (28 ms), negligible next to generating them; the scorer is built once (_rouge_scorer)
    scorer = _rouge_scorer()
    scores = np.zeros((len(preds), len(_ROUGE_TYPES)))
    for j, (pred, ref) in enumerate(zip(preds, refs)):
        score = scorer.score(str(ref), str(pred))  # rouge_score takes (target, prediction)
        scores[j] = [score[key].fmeasure for key in _ROUGE_TYPES]
    mean = 100.0 * scores.mean(axis=0)
    return {name: float(m) for name, m in zip(_ROUGE_TYPES.values(), mean)}


def distinct_n(preds: Sequence[str], n: int = 2) -> float:
    """distinct-n (Li et al. 2016) x100: distinct n-grams over all n-grams of all outputs, ROUGE's tokenisation.

    Degenerate text shows here where ROUGE hides it: one sentence repeated for every case, or "it't, but
    it't, but it't" within one, gives few distinct n-grams. No n-gram at all (every output empty) gives 0.
    """
    grams = [tuple(toks[i:i + n]) for toks in map(rouge_tokenize, preds) for i in range(len(toks) - n + 1)]
    return 100.0 * len(set(grams)) / len(grams) if grams else 0.0


def text_metrics(preds: Sequence[str], refs: Sequence[str], bleu_orders: Sequence[int] = (4,)) -> dict[str, float]:
    """``BLEU-n`` for each n in ``bleu_orders``, ``ROUGE-1/2/L`` and ``distinct-1/2`` of the outputs (all x100).

    P5 reports BLEU-4 for explanation generation and BLEU-2 for review summarisation (``bleu_orders=(2,)``).
    """
    out = {f"BLEU-{n}": bleu(preds, refs, max_order=n) for n in bleu_orders}
    out.update(rouge(preds, refs))
    out.update({f"distinct-{n}": distinct_n(preds, n) for n in (1, 2)})
    return out


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name, what kind of output it scores, its direction and inputs.

    ``needs`` names the inputs ``fn`` takes, in order (e.g. ``("ranks", "k")``); ``kind`` groups metrics by
    the output form they score (``ranking`` lists, numeric ``value``, free ``text``, ``accuracy`` of choices).
    """

    name: str
    kind: MetricKind
    higher_is_better: bool
    fn: Callable[..., float]
    needs: tuple[str, ...] = ()
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("ranking", "value", "text", "accuracy"):
            raise ValueError(f"metric {self.name!r}: unknown kind {self.kind!r}")


_REGISTRY: dict[str, MetricSpec] = {}
#: name -> MetricSpec, filled at import, read-only afterwards.
METRICS: Mapping[str, MetricSpec] = MappingProxyType(_REGISTRY)


def register(spec: MetricSpec) -> MetricSpec:
    """Add ``spec`` to the registry (at import). A duplicate name raises ``ValueError``."""
    if spec.name in _REGISTRY:
        raise ValueError(f"metric {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _rmse(preds: Sequence[str | float | None], targets: Sequence[float], **kw: float) -> float:
    return rating_metrics(preds, targets, **kw)["RMSE"]


def _mae(preds: Sequence[str | float | None], targets: Sequence[float], **kw: float) -> float:
    return rating_metrics(preds, targets, **kw)["MAE"]


def _rouge_part(key: str) -> Callable[[Sequence[str], Sequence[str]], float]:
    def fn(preds: Sequence[str], refs: Sequence[str]) -> float:
        return rouge(preds, refs)[key]

    fn.__name__ = key.lower().replace("-", "_")
    return fn


register(MetricSpec("HR", "ranking", True, hit_ratio, ("ranks", "k"), "hit ratio @K (target in top K)"))
register(MetricSpec("NDCG", "ranking", True, ndcg, ("ranks", "k"), "NDCG @K, one relevant item"))
register(MetricSpec("MAP", "ranking", True, map_at_k, ("ranks", "k"), "MAP @K, one relevant item"))
register(MetricSpec("MRR", "ranking", True, mrr, ("ranks",), "mean reciprocal rank"))
register(MetricSpec("RMSE", "value", False, _rmse, ("preds", "targets"), "root mean squared rating error"))
register(MetricSpec("MAE", "value", False, _mae, ("preds", "targets"), "mean absolute rating error"))
register(MetricSpec("accuracy", "accuracy", True, accuracy, ("preds", "golds"), "normalised exact match"))
register(MetricSpec("BLEU", "text", True, bleu, ("preds", "refs", "max_order"), "corpus BLEU-n x100 (P5)"))
register(MetricSpec("distinct", "text", True, distinct_n, ("preds", "n"), "distinct n-grams / all n-grams x100"))
for _key in ("ROUGE-1", "ROUGE-2", "ROUGE-L"):
    register(MetricSpec(_key, "text", True, _rouge_part(_key), ("preds", "refs"), f"{_key} F x100"))
del _key

_KEY_SUFFIX_RE = re.compile(r"(@\d+|-\d+|_valid)$")


def lookup(key: str) -> MetricSpec:
    """The spec behind a result key: ``"NDCG@10"`` -> NDCG, ``"BLEU-4"`` -> BLEU, ``"RMSE_valid"`` -> RMSE.

    Lets evaluation code decide direction (``higher_is_better``) from the keys in a results dict.
    Raises ``KeyError`` for an unknown key.
    """
    if key in METRICS:
        return METRICS[key]
    base = _KEY_SUFFIX_RE.sub("", key)
    if base in METRICS:
        return METRICS[base]
    raise KeyError(f"no metric registered for key {key!r}; known: {sorted(METRICS)}")
