"""Collaborative start for the id rows of the embedding (``--id_embedding_init collaborative``).

A 1.7 M-parameter T5 trained for one epoch of the main job learns each family's marginal and not the part that
depends on the user or the item: every id row is trained only by the few prompts that name it (an MI user
appears in about seven reviews), so it barely leaves its random start (bench/README.md, "What was tried for the
families that lose"). What an id row should hold is known before training starts, from the training
interactions alone: how popular the item is, how active the user is, how the user and the item deviate from the
mean rating, and where they sit in the user-item graph. This module computes those coordinates; training writes
them into the first columns of each id row, and the rest of the row keeps its random start. The model then
learns one shared read-out (many examples) instead of thousands of separate rows (a few examples each).

Everything comes from the training part of the split (each user's training sequence, the training reviews), so
no validation or test interaction reaches the model through its initial weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

logger = logging.getLogger(__name__)

# log-count, rating bias
SCALAR_FEATURES = 2


@dataclass
class IdVectors:
    """Rows of ``dim`` standardized coordinates per raw user / item id (``users[raw]``, ``items[raw]``)."""

    users: dict[str, np.ndarray]
    items: dict[str, np.ndarray]
    dim: int


def _standardize(*blocks: np.ndarray) -> list[np.ndarray]:
    """Scale each column to unit std over the rows of all blocks together (so user . item keeps its meaning)."""
    stacked = np.concatenate(blocks, axis=0)
    mean = stacked.mean(axis=0)
    std = stacked.std(axis=0)
    std[std == 0] = 1.0
    return [(b - mean) / std for b in blocks]


def collaborative_vectors(train_pairs: tuple[list[str], list[str]], users: list[str], items: list[str],
                          ratings: tuple[list[str], list[str], list[float]] | None = None,
                          dim: int = 16, seed: int = 0) -> IdVectors:
    """``dim`` coordinates per user and item from the training interactions.

    Args:
        train_pairs: parallel raw (user, item) lists, one per training interaction.
        users, items: every raw id the index knows (ids without training interactions get zeros before scaling).
        ratings: parallel (user, item, rating) lists of training reviews, or None where the data has no stars.
        dim: coordinates per id: log-count, rating bias (0 without ratings), then ``dim - 2`` spectral factors
            of the degree-normalized user-item matrix (U sqrt(S) for users, V sqrt(S) for items).
    """
    if dim < SCALAR_FEATURES + 1:
        raise ValueError(f"collaborative id vectors need at least {SCALAR_FEATURES + 1} coordinates, got {dim}")
    u_pos = {u: j for j, u in enumerate(users)}
    i_pos = {i: j for j, i in enumerate(items)}
    pu, pi = train_pairs
    keep = [(u_pos[a], i_pos[b]) for a, b in zip(pu, pi) if a in u_pos and b in i_pos]
    if not keep:
        raise ValueError("collaborative id vectors: no training interaction names a known user and item")
    rows, cols = map(np.asarray, zip(*keep))
    x = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(users), len(items)))
    x.data[:] = 1.0  # repeated interactions count once
    du = np.asarray(x.sum(axis=1)).ravel()
    di = np.asarray(x.sum(axis=0)).ravel()

    u_feat = np.zeros((len(users), dim))
    i_feat = np.zeros((len(items), dim))
    u_feat[:, 0] = np.log1p(du)
    i_feat[:, 0] = np.log1p(di)
    if ratings is not None:
        from p5rec.eval.baselines import BiasedMF

        mf = BiasedMF().fit(*ratings)
        for raw, j in mf.user_index.items():
            if raw in u_pos:
                u_feat[u_pos[raw], 1] = mf.user_bias[j]
        for raw, j in mf.item_index.items():
            if raw in i_pos:
                i_feat[i_pos[raw], 1] = mf.item_bias[j]

    k = min(dim - SCALAR_FEATURES, min(x.shape) - 1)
    if k >= 1:
        norm = sp.diags(1.0 / np.sqrt(np.maximum(du, 1))) @ x @ sp.diags(1.0 / np.sqrt(np.maximum(di, 1)))
        rng = np.random.default_rng(seed)
        u, s, vt = svds(norm.astype(np.float64), k=k, v0=rng.standard_normal(min(norm.shape)))
        order = np.argsort(-s)
        root = np.sqrt(s[order])
        u_feat[:, SCALAR_FEATURES:SCALAR_FEATURES + k] = u[:, order] * root
        i_feat[:, SCALAR_FEATURES:SCALAR_FEATURES + k] = vt[order].T * root
    # scalar features are standardized per side (a user's count and an item's count are different quantities);
    # spectral factors jointly, so that a user's and an item's coordinates stay comparable
    u_feat[:, :SCALAR_FEATURES] = _standardize(u_feat[:, :SCALAR_FEATURES])[0]
    i_feat[:, :SCALAR_FEATURES] = _standardize(i_feat[:, :SCALAR_FEATURES])[0]
    u_feat[:, SCALAR_FEATURES:], i_feat[:, SCALAR_FEATURES:] = _standardize(
        u_feat[:, SCALAR_FEATURES:], i_feat[:, SCALAR_FEATURES:])
    return IdVectors(users=dict(zip(users, u_feat)), items=dict(zip(items, i_feat)), dim=dim)


def prepared_vectors(prepared, dim: int = 16, seed: int = 0) -> IdVectors:
    """:func:`collaborative_vectors` from a prepared dataset's training part: each user's training sequence (the
    history of their validation case) and, where the data has stars, the training reviews."""
    index = prepared.index
    seqs = prepared.training_sequences()
    pu = [u for u, items in seqs.items() for _ in items]
    pi = [i for items in seqs.values() for i in items]
    return collaborative_vectors((pu, pi), sorted(index.users), sorted(index.items), prepared.training_ratings(),
                                 dim, seed)


def write_rows(weight, tokenizer, index, vectors: IdVectors | None, users: bool = True, typed: float = 0.0,
               seed: int = 0) -> int:
    """Write ``vectors`` into the first ``vectors.dim`` columns of each flat id token's embedding row, at the scale
    of the rows' current entries. Returns how many rows were written. Multi-level ids (``<a3><b1>``) are refused:
    a level token is shared by many items and has no vector of its own.

    ``typed`` > 0 also makes the rest of each row one vector shared by every item (another for every user) plus
    noise of ``typed`` times its scale: every id token then carries a common "this is an item" direction, which
    attention can learn to find (as P5's whole-word embeddings mark an id's pieces), where independent random rows
    give it nothing in common to look for."""
    import torch

    if any("-" in v for v in index.items.values()):
        raise ValueError("--id_embedding_init collaborative needs one token per item (--index random or sequential)")
    if vectors is not None and vectors.dim > weight.shape[1]:
        raise ValueError(f"collaborative id vectors have {vectors.dim} coordinates; the embedding has {weight.shape[1]}")
    dim = vectors.dim if vectors is not None else 0
    sides = [(index.item_text, sorted(index.items), vectors.items if vectors else None)]
    if users:
        sides.append((index.user_text, sorted(index.users), vectors.users if vectors else None))
    rng = np.random.default_rng(seed)
    written = 0
    with torch.no_grad():
        scale = None
        for text, raws, table in sides:
            rows_t = torch.as_tensor(tokenizer.convert_tokens_to_ids([text(r, "token") for r in raws]))
            scale = scale if scale is not None else weight[rows_t].std().item()
            if table is not None:
                weight[rows_t, :dim] = torch.as_tensor(np.stack([table[r] for r in raws]), dtype=weight.dtype) * scale
            if typed > 0:
                rest = weight.shape[1] - dim
                shared = rng.standard_normal(rest)
                noise = rng.standard_normal((len(raws), rest)) * typed
                weight[rows_t, dim:] = torch.as_tensor((shared + noise) * scale, dtype=weight.dtype)
            written += len(raws)
    logger.info("id rows: %d written (%d coordinates from the interactions%s), scale %.3f", written, dim,
                f", a shared type vector + {typed:g} noise" if typed > 0 else "", scale)
    return written
