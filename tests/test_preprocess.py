"""preprocess: dedup, iterative k-core, deterministic time order (hand-built tables)."""

import pandas as pd
import pytest

from p5rec.data.preprocess import PreprocessError, deduplicate, kcore, time_order


def frame(rows):
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


def test_deduplicate_counts_exact_and_repeats_and_keeps_earliest():
    df = frame([
        ("u1", "a", 5), ("u1", "a", 5),  # exact duplicate
        ("u1", "b", 9), ("u1", "b", 2),  # repeat: the one at t=2 is kept
        ("u2", "a", 1),
    ])
    out, counts = deduplicate(df)
    assert counts == {"exact_duplicates": 1, "repeat_interactions": 1}
    assert list(out.itertuples(index=False, name=None)) == [("u1", "a", 5), ("u1", "b", 2), ("u2", "a", 1)]


def test_kcore_is_iterative_until_stable():
    # k=2: item "z" has one row -> removing it leaves u3 with one row -> u3 goes -> item "c" drops to 1 -> goes
    df = frame([
        ("u1", "a", 1), ("u1", "b", 2),
        ("u2", "a", 1), ("u2", "b", 2),
        ("u3", "c", 1), ("u3", "z", 2),
        ("u4", "c", 1), ("u4", "a", 2), ("u4", "b", 3),
    ])
    out, rounds = kcore(df, k=2)
    assert sorted(out["user"].unique()) == ["u1", "u2", "u4"]
    assert sorted(out["item"].unique()) == ["a", "b"]
    assert (out["user"].value_counts() >= 2).all() and (out["item"].value_counts() >= 2).all()
    assert len(rounds) >= 2
    assert sum(r["rows_removed"] for r in rounds) == len(df) - len(out)


def test_kcore_unchanged_when_already_a_core():
    df = frame([(u, i, t) for t, (u, i) in enumerate([(u, i) for u in "xy" for i in "ab"])])
    out, rounds = kcore(df, k=2)
    assert rounds == [] and len(out) == 4


def test_kcore_empty_raises_naming_k():
    with pytest.raises(PreprocessError, match=r"k=3"):
        kcore(frame([("u1", "a", 1), ("u2", "b", 1)]), k=3)


def test_time_order_breaks_ties_by_item():
    df = frame([("u2", "b", 1), ("u1", "c", 7), ("u1", "b", 7), ("u1", "a", 9), ("u2", "a", 1)])
    out = time_order(df)
    assert list(out.itertuples(index=False, name=None)) == [
        ("u1", "b", 7), ("u1", "c", 7), ("u1", "a", 9), ("u2", "a", 1), ("u2", "b", 1)]
