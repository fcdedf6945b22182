"""Train/valid/test splits and negative sampling, as pure functions.

* :func:`leave_one_out` - per-user time-ordered sequences; the last item is test, the second-last validation
  (the protocol of SASRec/BERT4Rec/P5 on the Amazon sequences).
* :func:`leave_one_out_rows` - the same leave-one-out applied to the rows themselves (rating / review / explanation
  families, the default): a user's last review is test and second-last validation, so no family trains on a
  (user, item) pair that another family tests.
* :func:`ratio_split` - P5's random 8:1:1 split of reviews, in which every user and item of valid/test also occurs
  in train (drawn apart from the leave-one-out: most sequential test targets are then training reviews).
* :func:`sample_negatives` / :func:`make_candidates` - 99 never-touched items per user for the direct
  (candidate-ranking) family.

Randomness only enters through an explicit ``seed`` (turned into one ``numpy.random.Generator``), so the same
input and seed give the same output on every machine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


# ----------------------------------------------------------------------------------------------- leave-one-out
def training_part(seq: list[str]) -> list[str]:
    """The part of a user's sequence a model may train on: all but the last two items (all of it if < 3)."""
    return seq[:-2] if len(seq) >= 3 else seq


@dataclass
class LeaveOneOut:
    """Result of :func:`leave_one_out`.

    ``sequences``: user -> all items in time order. ``train``/``valid``/``test``: DataFrames with columns
    ``user:str, history:list[str], target:str`` (design.md §2). ``short_users``: users with < 3 interactions,
    kept whole in the training part and absent from valid/test.
    """

    sequences: dict[str, list[str]]
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    short_users: int

    def training_sequences(self) -> dict[str, list[str]]:
        """user -> training part of the sequence (what indexes and the direct family's train split see)."""
        return {u: training_part(s) for u, s in self.sequences.items()}


def sequences_from(df: pd.DataFrame) -> dict[str, list[str]]:
    """user (sorted) -> items, in the frame's row order (call on a :func:`p5rec.data.preprocess.time_order`-ed frame)."""
    codes, users = pd.factorize(df["user"], sort=True)
    order = np.argsort(codes, kind="stable")
    items = df["item"].to_numpy(dtype=object)[order]
    pieces = np.split(items, np.cumsum(np.bincount(codes, minlength=len(users)))[:-1])
    return {u: p.tolist() for u, p in zip(users.tolist(), pieces)}


def leave_one_out(df: pd.DataFrame) -> LeaveOneOut:
    """Leave-one-out split of a time-ordered interaction frame (see :class:`LeaveOneOut`).

    train: one row per position ``t >= 1`` of the training part ``seq[:-2]``: history ``seq[:t]``, target
    ``seq[t]``; valid: ``seq[:-2] -> seq[-2]``; test: ``seq[:-1] -> seq[-1]``. Users with fewer than three
    interactions have no valid/test row; their whole sequence is the training part.
    """
    sequences = sequences_from(df)
    tr_u, tr_h, tr_t = [], [], []
    va_u, va_h, va_t, te_u, te_h, te_t = [], [], [], [], [], []
    short = 0
    for user, seq in sequences.items():
        if len(seq) < 3:
            short += 1
            part = seq
        else:
            part = seq[:-2]
            va_u.append(user), va_h.append(seq[:-2]), va_t.append(seq[-2])
            te_u.append(user), te_h.append(seq[:-1]), te_t.append(seq[-1])
        for t in range(1, len(part)):
            tr_u.append(user), tr_h.append(part[:t]), tr_t.append(part[t])
    if short:
        logger.info("leave-one-out: %d users with < 3 interactions kept in train only", short)

    def frame(u, h, t):
        return pd.DataFrame({"user": pd.Series(u, dtype=object), "history": pd.Series(h, dtype=object),
                             "target": pd.Series(t, dtype=object)})

    return LeaveOneOut(sequences, frame(tr_u, tr_h, tr_t), frame(va_u, va_h, va_t), frame(te_u, te_h, te_t), short)


def leave_one_out_rows(df: pd.DataFrame) -> np.ndarray:
    """Each row's split under :func:`leave_one_out` of its user's sequence, for the tables of rows (reviews,
    explanations): a user's last row is ``"test"``, the second-last ``"valid"``, the rest ``"train"``; every row of
    a user with fewer than three is ``"train"``. Rows are read in the frame's order within each user, as
    :func:`sequences_from` reads them (call on a time-ordered frame), so the test review of a user is exactly the
    user's sequential test target and the training reviews are exactly the training part of the sequence.

    Returns an object array of ``"train"|"valid"|"test"`` aligned with ``df``'s rows.
    """
    if not len(df):
        return np.asarray([], dtype=object)
    users = df["user"].reset_index(drop=True)
    groups = users.groupby(users, sort=False)
    from_end, size = groups.cumcount(ascending=False).to_numpy(), groups.transform("size").to_numpy()
    code = np.where(size < 3, 0, np.where(from_end == 0, 2, np.where(from_end == 1, 1, 0)))
    return np.asarray(SPLITS, dtype=object)[code]


