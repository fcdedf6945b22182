"""Baselines on tiny hand-made tables with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from p5rec.eval import baselines as B
from p5rec.eval.metrics import rating_metrics

# --------------------------------------------------------------------------------------------- popularity

# counts: a=3, b=2, c=2, d=1  -> order a, b, c, d (b before c: id string tie-break)
TRAIN_ITEMS = ["c", "a", "b", "a", "d", "c", "b", "a"]


def test_popularity_ranking_without_exclusion():
    ranked = B.popularity_ranking(TRAIN_ITEMS, 3, n_users=2)
    assert ranked == [["a", "b", "c"], ["a", "b", "c"]]
    ranked[0].append("x")  # fresh list per user
    assert ranked[1] == ["a", "b", "c"]
    with pytest.raises(ValueError):
        B.popularity_ranking(TRAIN_ITEMS, 3)


def test_popularity_ranking_with_exclusion():
    ranked = B.popularity_ranking(TRAIN_ITEMS, 2, exclude=[["a"], ["b", "c"], ["a", "b", "c", "d"]])
    assert ranked == [["b", "c"], ["a", "d"], []]


def test_popularity_direct():
    counts = {"a": 3, "b": 2, "c": 2}
    rows = Dataset.from_dict({"user": ["u1", "u2"], "target": ["c", "z"],
                              "candidates": [["z", "c", "b", "a"], ["y", "z", "a", "x"]]})
    assert B.popularity_direct(rows, counts) == [["a", "b", "c", "z"], ["a", "x", "y", "z"]]


# --------------------------------------------------------------------------------------------- rating


def test_global_mean_rating_ignores_nan():
    assert B.global_mean_rating([1.0, float("nan"), 5.0]) == 3.0
    with pytest.raises(ValueError):
        B.global_mean_rating([float("nan")])


def _synthetic(n_users=30, n_items=20, seed=0):
    rng = np.random.default_rng(seed)
    bu = rng.normal(0, 0.5, n_users)
    bi = rng.normal(0, 0.5, n_items)
    bu -= bu.mean()
    bi -= bi.mean()
    users = [f"u{u}" for u in range(n_users) for _ in range(n_items)]
    items = [f"i{i}" for _ in range(n_users) for i in range(n_items)]
    r = 3.5 + np.repeat(bu, n_items) + np.tile(bi, n_users)
    return users, items, r, bu, bi


def test_biased_mf_recovers_noiseless_biases():
    users, items, r, bu, bi = _synthetic()
    model = B.BiasedMF(reg_bias=0.0, n_iters=50).fit(users, items, r)
    assert model.mu == pytest.approx(3.5)
    got_bu = np.array([model.user_bias[model.user_index[f"u{u}"]] for u in range(len(bu))])
    got_bi = np.array([model.item_bias[model.item_index[f"i{i}"]] for i in range(len(bi))])
    np.testing.assert_allclose(got_bu, bu, atol=1e-8)
    np.testing.assert_allclose(got_bi, bi, atol=1e-8)
    np.testing.assert_allclose(model.predict(users, items), r, atol=1e-8)
    # unknown ids fall back to mu (+ the known side's bias)
    assert model.predict(["nobody"], ["nothing"])[0] == pytest.approx(3.5)
    assert model.predict(["u0"], ["nothing"])[0] == pytest.approx(3.5 + bu[0])


def test_biased_mf_generalises_and_beats_global_mean():
    users, items, r, _, _ = _synthetic()
    rng = np.random.default_rng(1)
    test_mask = rng.random(len(r)) < 0.2
    tr, te = ~test_mask, test_mask
    pick = lambda xs, m: [x for x, keep in zip(xs, m) if keep]  # noqa: E731
    model = B.BiasedMF(reg_bias=0.01, n_iters=100).fit(pick(users, tr), pick(items, tr), r[tr])
    pred = model.predict(pick(users, te), pick(items, te))
    mean = B.global_mean_rating(r[tr])
    mf = rating_metrics(pred.tolist(), r[te].tolist(), fallback=mean)
    base = rating_metrics([mean] * int(te.sum()), r[te].tolist(), fallback=mean)
    assert mf["RMSE"] < 0.01 < base["RMSE"]


def test_biased_mf_with_factors_is_deterministic_and_fits():
    rng = np.random.default_rng(2)
    n_u, n_i = 25, 15
    p, q = rng.normal(0, 1, (n_u, 2)), rng.normal(0, 1, (n_i, 2))
    full = 3.0 + p @ q.T
    users = [f"u{u}" for u in range(n_u) for _ in range(n_i)]
    items = [f"i{i}" for _ in range(n_u) for i in range(n_i)]
    r = full.ravel()
    a = B.BiasedMF(n_factors=2, reg_bias=0.1, reg_factors=0.1, n_iters=50, seed=3).fit(users, items, r)
    b = B.BiasedMF(n_factors=2, reg_bias=0.1, reg_factors=0.1, n_iters=50, seed=3).fit(users, items, r)
    np.testing.assert_array_equal(a.predict(users, items), b.predict(users, items))
    bias_only = B.BiasedMF(reg_bias=0.1).fit(users, items, r)
    err = lambda m: np.sqrt(np.mean((m.predict(users, items) - r) ** 2))  # noqa: E731
    assert err(a) < 0.1 < err(bias_only)


# --------------------------------------------------------------------------------------------- text


def test_nearest_review_baseline_picks_expected_texts():
    train = Dataset.from_dict({
        "user": ["alice", "alice", "bob", "bob", "carol", "dave"],
        "item": ["hat", "bag", "shoe", "bag", "shoe", "shoe"],
        "explanation": ["the colour is lovely", "lovely colour and soft", "very durable sole",
                        "durable straps", "colour is lovely and bright", "comfortable fit"],
    })
    test = Dataset.from_dict({"user": ["alice", "bob", "erin", "alice"],
                              "item": ["shoe", "hat", "shoe", "scarf"]})
    preds = B.nearest_review_baseline(train, test, "explanation")
    # alice writes about colour -> carol's shoe text; bob's profile shares nothing with the only hat text
    # -> item's most common; erin has no profile -> shoe's most common (tie -> first row); scarf unseen ->
    # global most common (all once -> first row)
    assert preds == ["colour is lovely and bright", "the colour is lovely", "very durable sole",
                     "the colour is lovely"]


def test_most_common_text_by_key_falls_back_to_the_overall_most_common():
    keys = ["price", "sound", "price", "sound", "sound", "strap", "price"]
    texts = ["great price", "sound is warm", "great price", "clear sound", "clear sound", "", "cheap for the price"]
    preds = B.most_common_text_by(keys, texts, ["sound", "price", "strap", "tuner"])
    # sound: "clear sound" twice; price: "great price" twice; strap has only an empty text and tuner no row ->
    # the most common non-empty text overall ("great price" and "clear sound" tie at 2: first seen wins)
    assert preds == ["clear sound", "great price", "great price", "great price"]
    with pytest.raises(ValueError, match="3 keys for 2 texts"):
        B.most_common_text_by(["a", "b", "c"], ["x", "y"], ["a"])


def test_lcs_f1_is_rouge_score_rouge_l():
    from p5rec.eval.metrics import _rouge_scorer, rouge_tokenize

    texts = ["This is a great price.", "Great for the price", "I love it", "the strings sound great for the price",
             "ok", "great great price", "price great"]
    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(w, len(vocab)) for w in rouge_tokenize(t)] for t in texts]
    refs = np.full((len(ids), max(map(len, ids))), -1)
    for k, r in enumerate(ids):
        refs[k, : len(r)] = r
    lens = np.array([len(r) for r in ids])
    for cand, toks in zip(texts, ids):
        expected = [_rouge_scorer().score(ref, cand)["rougeL"].fmeasure for ref in texts]
        np.testing.assert_allclose(B.lcs_f1(toks, refs, lens), expected)


def test_best_constant_text_beats_the_most_common_when_it_is_closer_to_all():
    # "ok" is the most common text but shares no word with the rest; "great for the price" shares most of
    # several references, so written for every case it scores higher: the best constant is not the mode
    train = ["ok", "ok", "ok", "great price", "great for the price", "great for the price", "good for the price",
             "for the price it is great", "", "the price is great"]
    sentence, score = B.best_constant_text(train, n_candidates=10, n_references=100)
    assert sentence == "great for the price"
    assert B.most_common_text(train, 1) == ["ok"]
    from p5rec.eval.metrics import rouge

    assert score == pytest.approx(rouge([sentence] * 9, [t for t in train if t])["ROUGE-L"])
    assert score > rouge(["ok"] * 9, [t for t in train if t])["ROUGE-L"]
    with pytest.raises(ValueError, match="no non-empty training texts"):
        B.best_constant_text(["", "  "])


def test_the_feature_baseline_scores_each_case_with_its_own_feature_sentence():
    from p5rec.eval.evaluation import BASELINES, BaselineContext, EvalConfig
    from p5rec.prompts import templates as T

    class Prepared:
        def family(self, name):
            return {"train": Dataset.from_dict({"feature": ["price", "sound", "price"],
                                                "explanation": ["great price", "warm sound", "great price"]}),
                    "test": Dataset.from_dict({"feature": ["sound", "price"],
                                               "explanation": ["warm sound", "bad price"]})}

    spec = T.load_templates(families=["explanation"]).family_info("explanation")
    name = "most common training explanation of the feature"
    ctx = BaselineContext(Prepared(), EvalConfig(split="test", families=("explanation",)), spec, "text", name,
                          dict(spec.baseline(name).args))
    scores = BASELINES[spec.baseline(name).method](ctx)[name]
    # "warm sound" is exact; "great price" against "bad price" shares one of two words (ROUGE-L F 50)
    assert scores["ROUGE-L"] == pytest.approx(75.0)
    ctx.args["key"] = "aspect"
    with pytest.raises(ValueError, match="the training table has no column 'aspect'"):
        BASELINES[spec.baseline(name).method](ctx)


def test_nearest_text_by_input():
    train = Dataset.from_dict({
        "review": ["battery lasts forever and charges fast", "screen cracked after a week", "",
                   "the strap broke"],
        "summary": ["great battery", "fragile screen", "no review", ""],
    })
    test = Dataset.from_dict({"review": ["my screen cracked", "battery charges fast", "xyz qqq"]})
    preds = B.nearest_text_by_input(train, test, chunk_cells=2)  # 1 test row per chunk
    assert preds == ["fragile screen", "great battery", "great battery"]


def test_tfidf_max_df_drops_common_terms():
    vec = B.TfidfVectorizer(max_df=0.5)
    x = vec.fit_transform(["the cat", "the dog", "the bird"])
    assert x[:, vec.vocab["the"]].nnz == 0
    np.testing.assert_allclose(np.asarray(x.multiply(x).sum(axis=1)).ravel(), 1.0)


def test_the_most_typical_text_is_the_medoid():
    from p5rec.eval.baselines import most_typical_text

    texts = ["great strings for the price", "the strings sound great", "great strings for a low price",
             "my dog ate it"]
    assert most_typical_text(texts) == "great strings for the price"  # closest to the other two
    assert most_typical_text(["only one"]) == "only one"
    assert most_typical_text(["a b", "c d"]) == "a b"  # a tie goes to the earlier text
    with pytest.raises(ValueError):
        most_typical_text([])


def test_the_medoid_uses_rouge_scores_rouge_l():
    """The pairwise LCS in plain Python picks the text rouge_score's own ROUGE-L F-measure makes the medoid, over
    random sets with repeated words, empty texts and texts longer than the 64 tokens kept."""
    from rouge_score.rouge_scorer import RougeScorer

    from p5rec.eval.baselines import lcs_length, most_typical_text

    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    rng = np.random.default_rng(3)
    words = ["good", "strings", "tone", "the", "a", "price", "sound", "great"]
    for _ in range(60):
        texts = [" ".join(rng.choice(words, size=rng.integers(0, 12))) for _ in range(rng.integers(2, 9))]
        mean = [np.mean([scorer.score(o, t)["rougeL"].fmeasure for j, o in enumerate(texts) if j != k])
                if t.split() else 0.0 for k, t in enumerate(texts)]
        best = max(mean)
        # the first text within float noise of the best mean (rouge_score and numpy round differently)
        assert most_typical_text(texts) == next(t for t, m in zip(texts, mean) if m > best - 1e-12)
    a, b = list("abcbdab"), list("bdcaba")
    assert lcs_length(a, b) == lcs_length(b, a) == 4 and lcs_length([], b) == 0
