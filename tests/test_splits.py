"""splits: leave-one-out tables and rows, ratio split coverage, negatives (hand-built data)."""

import time

import numpy as np
import pandas as pd
import pytest

from p5rec.data.splits import leave_one_out, leave_one_out_rows, make_candidates, ratio_split, sample_negatives


def test_leave_one_out_tables():
    df = pd.DataFrame({"user": ["u1"] * 5 + ["u2"] * 2, "item": list("abcde") + ["x", "y"]})
    loo = leave_one_out(df)
    assert loo.sequences == {"u1": list("abcde"), "u2": ["x", "y"]}
    assert loo.short_users == 1
    # u1 training part abc -> (a)->b, (a,b)->c ; u2 (short) x->y
    rows = list(zip(loo.train["user"], map(list, loo.train["history"]), loo.train["target"]))
    assert rows == [("u1", ["a"], "b"), ("u1", ["a", "b"], "c"), ("u2", ["x"], "y")]
    assert list(loo.valid["history"][0]) == list("abc") and loo.valid["target"][0] == "d"
    assert list(loo.test["history"][0]) == list("abcd") and loo.test["target"][0] == "e"
    assert loo.valid["user"].tolist() == loo.test["user"].tolist() == ["u1"]
    assert loo.training_sequences() == {"u1": list("abc"), "u2": ["x", "y"]}


def test_leave_one_out_rows_split_the_rows_as_the_sequences():
    rng = np.random.default_rng(1)
    users = [f"u{i}" for i in rng.integers(0, 40, 300)]
    df = pd.DataFrame({"user": users, "item": [f"i{j}" for j in range(300)]})  # frame order is time order
    split = leave_one_out_rows(df)
    loo = leave_one_out(df)
    for s in ("valid", "test"):  # each user's row of a split is that user's target of the same split
        rows = df[split == s]
        assert sorted(zip(rows["user"], rows["item"])) == sorted(zip(getattr(loo, s)["user"], getattr(loo, s)["target"]))
    train = df[split == "train"]
    assert {u: train["item"][train["user"] == u].tolist() for u in loo.sequences} == loo.training_sequences()
    short = df[df["user"].map(df["user"].value_counts()) < 3]
    assert (split[short.index] == "train").all()
    assert leave_one_out_rows(df.iloc[:0]).tolist() == []


def test_ratio_split_every_user_and_item_in_train():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"user": [f"u{i}" for i in rng.integers(0, 60, 400)],
                       "item": [f"i{i}" for i in rng.integers(0, 90, 400)]})
    split, moved = ratio_split(df, seed=7)
    train = df[split == "train"]
    for s in ("valid", "test"):
        part = df[split == s]
        assert part["user"].isin(train["user"]).all() and part["item"].isin(train["item"]).all()
    assert moved > 0  # 90 items over 400 rows: some only appear outside train at first
    assert (split == "train").sum() == round(0.8 * 400) + moved
    again, moved2 = ratio_split(df, seed=7)
    assert (again == split).all() and moved2 == moved
    assert not (ratio_split(df, seed=8)[0] == split).all()


def test_ratio_split_rejects_bad_ratios():
    with pytest.raises(ValueError):
        ratio_split(pd.DataFrame({"user": ["a"], "item": ["b"]}), ratios=(0.5, 0.1, 0.1))


def test_sample_negatives_distinct_untouched_deterministic():
    catalogue = np.array([f"i{j:02d}" for j in range(12)], dtype=object)
    user_items = {"u1": {"i00", "i01", "i02"}, "u2": set(catalogue[:2]), "u3": set()}
    neg = sample_negatives(user_items, catalogue, n=9, seed=3)
    assert set(neg) == {"u1", "u2", "u3"}
    for u, items in neg.items():
        assert len(items) == 9 == len(set(items))
        assert not set(items) & user_items[u]
    assert set(neg["u1"]) == set(catalogue[3:])  # exactly the 9 untouched ones
    assert neg == sample_negatives(user_items, catalogue, n=9, seed=3)


def test_sample_negatives_too_few_untouched_raises():
    with pytest.raises(ValueError, match="untouched"):
        sample_negatives({"u": {"a", "b"}}, np.array(["a", "b", "c"], dtype=object), n=2, seed=0)


def test_sample_negatives_is_vectorised_fast():
    rng = np.random.default_rng(0)
    catalogue = np.array([f"i{j}" for j in range(2000)], dtype=object)
    user_items = {f"u{u}": set(catalogue[rng.integers(0, 2000, 20)]) for u in range(3000)}
    t = time.perf_counter()
    neg = sample_negatives(user_items, catalogue, n=99, seed=1)
    assert time.perf_counter() - t < 3
    assert all(len(set(v)) == 99 and not set(v) & user_items[u] for u, v in neg.items())


def test_make_candidates_shuffles_target_in():
    neg = {"u1": ["n1", "n2", "n3"], "u2": ["m1", "m2", "m3"]}
    cands = make_candidates({"u1": "t1", "u2": "t2"}, neg, seed=5)
    assert sorted(cands["u1"]) == sorted(["t1", *neg["u1"]])
    assert cands == make_candidates({"u1": "t1", "u2": "t2"}, neg, seed=5)
    positions = {tuple(make_candidates({"u1": "t1"}, neg, seed=s)["u1"]).index("t1") for s in range(20)}
    assert len(positions) > 1  # the target is not always in the same slot
