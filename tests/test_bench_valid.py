"""bench/mi_valid.py: validation scores kept beside the run's configuration, merged across partial evaluations,
and the table rebuilt from them."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def mi_valid(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("mi_valid", ROOT / "bench" / "mi_valid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "OUT", tmp_path / "out")
    return mod


def _part(run: Path, name: str, families: dict, baselines: dict, gains: dict, mtime: int) -> None:
    f = run / f"results-valid-{name}.json"
    f.write_text(json.dumps({"families": families, "baselines": baselines, "templates": {},
                             "prompt_reliance": {"families": gains}, "eval_config": {"split": "valid"}}))
    os.utime(f, (mtime, mtime))


def test_collect_merges_partial_evaluations_and_table_rebuilds(mi_valid, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"seed": 7, "render": {
        "renders": {"sequential": 3, "direct": 2, "rating": 4, "explanation": 6, "review": 6}}}))
    _part(run, "a", {"rating": {"rating": {"seen": {"RMSE_expected": 0.95}}}},
          {"rating": {"global mean": {"RMSE": 0.96}}}, {"rating": {"seen": {"gain": 0.05}}}, 1000)
    _part(run, "b", {"explanation": {"text": {"seen": {"ROUGE-L": 11.4}}}},
          {"explanation": {"nearest training explanation": {"ROUGE-L": 12.16}}},
          {"explanation": {"seen": {"gain": -0.0001}}}, 2000)
    mi_valid.collect("x2", run)
    kept = json.loads((tmp_path / "out" / "x2.json").read_text())
    assert set(kept["families"]) == {"rating", "explanation"} and kept["seed"] == 7
    assert [p["file"] for p in kept["parts"]] == ["results-valid-a.json", "results-valid-b.json"]
    row = next(line for line in mi_valid.table().splitlines() if line.startswith("| x2 "))
    assert "| 7 | 3/2/4/6/6 |" in row and "| .9500 |" in row and "| 11.40 |" in row
    assert "– / – / .9600 / 12.16" in row and "rating .0500, explanation -.0001" in row


def test_collect_never_replaces_a_kept_variant_unasked(mi_valid, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"seed": 1}))
    _part(run, "a", {}, {}, {}, 1000)
    mi_valid.collect("v", run)
    kept = (tmp_path / "out" / "v.json").read_text()
    with pytest.raises(SystemExit, match="exists: pick another name, or pass --overwrite"):
        mi_valid.collect("v", run)
    assert (tmp_path / "out" / "v.json").read_text() == kept
    mi_valid.collect("v", run, overwrite=True)


def test_collect_without_validation_results_says_what_to_run(mi_valid, tmp_path):
    with pytest.raises(SystemExit, match="p5rec evaluate --run"):
        mi_valid.collect("none", tmp_path)


def test_a_family_scored_in_two_parts_gets_the_mean_of_all_its_templates(mi_valid, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"seed": 1, "data": {"families": "direct"},
                                                     "render": {"renders": {"direct": 2, "rating": 4}}}))
    proto = "yes/no over candidates"
    for name, scores, mtime in (("a", {"5-1": 0.20, "5-3": 0.10}, 1000), ("b", {"5-2": 0.05, "5-4": 0.05}, 2000)):
        f = run / f"results-valid-{name}.json"
        templates = {t: {"family": "direct", "protocol": proto, "seen": True, "metrics": {"NDCG@10": v}}
                     for t, v in scores.items()}
        part_mean = sum(scores.values()) / len(scores)
        f.write_text(json.dumps({"templates": templates, "baselines": {},
                                 "families": {"direct": {proto: {"seen": {"NDCG@10": part_mean}, "unseen": {}}}}}))
        os.utime(f, (mtime, mtime))
    mi_valid.collect("split", run)
    kept = json.loads((tmp_path / "out" / "split.json").read_text())
    assert kept["families"]["direct"][proto]["seen"]["NDCG@10"] == pytest.approx(0.10)  # not part b's .05
    assert kept["renders"] == {"direct": 2}  # only the families the run trained
    row = next(line for line in mi_valid.table().splitlines() if line.startswith("| split "))
    assert "| –/2/–/–/– |" in row and "| .1000 |" in row


def test_seed_table_sets_each_seed_against_its_own_splits_baseline(mi_valid, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, seed, rmse, mean_rmse, ndcg in (("a", 42, 0.94, 0.95, 0.10), ("a-s1", 1, 0.86, 0.85, None)):
        families = {"rating": {"rating": {"seen": {"RMSE_expected": rmse}}}}
        if ndcg is not None:
            families["direct"] = {"yes/no over candidates": {"seen": {"NDCG@10": ndcg}}}
        (out / f"{name}.json").write_text(json.dumps({"seed": seed, "families": families, "baselines": {
            "rating": {"global mean": {"RMSE": mean_rmse}}, "direct": {"popularity": {"NDCG@10": 0.17}}}}))
    row = mi_valid.seed_table({"A": ["a", "a-s1"]}).splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["A", "42, 1"]
    assert cells[2] == "**-0.0700** (-0.0700 / –)"  # yes/no: scored at one seed only, the mean of that one
    assert cells[5] == "**+0.0000** (+0.0100 / -0.0100)"  # rating: lower is better, each against its own mean
    with pytest.raises(SystemExit, match="no such variant"):
        mi_valid.seed_table({"B": ["missing"]})
