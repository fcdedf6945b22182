"""explain: the feature-opinion extractor on a tiny hand-written corpus."""

import pytest

from p5rec.data import explain
from p5rec.data.explain import EXTRACTORS, FeatureOpinionExtractor, coverage, split_sentences

CORPUS = [
    "The strings sound great. I bought them last week.",
    "Great strings   for the price! The tuner is flimsy though.",
    "Shipping was slow.",
    "The tuner is accurate and the display is bright.",
    "Ok.",
    "The tuner works.  Nothing else to say about this tuner at all, I guess.",
]


def test_split_sentences():
    assert split_sentences("Nice.The cable is good! Really?\nYes") == ["Nice.", "The cable is good!", "Really?", "Yes"]


def test_feature_vocabulary_excludes_stopwords_and_opinions():
    ex = FeatureOpinionExtractor(min_df=1).fit(CORPUS)
    assert {"strings", "tuner", "display"} <= set(ex.features)
    assert not set(ex.features) & (explain.STOPWORDS | explain.OPINION_WORDS)
    assert all(len(w) >= 3 for f in ex.features for w in f.split())
    # ranked by co-occurrence count, ties alphabetically
    assert list(ex.features)[:2] == ["strings", "tuner"]  # 2 opinion sentences each


def test_extract_pairs_and_coverage():
    pairs = explain.extract(CORPUS, min_df=1)
    assert pairs[0] == ("strings", "The strings sound great.")
    assert pairs[1] == ("strings", "Great strings for the price!")  # first qualifying sentence, spaces collapsed
    assert pairs[2] is None  # 3 words: below the 4-word minimum
    assert pairs[3][0] in {"tuner", "display"} and pairs[3][1].startswith("The tuner is accurate")
    assert pairs[4] is None and pairs[5] is None  # too short / no opinion word
    assert coverage(pairs) == pytest.approx(3 / 6)
    assert explain.extract(CORPUS, min_df=1) == pairs  # deterministic


def test_min_df_and_top_n():
    ex = FeatureOpinionExtractor(min_df=2, top_n=1).fit(CORPUS)
    assert list(ex.features) == ["strings"]


def test_registry_and_empty():
    assert "feature-opinion" in EXTRACTORS
    with pytest.raises(KeyError, match="known"):
        EXTRACTORS.get("sentires")
    assert explain.extract(["", "Ok."]) == [None, None]
    assert coverage([]) == 0.0