# ----------------------------------------------------------------------------------------------- ratio split
def ratio_split(
    df: pd.DataFrame, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 42
) -> tuple[np.ndarray, int]:
    """Randomly assign each row to train/valid/test in ``ratios``, then move to train every valid/test row whose
    user or item has no train row (repeated until stable; moving rows only grows train, so one pass usually
    suffices).

    Returns ``(split, moved)``: ``split`` is an object array of ``"train"|"valid"|"test"`` aligned with ``df``'s
    rows, ``moved`` the number of rows the coverage rule moved into train.
    """
    if len(ratios) != 3 or min(ratios) < 0 or not np.isclose(sum(ratios), 1.0):
        raise ValueError(f"ratios must be three non-negative numbers summing to 1, got {ratios}")
    n = len(df)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_train = int(round(ratios[0] * n))
    n_valid = int(round(ratios[1] * n))
    code = np.zeros(n, dtype=np.int8)
    code[perm[n_train:n_train + n_valid]] = 1
    code[perm[n_train + n_valid:]] = 2
    ucode = pd.factorize(df["user"])[0]
    icode = pd.factorize(df["item"])[0]
    moved = 0
    while True:
        in_train = code == 0
        u_ok = np.bincount(ucode[in_train], minlength=ucode.max() + 1 if n else 0) > 0
        i_ok = np.bincount(icode[in_train], minlength=icode.max() + 1 if n else 0) > 0
        bad = ~in_train & ~(u_ok[ucode] & i_ok[icode])
        nbad = int(bad.sum())
        if nbad == 0:
            break
        code[bad] = 0
        moved += nbad
    return np.asarray(SPLITS, dtype=object)[code], moved


# ----------------------------------------------------------------------------------------------- negatives
def sample_negatives(
    user_items: dict[str, set[str]], catalogue: np.ndarray, n: int = 99, seed: int = 42,
    users: list[str] | None = None,
) -> dict[str, list[str]]:
    """For each user (sorted, or ``users`` in the given order), ``n`` distinct catalogue items the user never
    interacted with.

    Vectorised rejection sampling: draw a ``(users, n)`` matrix of catalogue positions, mark draws that the user
    touched or that repeat an earlier draw in the row, redraw only those, until none is marked.
    Raises ValueError if some user has fewer than ``n`` untouched items.
    """
    catalogue = np.asarray(catalogue, dtype=object)
    n_cat = len(catalogue)
    users = sorted(user_items) if users is None else list(users)
    if not users:
        return {}
    pos = pd.Index(catalogue, dtype=object)
    if not pos.is_unique:
        raise ValueError("catalogue has duplicate items")
    # (user row, catalogue position) of every interaction, as one sorted int64 key per pair; one flat lookup
    sizes = np.fromiter((len(user_items.get(u, ())) for u in users), dtype=np.int64, count=len(users))
    u_rows = np.repeat(np.arange(len(users), dtype=np.int64), sizes)
    flat = [it for u in users for it in user_items.get(u, ())]
    i_pos = pos.get_indexer(pd.Index(flat, dtype=object)).astype(np.int64) if flat else np.empty(0, np.int64)
    known = i_pos >= 0  # items outside the catalogue cannot be drawn anyway
    keys = np.unique(u_rows[known] * n_cat + i_pos[known])
    touched = np.bincount(u_rows[known], minlength=len(users))
    short = np.nonzero(n_cat - touched < n)[0]
    if len(short):
        raise ValueError(
            f"user {users[short[0]]!r} has only {n_cat - touched[short[0]]} untouched items, need {n} negatives (lower --n-negatives for a small catalogue)"
        )
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_cat, size=(len(users), n), dtype=np.int64)
    rows = np.arange(len(users))
    while len(rows):
        sub = draws[rows]
        bad = np.isin(rows[:, None] * n_cat + sub, keys)
        order = np.argsort(sub, axis=1, kind="stable")
        srt = np.take_along_axis(sub, order, axis=1)
        dup_sorted = srt[:, 1:] == srt[:, :-1]  # a later (stable) copy of the same value is the duplicate
        r_idx, c_idx = np.nonzero(dup_sorted)
        bad[r_idx, order[:, 1:][r_idx, c_idx]] = True
        if not bad.any():
            break
        sub[bad] = rng.integers(0, n_cat, size=int(bad.sum()), dtype=np.int64)
        draws[rows] = sub
        rows = rows[bad.any(axis=1)]
    names = catalogue[draws]
    return {u: names[r].tolist() for r, u in enumerate(users)}


def make_candidates(targets: dict[str, str], negatives: dict[str, list[str]], seed: int = 42) -> dict[str, list[str]]:
    """user -> ``[target] + negatives[user]`` shuffled (one seeded permutation per user, users in sorted order)."""
    users = sorted(targets)
    if not users:
        return {}
    mat = np.array([[targets[u], *negatives[u]] for u in users], dtype=object)
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random(mat.shape), axis=1)
    mat = np.take_along_axis(mat, order, axis=1)
    return {u: mat[r].tolist() for r, u in enumerate(users)}
