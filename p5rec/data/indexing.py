"""User/item id schemes (how a raw id becomes the id a model reads), fitted on training data only.

Three strategies, after Hua et al. 2023, "How to Index Item IDs for Recommendation Foundation Models":

* ``random`` (default): a seeded permutation of the sorted training items, ids ``1..N``. No information leaks
  through the ids.
* ``sequential``: P5's scheme, items numbered by first appearance walking users in sorted order. Items adjacent
  in sequences get consecutive numbers and so share sub-word tokens in ``text`` form: that leaks the test item
  (Rajput et al., Hua et al.). Kept for reproducing P5's numbers; a warning is logged.
* ``collaborative``: items that co-occur in training sequences share id prefixes. A co-occurrence graph over
  training items (see :func:`cooccurrence`) is clustered recursively by spectral clustering into
  ``n_clusters`` groups until a group has at most ``n_clusters`` items; an item's id is its cluster path plus
  its position in the leaf, e.g. ``"3-0-12"``. Ids have a variable number of levels (deeper where clusters are
  big); Beauty (12,101 items, ``n_clusters=20``) gets 3-6 levels, ``levels`` = ``[21, 20, 20, 20, 20, 15]``.

"Training" means each user's sequence minus its last two items (:func:`p5rec.data.splits.training_part`). Items seen
only in held-out positions get ids after all training items, in sorted raw-id order, so changing held-out
interactions never changes a training item's id.

Rendering (design.md §3): ``token`` form is one added vocabulary token per id piece (``<u17>``, ``<i532>``,
collaborative ``<a3><b0><c12>``); ``text`` form is P5's ``user_17`` / ``item_532`` / ``item_3_0_12``.
"""

from __future__ import annotations

import json
import logging
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.cluster.vq import kmeans2
from scipy.sparse.linalg import LinearOperator, lobpcg

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "sequential", "collaborative")
FORMS = ("token", "text")
LEVEL_LETTERS = string.ascii_lowercase[:8]  # a..h; stops before "i" and "u" (the item/user token prefixes)


@dataclass
class Index:
    """Raw id -> strategy id for users and items (values are strings: ``"17"`` or ``"3-0-12"``).

    ``levels`` (collaborative only): number of distinct values at each level of the item ids.
    """

    strategy: str
    users: dict[str, str]
    items: dict[str, str]
    levels: list[int] | None = None
    _reverse: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # ---------------------------------------------------------------- I/O
    def to_json(self, path: str | Path) -> None:
        data = {"strategy": self.strategy, "users": self.users, "items": self.items, "levels": self.levels}
        Path(path).write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | Path) -> "Index":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(data["strategy"], data["users"], data["items"], data.get("levels"))

    # ---------------------------------------------------------------- rendering
    def user_text(self, raw: str, form: str = "token") -> str:
        try:
            uid = self.users[raw]
        except KeyError:
            raise KeyError(f"unknown user {raw!r} (not in the training catalogue of this index)") from None
        return _render(uid, "u", "user", form)

    def item_text(self, raw: str, form: str = "token") -> str:
        try:
            iid = self.items[raw]
        except KeyError:
            raise KeyError(f"unknown item {raw!r} (not in the training catalogue of this index)") from None
        return _render(iid, "i", "item", form)

    def item_tokens(self, form: str = "token") -> list[str]:
        """Every distinct added token the item surfaces need (``text`` form adds none: digits are split)."""
        return _tokens(self.items.values(), "i", form)

    def user_tokens(self, form: str = "token") -> list[str]:
        return _tokens(self.users.values(), "u", form)

    def item_from_text(self, surface: str, form: str = "token") -> str | None:
        """Raw item id of a rendered surface (e.g. a generated ``<i532>``), or None if it names no item."""
        key = ("item", form)
        if key not in self._reverse:
            self._reverse[key] = {self.item_text(r, form): r for r in self.items}
        return self._reverse[key].get(surface.strip())

    def user_from_text(self, surface: str, form: str = "token") -> str | None:
        key = ("user", form)
        if key not in self._reverse:
            self._reverse[key] = {self.user_text(r, form): r for r in self.users}
        return self._reverse[key].get(surface.strip())


def _render(value: str, prefix: str, word: str, form: str) -> str:
    if form == "token":
        if "-" in value:
            return "".join(f"<{LEVEL_LETTERS[d]}{v}>" for d, v in enumerate(value.split("-")))
        return f"<{prefix}{value}>"
    if form == "text":
        return f"{word}_{value.replace('-', '_')}"
    raise ValueError(f"unknown id form {form!r}; expected one of {FORMS}")


