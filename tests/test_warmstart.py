"""The collaborative start of the id rows (``--id_embedding_init collaborative``, p5rec/train/warmstart.py)."""

import numpy as np
import pytest
import torch

from p5rec.train.warmstart import SCALAR_FEATURES, collaborative_vectors, write_rows

# two communities: users a* buy items x*, users b* buy items y*; x0 is bought by every a-user (popular)
PAIRS = [(u, i) for u in ("a1", "a2", "a3") for i in ("x0", "x1", "x2")] + [("a4", "x0")]
PAIRS += [(u, i) for u in ("b1", "b2") for i in ("y1", "y2")] + [("b3", "y1")]
USERS = sorted({u for u, _ in PAIRS} | {"c0"})  # c0 has no training interaction
ITEMS = sorted({i for _, i in PAIRS} | {"z9"})


class _Index:
    """One token per id: users <u0>.., items <i0>.. (what write_rows reads of p5rec's Index)."""

    def __init__(self):
        self.users = {u: str(k) for k, u in enumerate(USERS)}
        self.items = {i: str(k) for k, i in enumerate(ITEMS)}

    def user_text(self, raw, form):
        return f"<u{self.users[raw]}>"

    def item_text(self, raw, form):
        return f"<i{self.items[raw]}>"


def _vocab(index, words):
    tokens = words + [index.user_text(u, "token") for u in USERS] + [index.item_text(i, "token") for i in ITEMS]
    return {t: k for k, t in enumerate(tokens)}


def _tokenizer(vocab):
    class Tok:
        def convert_tokens_to_ids(self, tokens):
            return [vocab[t] for t in tokens]

    return Tok


def _vectors(ratings=None, dim=6):
    users, items = zip(*PAIRS)
    return collaborative_vectors((list(users), list(items)), USERS, ITEMS, ratings, dim=dim)


def test_counts_and_communities_are_in_the_coordinates():
    v = _vectors()
    assert v.dim == 6 and all(len(x) == 6 for x in (*v.users.values(), *v.items.values()))
    # coordinate 0 is the (standardized) log-count: the most bought item and the most active user rank first
    assert max(v.items, key=lambda i: v.items[i][0]) == "x0"
    assert v.items["z9"][0] == min(x[0] for x in v.items.values())
    assert v.users["c0"][0] == min(x[0] for x in v.users.values())
    # without stars the rating-bias coordinate carries nothing
    assert all(x[1] == 0 for x in v.items.values())

    def spectral(x):
        return x[SCALAR_FEATURES:]

    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    # items of one community sit closer to each other than to the other community's
    assert cos(spectral(v.items["x1"]), spectral(v.items["x2"])) > cos(spectral(v.items["x1"]), spectral(v.items["y1"]))
    assert cos(spectral(v.users["a1"]), spectral(v.items["x1"])) > cos(spectral(v.users["a1"]), spectral(v.items["y1"]))


def test_rating_bias_coordinate_orders_users_by_how_they_rate():
    users, items = zip(*PAIRS)
    stars = [5.0 if u.startswith("a") else 2.0 for u in users]
    v = _vectors((list(users), list(items), stars))
    assert min(v.users[u][1] for u in ("a1", "a2", "a3")) > max(v.users[u][1] for u in ("b1", "b2"))
    assert v.items["x1"][1] > v.items["y1"][1]


def test_rows_are_written_at_the_embeddings_scale_and_multi_level_ids_are_refused():
    index = _Index()
    vocab = _vocab(index, ["<pad>", "the"])
    Tok = _tokenizer(vocab)

    torch.manual_seed(0)
    weight = torch.randn(len(vocab), 16)
    before = weight.clone()
    v = _vectors()
    assert write_rows(weight, Tok(), index, v) == len(USERS) + len(ITEMS)
    assert torch.equal(weight[:2], before[:2])  # word rows untouched
    row = vocab[index.item_text("x0", "token")]
    item_rows = [vocab[index.item_text(i, "token")] for i in ITEMS]
    scale = before[item_rows].std()  # the scale of the id rows as they were
    assert torch.allclose(weight[row, :6], torch.as_tensor(v.items["x0"], dtype=torch.float32) * scale, atol=1e-5)
    assert torch.equal(weight[row, 6:], before[row, 6:])  # the rest of the row keeps its random start
    only_items = torch.randn(len(vocab), 16)
    assert write_rows(only_items, Tok(), index, v, users=False) == len(ITEMS)
    index.items = {i: f"{k}-0" for k, i in enumerate(ITEMS)}
    with pytest.raises(ValueError, match="one token per item"):
        write_rows(weight, Tok(), index, v)


def test_typed_rows_share_one_direction_per_side():
    index = _Index()
    vocab = _vocab(index, ["<pad>"])
    Tok = _tokenizer(vocab)

    torch.manual_seed(0)
    weight = torch.randn(len(vocab), 64)
    write_rows(weight, Tok(), index, None, typed=0.2)
    items = weight[[vocab[index.item_text(i, "token")] for i in ITEMS]]
    users = weight[[vocab[index.user_text(u, "token")] for u in USERS]]

    def mean_cos(a, b):
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
        return (a @ b.T).mean().item()
    assert mean_cos(items, items) > 0.9 and mean_cos(users, users) > 0.9  # one shared vector per side
    assert abs(mean_cos(items, users)) < 0.5  # and the two sides differ
    assert len({tuple(r.tolist()) for r in items}) == len(ITEMS)  # each id still its own row
    # with interaction vectors, their coordinates come first and the shared vector fills the rest
    v = _vectors()
    write_rows(weight, Tok(), index, v, typed=0.2)
    row = weight[vocab[index.item_text("x0", "token")]]
    assert torch.allclose(row[:6], torch.as_tensor(v.items["x0"], dtype=torch.float32) * items.std(), atol=0.2)


def test_auto_resolves_to_the_typed_start_only_where_every_id_is_one_token():
    from types import SimpleNamespace

    from p5rec.train.training import ModelArguments, resolve_id_init

    flat = SimpleNamespace(index=SimpleNamespace(items={"x": "3"}), has_family=lambda name: True)
    levels = SimpleNamespace(index=SimpleNamespace(items={"x": "3-1"}), has_family=lambda name: True)
    no_sequences = SimpleNamespace(index=SimpleNamespace(items={"x": "3"}), has_family=lambda name: False)
    assert ModelArguments().id_embedding_init == "auto"
    assert resolve_id_init(ModelArguments(), flat) == "typed-collaborative"
    assert resolve_id_init(ModelArguments(), no_sequences) == "typed"
    assert resolve_id_init(ModelArguments(), levels) == "random"  # collaborative ids: level tokens are shared
    assert resolve_id_init(ModelArguments(id_form="text"), flat) == "random"
    assert resolve_id_init(ModelArguments(), flat, model_name_or_path="ckpt") == "random"  # keep a checkpoint's rows
    with pytest.raises(ValueError, match="one token per item"):
        resolve_id_init(ModelArguments(id_embedding_init="typed"), levels)
    with pytest.raises(ValueError, match="needs id tokens"):
        ModelArguments(id_form="text", id_embedding_init="collaborative")
