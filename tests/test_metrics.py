"""Metrics on hand-computed values; BLEU (sacrebleu) and ROUGE (rouge_score) on hand-computed corpora in P5's
conventions, and BLEU against nltk's independent implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from p5rec.eval import metrics as M

# --------------------------------------------------------------------------------------------- ranking


def test_oracle_ranking_is_perfect():
    targets = ["a", "b", "c"]
    ranked = [["a", "x", "y"], ["b", "a"], ["c"]]
    out = M.ranking_metrics(ranked, targets, ks=(1, 5, 10))
    assert out["HR@1"] == 1.0
    assert out["NDCG@10"] == 1.0
    assert out["MAP@10"] == 1.0
    assert out["MRR"] == 1.0


def test_target_at_third_position():
    ranks = M.rank_of_target([["x", "y", "t", "z"]], ["t"])
    assert ranks.tolist() == [2.0]
    assert M.ndcg(ranks, 5) == 0.5  # 1/log2(4), exactly
    assert M.hit_ratio(ranks, 2) == 0.0
    assert M.hit_ratio(ranks, 3) == 1.0
    assert M.map_at_k(ranks, 5) == pytest.approx(1 / 3)
    assert M.ndcg(ranks, 2) == 0.0


def test_missing_target_scores_zero():
    ranks = M.rank_of_target([["x", "y"]], ["t"])
    assert np.isinf(ranks[0])
    out = M.ranking_metrics_from_ranks(ranks, ks=(1, 5, 10))
    assert all(v == 0.0 for v in out.values())


def test_means_over_users_and_first_occurrence():
    ranked = [["t", "t"], ["x", "t"], ["x", "y"], ["x", "y", "z", "t"]]
    targets = ["t", "t", "t", "t"]
    ranks = M.rank_of_target(ranked, targets)
    assert ranks.tolist() == [0, 1, math.inf, 3]
    out = M.ranking_metrics(ranked, targets, ks=(1, 5))
    assert out["HR@1"] == 0.25
    assert out["HR@5"] == 0.75
    assert out["NDCG@5"] == pytest.approx((1 + 1 / math.log2(3) + 0 + 1 / math.log2(5)) / 4)
    assert out["MAP@5"] == pytest.approx((1 + 1 / 2 + 0 + 1 / 4) / 4)
    assert out["MRR"] == pytest.approx((1 + 1 / 2 + 0 + 1 / 4) / 4)


def test_rank_of_target_array_input():
    ranked = np.array([[3, 1, 2], [5, 6, 7]])
    ranks = M.rank_of_target(ranked, np.array([2, 9]))
    assert ranks.tolist() == [2, math.inf]


def test_rank_from_scores_ties_pessimistic():
    scores = np.array(
        [
            [0.9, 0.5, 0.5, 0.1],  # target col 1 ties with col 2 -> pessimistic rank 2
            [1.0, 1.0, 1.0, 1.0],  # all equal -> worst rank 3
            [0.2, 0.8, 0.1, 0.0],  # clear: target col 1 is best
            [np.nan, 0.3, 0.2, 0.1],  # NaN counts as -inf: target col 2 is ranked 1
        ]
    )
    target = np.array([1, 0, 1, 2])
    assert M.rank_from_scores(scores, target).tolist() == [2, 3, 0, 1]
    assert M.rank_from_scores(scores, target, ties="optimistic").tolist() == [1, 0, 0, 1]
    with pytest.raises(ValueError):
        M.rank_from_scores(scores, target, ties="average")


def test_ranking_input_errors():
    with pytest.raises(ValueError):
        M.rank_of_target([["a"]], ["a", "b"])
    with pytest.raises(ValueError):
        M.hit_ratio([], 5)
    with pytest.raises(ValueError):
        M.ndcg([0], 0)


# --------------------------------------------------------------------------------------------- rating


@pytest.mark.parametrize(
    "text, value",
    [("5", 5.0), ("5.0", 5.0), (" 4.5 ", 4.5), ("4 stars", 4.0), ("4/5", 4.0), ("Five", 5.0), ("3.", 3.0),
     ("abc", None), ("", None), ("nan", None), ("rating: 4", None), ("5.0.1", None), ("fivefold", None),
     (4, 4.0), (float("nan"), None), (None, None)],
)
def test_parse_rating(text, value):
    assert M.parse_rating(text) == value


def test_rating_metrics_invalid_and_clipping():
    preds = ["5", "abc", "7", "2.5"]
    targets = [4.0, 3.0, 5.0, 1.5]
    out = M.rating_metrics(preds, targets, lo=1, hi=5, fallback=3.5)
    # errors: 1, 0.5 (fallback 3.5 vs 3), 0 (7 clipped to 5), 1
    err = np.array([1.0, 0.5, 0.0, 1.0])
    assert out["n"] == 4 and out["invalid"] == 1
    assert out["RMSE"] == pytest.approx(math.sqrt(np.mean(err**2)))
    assert out["MAE"] == pytest.approx(np.mean(err))
    valid = err[[0, 2, 3]]
    assert out["RMSE_valid"] == pytest.approx(math.sqrt(np.mean(valid**2)))
    assert out["MAE_valid"] == pytest.approx(np.mean(valid))


def test_rating_metrics_default_fallback_is_midpoint_and_all_invalid():
    out = M.rating_metrics(["?", "?"], [3.0, 5.0])
    assert out["invalid"] == 2
    assert out["MAE"] == pytest.approx(1.0)
    assert math.isnan(out["RMSE_valid"])


def test_rating_metrics_floats_and_errors():
    out = M.rating_metrics([0.0, 5.0], [1.0, 5.0])  # 0 clipped to 1
    assert out["RMSE"] == 0.0 and out["invalid"] == 0
    with pytest.raises(ValueError):
        M.rating_metrics(["1"], [1.0, 2.0])
    with pytest.raises(ValueError):
        M.rating_metrics(["1"], [float("nan")])


def test_accuracy_normalises():
    assert M.accuracy([" Yes", "no ", "LIKE", "yes"], ["yes", "no", "like", "no"]) == 0.75
    with pytest.raises(ValueError):
        M.accuracy(["yes"], [])


# --------------------------------------------------------------------------------------------- text

HYPS = [
    "the hair dryer works great and is very quiet",
    "This color is too dark for my skin",
    "it smells like fresh flowers , love it",
    "great product for the price",
    "the lotion is thick and greasy",
]
REFS = [
    "the hair dryer works well and it is very quiet",
    "this color is a bit too dark for my skin tone",
    "smells like fresh flowers and lasts all day",
    "good product for the price",
    "the lotion is too thick and greasy for me",
]


def test_bleu_hand_computed_corpus():
    # "the cat sat on the mat" vs "the cat sat on a mat": 1..4-gram matches 5/6, 3/5, 2/4, 1/3, same length
    assert M.bleu(["the cat sat on the mat"], ["the cat sat on a mat"], 2) == pytest.approx(100 * math.sqrt(1 / 2))
    assert M.bleu(["the cat sat on the mat"], ["the cat sat on a mat"], 4) == pytest.approx(100 * (1 / 12) ** 0.25)
    # corpus BLEU pools counts over examples (not a mean of sentence scores), lowercases, and the short second
    # hypothesis brings the brevity penalty exp(1 - 11/8): unigrams 7/8, bigrams 4/6
    hyps = ["the cat sat on the mat", "Great Product"]
    refs = ["the cat sat on a mat", "great product for the price"]
    assert M.bleu(hyps, refs, 2) == pytest.approx(100 * math.sqrt(7 / 8 * 4 / 6) * math.exp(1 - 11 / 8))


def test_bleu_multi_reference_uses_shortest_reference_length():
    # 5 hypothesis tokens, references of 2 and 6: P5's compute_bleu takes the shortest (2, no penalty) where
    # sacrebleu and nltk take the closest (6, penalty exp(1 - 6/5)); n-grams clip against both: 5/5, 3/4
    hyp, refs = ["the cat sat on mat"], [["the cat", "the cat sat on a mat"]]
    assert M.bleu(hyp, refs, 2) == pytest.approx(100 * math.sqrt(3 / 4))
    # a varying number of references per example
    assert M.bleu(hyp + ["a b"], refs + [["a b"]], 2) == pytest.approx(100 * math.sqrt(7 / 7 * 4 / 5))


def test_bleu_matches_nltk_and_brevity_penalty():
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    hyps = [h.lower().split() for h in HYPS]
    refs = [[r.lower().split()] for r in REFS]
    assert M.bleu(HYPS, REFS, 4) == pytest.approx(100 * bleu_score.corpus_bleu(refs, hyps), rel=1e-6)
    # short hypotheses (brevity penalty < 1) and multiple references
    short = ["the hair dryer works", "this color is"]
    multi = [[REFS[0], "the hair dryer works fine"], [REFS[1]]]
    theirs = bleu_score.corpus_bleu([[r.lower().split() for r in rs] for rs in multi], [s.split() for s in short],
                                    weights=(0.5, 0.5))
    # nltk uses the closest reference length, the TF-NMT code the shortest: here both pick the same one
    assert M.bleu(short, multi, 2) == pytest.approx(100 * theirs, rel=1e-6)


def test_bleu_degenerate():
    assert M.bleu(["a b c"], ["x y z"], 4) == 0.0
    assert M.bleu([""], ["x y z"], 4) == 0.0
    assert M.bleu(["a b c d"], ["a b c d"], 4) == pytest.approx(100.0)
    assert M.bleu(["great"], ["great"], 1) == pytest.approx(100.0)
    assert M.bleu(["great"], ["great"], 2) == 0.0  # a 1-token corpus has no bigram: an order without a match
    assert M.bleu(["a b"], [""], 2) == 0.0  # no reference tokens: 0 where compute_bleu divides by zero
    assert M.bleu([], [], 4) == 0.0
    with pytest.raises(ValueError, match="no reference"):
        M.bleu(["a b"], [[]], 2)
    with pytest.raises(ValueError, match="max_order"):
        M.bleu(["a b"], ["a b"], 0)


def test_rouge_hand_computed_pairs():
    preds = ["the cat sat on the mat", "Great!!! Works... as DESCRIBED", ""]
    refs = ["the cat is on the mat", "works as described, great", "not empty"]
    # pair 1: unigrams 5/6 both ways, bigrams 3/5, LCS "the cat on the mat" 5/6; pair 2 (case and punctuation
    # dropped): unigrams 4/4, bigrams 2/3, LCS "works as described" 3/4; an empty prediction scores 0
    out = M.rouge(preds, refs)
    assert out["ROUGE-1"] == pytest.approx(100 * (5 / 6 + 1 + 0) / 3)
    assert out["ROUGE-2"] == pytest.approx(100 * (3 / 5 + 2 / 3 + 0) / 3)
    assert out["ROUGE-L"] == pytest.approx(100 * (5 / 6 + 3 / 4 + 0) / 3)
    # F-measure, not recall: a prediction of half the reference's words has P=1, R=1/2, F=2/3
    assert M.rouge(["works as"], ["works as described great"])["ROUGE-1"] == pytest.approx(100 * 2 / 3)
    assert M.rouge_tokenize("Café, x-ray 5 STARS!") == ["caf", "x", "ray", "5", "stars"]
    with pytest.raises(ValueError, match="no examples"):
        M.rouge([], [])


def test_text_metrics_keys():
    distinct = {"distinct-1", "distinct-2"}
    assert set(M.text_metrics(HYPS, REFS)) == {"BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L"} | distinct
    out = M.text_metrics(HYPS, REFS, bleu_orders=(2,))
    assert set(out) == {"BLEU-2", "ROUGE-1", "ROUGE-2", "ROUGE-L"} | distinct
    assert out["BLEU-2"] == pytest.approx(M.bleu(HYPS, REFS, 2))


def test_distinct_n_counts_distinct_ngrams_over_all_outputs():
    # "a b a b": bigrams ab, ba, ab; "a b c": ab, bc -> 3 distinct of 5
    assert M.distinct_n(["a b a b", "A, b c!"], 2) == pytest.approx(100 * 3 / 5)
    assert M.distinct_n(["a b a b", "a b c"], 1) == pytest.approx(100 * 3 / 7)
    # one sentence for every case, or a loop within one: the degenerate outputs a small model falls into
    same = ["it is great for the price"] * 50
    assert M.distinct_n(same, 2) == pytest.approx(100 * 5 / 250)
    assert M.distinct_n(["but it is, " * 10], 2) < 15
    assert M.distinct_n(["", ""], 2) == 0.0
    assert M.lookup("distinct-2").higher_is_better


# --------------------------------------------------------------------------------------------- registry


def test_registry_metadata_and_duplicates():
    assert M.METRICS["RMSE"].higher_is_better is False
    assert M.METRICS["NDCG"].kind == "ranking"
    assert M.lookup("NDCG@10").name == "NDCG"
    assert M.lookup("BLEU-4").name == "BLEU"
    assert M.lookup("RMSE_valid").name == "RMSE"
    assert M.lookup("ROUGE-L").name == "ROUGE-L"
    assert M.METRICS["NDCG"].fn([2], 5) == 0.5
    with pytest.raises(KeyError):
        M.lookup("F1")
    with pytest.raises(ValueError, match="already registered"):
        M.register(M.MetricSpec("HR", "ranking", True, M.hit_ratio))
    with pytest.raises(TypeError):
        M.METRICS["x"] = M.METRICS["HR"]  # read-only after import
    with pytest.raises(ValueError):
        M.MetricSpec("y", "bogus", True, M.mrr)