def _tokens(values: Iterable[str], prefix: str, form: str) -> list[str]:
    if form == "text":
        return []
    if form != "token":
        raise ValueError(f"unknown id form {form!r}; expected one of {FORMS}")
    pieces: set[tuple[int, int]] = set()
    flat: set[int] = set()
    for v in values:
        if "-" in v:
            pieces.update((d, int(x)) for d, x in enumerate(v.split("-")))
        else:
            flat.add(int(v))
    out = [f"<{prefix}{v}>" for v in sorted(flat)]
    out += [f"<{LEVEL_LETTERS[d]}{v}>" for d, v in sorted(pieces)]
    return out


# ------------------------------------------------------------------------------------------------ fitting
def fit_index(
    train_sequences: dict[str, list[str]],
    *,
    strategy: str = "random",
    seed: int = 42,
    items: Iterable[str] = (),
    users: Iterable[str] = (),
    n_clusters: int = 20,
    window: int = 5,
) -> Index:
    """Fit an :class:`Index` on ``train_sequences`` (user -> training part of its time-ordered sequence).

    ``items`` / ``users``: every other raw id the index must cover (held-out items, users without training
    items); they are numbered after the training ones, in sorted order, and cannot affect training ids.
    ``n_clusters`` / ``window``: collaborative only (see :func:`collaborative_ids`, :func:`cooccurrence`).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown index strategy {strategy!r}; expected one of {STRATEGIES}")
    all_users = sorted(set(train_sequences) | set(users))
    if strategy == "sequential":
        seen: dict[str, None] = {}
        for u in sorted(train_sequences):
            for it in train_sequences[u]:
                seen.setdefault(it, None)
        train_items = list(seen)
    else:
        train_items = sorted({it for seq in train_sequences.values() for it in seq})
    held_out = sorted(set(items) - set(train_items))
    rng = np.random.default_rng(seed)
    levels = None
    if strategy == "random":
        item_ids = {raw: str(i + 1) for raw, i in zip(train_items, rng.permutation(len(train_items)))}
        user_ids = {raw: str(i + 1) for raw, i in zip(all_users, rng.permutation(len(all_users)))}
    elif strategy == "sequential":
        logger.warning(
            "index strategy 'sequential' (P5's scheme) numbers items by first appearance: items adjacent in "
            "sequences share sub-word tokens, which leaks the answer; prefer 'random' or 'collaborative'"
        )
        item_ids = {raw: str(i + 1) for i, raw in enumerate(train_items)}
        user_ids = {raw: str(i + 1) for i, raw in enumerate(all_users)}
    else:
        item_ids, levels = collaborative_ids(train_sequences, train_items, held_out, n_clusters, window, seed)
        user_ids = {raw: str(i + 1) for i, raw in enumerate(all_users)}
    if strategy != "collaborative":
        for j, raw in enumerate(held_out):
            item_ids[raw] = str(len(train_items) + j + 1)
    items_sorted = {raw: item_ids[raw] for raw in sorted(item_ids)}
    if len(set(items_sorted.values())) != len(items_sorted):  # a bug, never a data problem
        raise AssertionError(f"{strategy} index produced duplicate item ids")
    return Index(strategy, {u: user_ids[u] for u in sorted(user_ids)}, items_sorted, levels)


def cooccurrence(train_sequences: dict[str, list[str]], items: list[str], window: int = 5) -> sp.csr_matrix:
    """Symmetric item-item co-occurrence counts: items within ``window`` positions of each other in a user's
    training sequence (``window=1``: adjacent only). A window rather than "same user" keeps long sequences from
    linking everything to everything while, for the short Amazon sequences (median ~6 training items), it is
    close to "same user". Rows/columns follow ``items``.
    """
    pos = {it: i for i, it in enumerate(items)}
    codes, seq_id = [], []
    for s, u in enumerate(sorted(train_sequences)):
        seq = train_sequences[u]
        codes.extend(pos[it] for it in seq)
        seq_id.extend([s] * len(seq))
    codes = np.asarray(codes, dtype=np.int64)
    seq_id = np.asarray(seq_id, dtype=np.int64)
    rows, cols = [], []
    for d in range(1, window + 1):
        same = seq_id[:-d] == seq_id[d:]
        rows.append(codes[:-d][same])
        cols.append(codes[d:][same])
    r, c = np.concatenate(rows) if rows else np.empty(0, np.int64), np.concatenate(cols) if cols else np.empty(0, np.int64)
    keep = r != c
    r, c = r[keep], c[keep]
    n = len(items)
    a = sp.coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n)).tocsr()
    return (a + a.T).tocsr()


def collaborative_ids(
    train_sequences: dict[str, list[str]],
    train_items: list[str],
    held_out: list[str],
    n_clusters: int = 20,
    window: int = 5,
    seed: int = 42,
    max_spectral_depth: int = 4,
) -> tuple[dict[str, str], list[int]]:
    """Collaborative ids: cluster path + leaf position, e.g. ``"3-0-12"``.

    Top level: the spectral clusters of the items with at least one co-occurrence, then (if any) one group for
    training items with no co-occurrence, then one for held-out-only items; the last two are cut into balanced
    chunks in sorted raw-id order, deterministically. Below ``max_spectral_depth`` levels, or where spectral
    clustering fails to split a group (one cluster only), groups are also cut into chunks, which bounds the depth.
    Every id has at least two levels. Returns (raw -> id, number of distinct values per level).
    """
    if n_clusters < 2:
        raise ValueError("n_clusters must be >= 2")
    adj = cooccurrence(train_sequences, train_items, window)
    deg = np.asarray(adj.sum(axis=1)).ravel()
    linked = np.nonzero(deg > 0)[0]
    lonely = np.nonzero(deg == 0)[0]
    n_train = len(train_items)
    top: list[np.ndarray] = []
    if len(linked) > n_clusters:
        top += _spectral_split(adj, linked, n_clusters, np.random.default_rng([seed, 0]))
    elif len(linked):
        top.append(linked)
    if len(lonely):
        top.append(lonely)
    if held_out:
        top.append(np.arange(n_train, n_train + len(held_out)))
    names = list(train_items) + list(held_out)
    paths: dict[int, list[int]] = {}
    stack = [(grp, [g], g < len(top) - (1 if len(lonely) else 0) - (1 if held_out else 0)) for g, grp in enumerate(top)]
    while stack:
        members, prefix, spectral = stack.pop()
        if len(members) <= n_clusters:
            for j, m in enumerate(members):
                paths[int(m)] = prefix + [j]
            continue
        groups = None
        if spectral and len(prefix) < max_spectral_depth:
            groups = _spectral_split(adj, members, n_clusters, np.random.default_rng([seed, *prefix, 1]))
        if groups is None or len(groups) < 2:
            groups, spectral = _chunks(members, n_clusters), False
        for g, grp in enumerate(groups):
            stack.append((grp, prefix + [g], spectral))
    ids = {names[m]: "-".join(map(str, p)) for m, p in paths.items()}
    depth = max(len(p) for p in paths.values()) if paths else 0
    if depth > len(LEVEL_LETTERS):
        raise ValueError(f"collaborative ids are {depth} levels deep; raise n_clusters")
    levels = [0] * depth
    for p in paths.values():
        for d, v in enumerate(p):
            levels[d] = max(levels[d], v + 1)
    return ids, levels


def _chunks(members: np.ndarray, k: int) -> list[np.ndarray]:
    """Balanced contiguous chunks in member order (sorted raw-id order), at most ``k``."""
    return [c for c in np.array_split(np.sort(members), min(k, len(members))) if len(c)]


def _spectral_split(adj: sp.csr_matrix, members: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray] | None:
    """Spectral clustering of the subgraph on ``members`` into at most ``k`` groups (ordered by smallest member).

    Regularised spectral clustering (Amini et al. 2013): the affinity gets ``tau/n`` added everywhere
    (``tau`` = mean degree), which keeps disconnected pieces and tiny components from each grabbing an
    eigenvector. Top-``k`` eigenvectors of ``D^-1/2 A_tau D^-1/2`` (dense LAPACK up to 1000 items, else LOBPCG on
    a sparse LinearOperator), rows L2-normalised, k-means++ (``scipy.cluster.vq.kmeans2`` with the seeded ``rng``).
    Returns None if the subgraph has no edges.
    """
    members = np.sort(members)
    sub = adj[members][:, members].tocsr()
    n = len(members)
    deg = np.asarray(sub.sum(axis=1)).ravel()
    tau = float(deg.mean())
    if tau == 0:
        return None
    dinv = 1.0 / np.sqrt(deg + tau)
    kk = min(k, n - 1)
    if n <= 1000:  # dense LAPACK, top-kk pairs only
        m = (sub.toarray() + tau / n) * dinv[:, None] * dinv[None, :]
        _, vecs = scipy.linalg.eigh(m, subset_by_index=[n - kk, n - 1], driver="evr")
    else:
        # LOBPCG from a seeded start block, on a LinearOperator so the regularised matrix stays sparse. Not ARPACK
        # (eigsh): its restarts draw from a random state saved inside the Fortran library, which made the ids
        # differ from run to run.
        def matvec(x):
            x = np.asarray(x).reshape(n, -1)
            y = dinv[:, None] * x
            return dinv[:, None] * (sub @ y + (tau / n) * y.sum(axis=0, keepdims=True))

        op = LinearOperator((n, n), matvec=matvec, matmat=matvec, dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not reaching the requested tolerance": a clustering needs no more
            _, vecs = lobpcg(op, rng.standard_normal((n, kk)), largest=True, tol=1e-4, maxiter=300)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    emb = vecs / np.where(norms > 0, norms, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "One of the clusters is empty": handled below
        _, labels = kmeans2(emb, kk, minit="++", iter=20, rng=rng)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first)  # groups ordered by their smallest member: deterministic, label-independent
    return [members[inverse == lab] for lab in order]
