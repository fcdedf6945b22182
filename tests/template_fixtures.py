"""A tiny fake prepared dataset with the interface templates.py reads (docs/design.md §2).

Raw ids are "U<n>" / "A<n>" and the index maps them to "<n>", so surfaces are predictable:
item A5 -> "<i5>" (token form) or "item_5" (text form); user U2 -> "<u2>" / "user_2".
"""

from __future__ import annotations

import math

import numpy as np
from datasets import Dataset, DatasetDict

SEQUENCES = {
    "U1": ["A1", "A2", "A3", "A4", "A5", "A6"],
    "U2": ["A2", "A5", "A9", "A3", "A7"],
    "U3": ["A4", "A8", "A10", "A11", "A1"],
    "U4": ["A12", "A6", "A7", "A2", "A9", "A5"],
}
NAMES = {"U1": "Alice", "U2": "", "U3": "Carol", "U4": "Dan"}
CATALOGUE = [f"A{i}" for i in range(1, 21)]
RATINGS = [5.0, 4.0, 3.0, 2.0, 1.0, 4.5]
FEATURES = ["battery", "screen", "price", "size", "sound", "colour"]


class FakeIndex:
    """Index duck type: ``user_text(raw, form)``, ``item_text(raw, form)``."""

    def __init__(self):
        self.calls = 0

    def user_text(self, raw: str, form: str = "token") -> str:
        self.calls += 1
        n = raw.lstrip("U")
        return f"<u{n}>" if form == "token" else f"user_{n}"

    def item_text(self, raw: str, form: str = "token") -> str:
        self.calls += 1
        if not raw.startswith("A"):
            raise KeyError(f"unknown item {raw!r}")
        n = raw[1:]
        return f"<i{n}>" if form == "token" else f"item_{n}"


class FakePrepared:
    """``family(name)``, ``index``, ``user_items()``, ``saved_candidates()``, ``training_sequences()``,
    ``catalogue``, ``items``, ``interactions``."""

    def __init__(self, with_titles: bool = True, nan_rating: bool = False, seed: int = 0):
        self.index = FakeIndex()
        self.catalogue = list(CATALOGUE)
        self.items = (
            Dataset.from_dict({"item": CATALOGUE, "title": [f"Gadget {i[1:]} deluxe" for i in CATALOGUE]})
            if with_titles
            else None
        )
        rng = np.random.default_rng(seed)
        rows = []
        for u, seq in SEQUENCES.items():
            for t, it in enumerate(seq):
                rows.append(dict(user=u, item=it, rating=RATINGS[(t + len(u)) % len(RATINGS)], timestamp=t,
                                 review=f"the {FEATURES[t]} of this thing is fine and works",
                                 summary=f"ok {FEATURES[t]}", user_name=NAMES[u]))
        if nan_rating:
            rows[0]["rating"] = math.nan
        self.interactions = Dataset.from_list(rows)

        seq_splits = {"train": [], "valid": [], "test": []}
        direct = {"train": [], "valid": [], "test": []}
        for u, seq in SEQUENCES.items():
            train_part = seq[:-2]
            for t in range(1, len(train_part)):
                seq_splits["train"].append(dict(user=u, history=train_part[:t], target=train_part[t]))
            for it in train_part:
                direct["train"].append(dict(user=u, target=it))
            for split, hist, target in (("valid", seq[:-2], seq[-2]), ("test", seq[:-1], seq[-1])):
                seq_splits[split].append(dict(user=u, history=hist, target=target))
                negs = [i for i in CATALOGUE if i not in seq][:99]
                cands = [target] + negs
                rng.shuffle(cands)
                direct[split].append(dict(user=u, target=target, candidates=list(cands)))

        reviews = {"train": [], "valid": [], "test": []}
        expl = {"train": [], "valid": [], "test": []}
        for k, r in enumerate(rows):
            split = "valid" if k % 10 == 8 else "test" if k % 10 == 9 else "train"
            reviews[split].append(dict(user=r["user"], item=r["item"], rating=r["rating"], review=r["review"],
                                       summary=r["summary"], user_name=r["user_name"], timestamp=r["timestamp"]))
            feat = FEATURES[r["timestamp"]]
            expl[split].append(dict(user=r["user"], item=r["item"], rating=r["rating"], feature=feat,
                                    explanation=f"the {feat} is really good", user_name=r["user_name"]))
        self._families = {
            "sequential": DatasetDict({s: Dataset.from_list(v) for s, v in seq_splits.items()}),
            "direct": DatasetDict({s: Dataset.from_list(v) for s, v in direct.items()}),
            "reviews": DatasetDict({s: Dataset.from_list(v) for s, v in reviews.items()}),
            "explanation": DatasetDict({s: Dataset.from_list(v) for s, v in expl.items()}),
        }

    def family(self, name: str) -> DatasetDict:
        """By family name, as PreparedDataset.family: rating and review read the `reviews` table."""
        return self._families[{"rating": "reviews", "review": "reviews"}.get(name, name)]

    def user_items(self) -> dict[str, set[str]]:
        return {u: set(seq) for u, seq in SEQUENCES.items()}

    def saved_candidates(self, split: str) -> dict[str, list[str]]:
        table = self.family("direct")[split]
        return dict(zip(table["user"], table["candidates"]))

    def training_sequences(self) -> dict[str, list[str]]:
        return {u: seq[:-2] for u, seq in SEQUENCES.items()}
