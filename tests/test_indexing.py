"""indexing: rendering, JSON round trip, fitting on the training part only (all three strategies)."""

import logging

import numpy as np
import pytest

from p5rec.data.indexing import Index, collaborative_ids, cooccurrence, fit_index
from p5rec.data.splits import training_part


def toy_sequences(seed=0, n_users=90, n_groups=4, group_size=30):
    """Users who each buy inside one 'taste group' of items: collaborative structure for the clustering."""
    rng = np.random.default_rng(seed)
    seqs = {}
    for u in range(n_users):
        g = u % n_groups
        items = rng.choice(group_size, size=rng.integers(5, 10), replace=False) + g * group_size
        seqs[f"u{u:03d}"] = [f"i{j:03d}" for j in items]
    seqs["lonely"] = ["solo1", "solo2", "solo3"]  # training part ["solo1"]: no co-occurrence
    return seqs


def fit(seqs, strategy):
    train = {u: training_part(s) for u, s in seqs.items()}
    return fit_index(train, strategy=strategy, seed=1, n_clusters=5,
                     items={i for s in seqs.values() for i in s}, users=seqs)


def test_render_forms():
    idx = Index("random", {"A": "17"}, {"x": "532", "y": "3-0-12"})
    assert idx.user_text("A") == "<u17>" and idx.user_text("A", "text") == "user_17"
    assert idx.item_text("x") == "<i532>" and idx.item_text("x", "text") == "item_532"
    assert idx.item_text("y") == "<a3><b0><c12>" and idx.item_text("y", "text") == "item_3_0_12"
    assert idx.item_tokens() == ["<i532>", "<a3>", "<b0>", "<c12>"]
    assert idx.user_tokens() == ["<u17>"] and idx.item_tokens("text") == []
    assert idx.item_from_text("<a3><b0><c12>") == "y" and idx.item_from_text("item_532", "text") == "x"
    assert idx.item_from_text("<i999>") is None
    with pytest.raises(KeyError, match=r"unknown item 'nope' \(not in the training catalogue of this index\)"):
        idx.item_text("nope")
    with pytest.raises(ValueError):
        idx.item_text("x", "bogus")


def test_json_round_trip(tmp_path):
    idx = fit(toy_sequences(), "collaborative")
    idx.to_json(tmp_path / "index.json")
    back = Index.from_json(tmp_path / "index.json")
    assert back == idx and back.levels == idx.levels


@pytest.mark.parametrize("strategy", ["random", "sequential", "collaborative"])
def test_ids_unique_and_cover_everything(strategy):
    seqs = toy_sequences()
    idx = fit(seqs, strategy)
    assert set(idx.items) == {i for s in seqs.values() for i in s}
    assert set(idx.users) == set(seqs)
    assert len(set(idx.items.values())) == len(idx.items)
    assert len(set(idx.users.values())) == len(idx.users)
    surfaces = {idx.item_text(i) for i in idx.items}
    assert len(surfaces) == len(idx.items)
    assert all(idx.item_from_text(idx.item_text(i)) == i for i in idx.items)


@pytest.mark.parametrize("strategy", ["random", "sequential", "collaborative"])
def test_held_out_changes_leave_training_ids_alone(strategy):
    seqs = toy_sequences()
    before = fit(seqs, strategy)
    changed = {u: list(s) for u, s in seqs.items()}
    for j, u in enumerate(sorted(changed)[::3]):
        changed[u][-1] = f"brand_new_{j}"  # a new test item
        changed[u][-2] = "i000"  # a validation item that also is a training item
    after = fit(changed, strategy)
    train_items = {i for s in seqs.values() for i in training_part(s)}
    assert {i: before.items[i] for i in train_items} == {i: after.items[i] for i in train_items}
    assert before.users == after.users


def test_held_out_items_numbered_after_training_items():
    seqs = {"u1": ["b", "a", "c", "held2"], "u2": ["a", "b", "held1", "held0"]}
    idx = fit_index({u: training_part(s) for u, s in seqs.items()}, strategy="sequential",
                    items={"held0", "held1", "held2", "c"})
    assert idx.items == {"a": "2", "b": "1", "c": "3", "held0": "4", "held1": "5", "held2": "6"}


def test_sequential_warns(caplog):
    with caplog.at_level(logging.WARNING):
        fit_index({"u": ["a", "b"]}, strategy="sequential")
    assert "leak" in caplog.text


def test_collaborative_groups_co_occurring_items_and_isolates_lonely():
    seqs = toy_sequences()
    idx = fit(seqs, "collaborative")
    assert idx.levels is not None and len(idx.levels) >= 2
    # top-level clusters are pure: each holds items of (almost) one taste group (n_clusters=5 > 4 groups, so a
    # group may be split in two, but groups are not mixed)
    top = {i: idx.items[i].split("-")[0] for i in idx.items}
    group_items = [f"i{j:03d}" for j in range(120) if f"i{j:03d}" in top]
    for cluster in {top[i] for i in group_items}:
        groups = [int(i[1:]) // 30 for i in group_items if top[i] == cluster]
        assert np.bincount(groups).max() / len(groups) >= 0.9
    # the lonely training item and the held-out-only items get their own top-level groups
    cluster_tops = {top[f"i{j:03d}"] for j in range(120) if f"i{j:03d}" in top}
    assert top["solo1"] not in cluster_tops
    assert top["solo2"] != top["solo1"] and top["solo2"] == top["solo3"]
    # deterministic
    assert fit(seqs, "collaborative").items == idx.items


def test_cooccurrence_window():
    a = cooccurrence({"u": ["x", "y", "z"]}, ["x", "y", "z"], window=1).toarray()
    assert a.tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]


def test_collaborative_leaf_size_bounded():
    rng = np.random.default_rng(1)
    seqs = {f"u{u}": [f"i{j}" for j in rng.choice(200, 8, replace=False)] for u in range(150)}
    items = sorted({i for s in seqs.values() for i in s})
    ids, levels = collaborative_ids(seqs, items, [], n_clusters=6, seed=0)
    assert len(set(ids.values())) == len(items)
    assert max(levels) <= 6 or levels[0] <= 7
    assert all(int(v.split("-")[-1]) < 6 for v in ids.values())


def test_collaborative_deterministic_on_large_nodes():
    # > 1000 linked items: the top split goes through LOBPCG (ARPACK's hidden random restarts once made ids vary)
    rng = np.random.default_rng(2)
    seqs = {f"u{u}": [f"i{j}" for j in rng.choice(1100, 7, replace=False)] for u in range(1500)}
    items = sorted({i for s in seqs.values() for i in s})
    assert len(items) > 1000
    first = collaborative_ids(seqs, items, [], n_clusters=20, seed=0)
    assert collaborative_ids(seqs, items, [], n_clusters=20, seed=0) == first
    assert len(set(first[0].values())) == len(items)
