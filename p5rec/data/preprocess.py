"""Cleaning the canonical interaction table: de-duplication, k-core filtering, time ordering.

Pure functions over pandas DataFrames holding the canonical columns of design.md §1 (``user``, ``item``,
``rating``, ``timestamp``, ...). Each returns a new frame plus the counts it dropped, so the caller can put
every count in the manifest. Nothing here reads files or draws random numbers.
"""

from __future__ import annotations

import logging

import pandas as pd

logger = logging.getLogger(__name__)


class PreprocessError(ValueError):
    """A cleaning step left nothing to work with (the message names the step and its parameters)."""


def deduplicate(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep one interaction per (user, item).

    Two kinds of duplicates are counted separately:

    * ``exact_duplicates``: same user, item and timestamp (a line repeated in the source); the first in file
      order is kept.
    * ``repeat_interactions``: the same user and item at different times (a re-purchase / re-review). The
      earliest is kept (ties: file order), because a recommender that predicts a user's *next new* item must
      not see the item twice in one sequence.

    Returns the de-duplicated frame (file order preserved, index reset) and the two counts.
    """
    n0 = len(df)
    exact = df.duplicated(subset=["user", "item", "timestamp"], keep="first")
    df1 = df.loc[~exact]
    # earliest occurrence of each (user, item): stable sort by time, keep first, then restore file order
    order = df1["timestamp"].sort_values(kind="mergesort").index
    first = ~df1.loc[order].duplicated(subset=["user", "item"], keep="first")
    keep = first[first].index.sort_values()
    out = df1.loc[keep].reset_index(drop=True)
    counts = {"exact_duplicates": int(exact.sum()), "repeat_interactions": int(len(df1) - len(out))}
    if len(out) == 0:
        raise PreprocessError(f"deduplicate left zero rows (input had {n0})")
    return out, counts


def kcore(df: pd.DataFrame, k: int = 5) -> tuple[pd.DataFrame, list[dict[str, int]]]:
    """Iteratively drop users and items with fewer than ``k`` interactions until every one has at least ``k``.

    Removing a user can push an item below ``k`` and the other way round, so rounds repeat until stable.
    Returns the filtered frame (original order, index reset) and one dict per round that removed something:
    ``{"round", "users_removed", "items_removed", "rows_removed"}``. ``k <= 1`` is a no-op.
    Raises :class:`PreprocessError` naming ``k`` if nothing survives.
    """
    rounds: list[dict[str, int]] = []
    if k <= 1:
        return df.reset_index(drop=True), rounds
    cur = df
    while True:
        ucount = cur["user"].map(cur["user"].value_counts())
        icount = cur["item"].map(cur["item"].value_counts())
        keep = (ucount >= k) & (icount >= k)
        if bool(keep.all()):
            break
        bad_users = cur.loc[ucount < k, "user"].nunique()
        bad_items = cur.loc[icount < k, "item"].nunique()
        removed = int((~keep).sum())
        cur = cur.loc[keep]
        rounds.append(
            {"round": len(rounds) + 1, "users_removed": int(bad_users), "items_removed": int(bad_items),
             "rows_removed": removed}
        )
        logger.debug("k-core round %d: removed %d rows", len(rounds), removed)
        if len(cur) == 0:
            raise PreprocessError(
                f"kcore(k={k}) left zero rows after {len(rounds)} round(s): no user/item set where each has >= {k} "
                "interactions; lower k (--k)"
            )
    return cur.reset_index(drop=True), rounds


def time_order(df: pd.DataFrame) -> pd.DataFrame:
    """Stable sort by (user, timestamp, item): ties in time are broken by item id, so the order is deterministic."""
    if len(df) == 0:
        raise PreprocessError("time_order: the interaction table is empty")
    return df.sort_values(["user", "timestamp", "item"], kind="mergesort").reset_index(drop=True)
