"""bench/mi_probe.py on the tiny run: the expected-star probe on both splits, the yes/no probe beside popularity,
and the series over a run's checkpoints (each made openable as a run)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mi_probe():
    spec = importlib.util.spec_from_file_location("mi_probe", ROOT / "bench" / "mi_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rating_probe_reports_both_splits(mi_probe, tiny_run):
    out = mi_probe.rating(mi_probe._open(tiny_run), n=20)
    for split in ("train", "valid"):
        r = out[split]
        assert 0 < r["n"] <= 20 and 1.0 <= r["mean"] <= 5.0 and r["spread"] >= 0
        assert r["RMSE_expected"] > 0 and r["RMSE_split_mean"] >= 0


def test_yesno_probe_scores_the_model_beside_popularity(mi_probe, tiny_run):
    out = mi_probe.yesno(mi_probe._open(tiny_run), users=3)
    assert out["users"] == 3 and 0 <= out["NDCG@10"] <= 1 and 0 <= out["popularity NDCG@10"] <= 1
    assert -1 <= out["spearman_with_popularity"] <= 1


def test_ensemble_probe_ranks_by_the_mean_over_templates(mi_probe, tiny_run):
    out = mi_probe.ensemble(mi_probe._open(tiny_run), split="valid")
    per = out["NDCG@10, HR@10"]
    assert len(per) >= 2 and out["users"] > 0
    assert all(0 <= v <= 1 for pair in per.values() for v in pair)
    assert out["mean of templates"][0] == pytest.approx(sum(p[0] for p in per.values()) / len(per), abs=1e-4)
    for key in ("ensemble of log-probabilities", "ensemble of probabilities"):
        assert 0 <= out[key][0] <= out[key][1] <= 1  # NDCG@10 never above HR@10


def test_series_probes_every_checkpoint_in_step_order(mi_probe, tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert mi_probe.main(["series", str(run), "--cases", "5"]) == 0
    steps = [json.loads(line)["step"] for line in capsys.readouterr().out.splitlines()]
    assert steps == sorted(steps) and len(steps) == len(list(run.glob("checkpoint-*"))) >= 2
    assert all((c / "index.json").exists() for c in run.glob("checkpoint-*"))
    with pytest.raises(SystemExit, match="not a run directory"):
        mi_probe.main(["rating", str(tmp_path)])
