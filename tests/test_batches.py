"""The training sampler's batches: grouped by length (the default), or by family and then length."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset

from p5rec.train.trainer import FAMILY_MEGA_BATCHES, GroupedByLength
from p5rec.train.training import _grouping_keys


def _mixture(n: int = 6400, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    families = rng.choice(["direct", "explanation", "rating", "review", "sequential"], size=n,
                          p=[0.13, 0.18, 0.30, 0.22, 0.17])
    lengths = rng.integers(8, 60, size=n)
    return Dataset.from_dict({"family": families.tolist(),
                              "input_ids": [[1] * int(k) for k in lengths],
                              "labels": [[1] * 3 for _ in lengths]})


def _batches(ds: Dataset, grouping: str, mega: int, batch: int = 32) -> list[list[int]]:
    torch.manual_seed(0)
    order = list(GroupedByLength(_grouping_keys(ds, grouping), batch, mega, shuffle_batches=grouping == "family"))
    assert sorted(order) == list(range(len(ds)))  # every row once
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def _single_family_share(ds: Dataset, batches) -> float:
    fam = np.asarray(ds["family"])
    return float(np.mean([len(set(fam[b])) == 1 for b in batches]))


def test_family_grouping_fills_most_batches_from_one_family_and_length_grouping_mixes_them():
    ds = _mixture()
    by_family = _batches(ds, "family", FAMILY_MEGA_BATCHES)
    by_length = _batches(ds, "length", 8)
    assert _single_family_share(ds, by_family) >= 0.8
    assert _single_family_share(ds, by_length) <= 0.1
    # within one family's batches, rows still come sorted by length (the padding the default saves)
    lengths = np.asarray([len(x) for x in ds["input_ids"]])
    fam = np.asarray(ds["family"])
    one = [b for b in by_family if len(set(fam[b])) == 1][1]
    assert list(lengths[one]) == sorted(lengths[one], reverse=True)
    # the batches come in random order: a mega-batch does not always end with the same family
    last = [fam[by_family[i][0]] for i in range(FAMILY_MEGA_BATCHES - 1, len(by_family), FAMILY_MEGA_BATCHES)]
    assert len(set(last)) > 1


def test_flags_that_contradict_each_other_stop_training_with_one_line(tmp_path, capsys):
    from p5rec.train.training import main

    out = tmp_path / "run"
    assert main(["--output_dir", str(out), "--batch_grouping", "family", "--train_sampling_strategy", "random"]) == 2
    assert main(["--output_dir", str(out), "--id_form", "text", "--id_embedding_init", "collaborative"]) == 2
    assert main(["--output_dir", str(out), "--family_loss_weights", "rating=two"]) == 2
    assert main(["--output_dir", str(out), "--families", "rating,review", "--family_loss_weights", "sequential=0.1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "train: --batch_grouping family sorts the length-grouped sampler's mega-batches: it needs "
        "--train_sampling_strategy group_by_length (got random)",
        "train: --id_embedding_init collaborative needs id tokens (--id_form token)",
        "train: --family_loss_weights: expected family=weight (a number >= 0), got 'rating=two'",
        "train: --family_loss_weights: ['sequential'] not among the trained families (--families rating,review)",
    ]
    assert not out.exists()  # refused before anything was written
