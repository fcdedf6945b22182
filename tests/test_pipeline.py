"""End to end on a small real slice of MI: train -> run directory -> evaluate -> reload -> resume -> predict."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from p5rec.train.training import main as train_main

from conftest import TINY


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


def test_run_directory_holds_everything(run_dir):
    for name in ["run_config.json", "versions.json", "config.json", "model.safetensors", "tokenizer.json",
                 "manifest.json", "index.json", "learning_curve.json", "results.json", "results.md",
                 "train_log.txt", "train_results.json", "learning_curve.png", "results.png", "README.md"]:
        assert (run_dir / name).exists(), name
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["seed"] == 42 and config["model"]["preset"] == "tiny"
    curve = json.loads((run_dir / "learning_curve.json").read_text())
    assert [p["step"] for p in curve] == [12, 24]
    assert {"sequential", "direct", "rating", "explanation", "review"} <= set(curve[-1])


def test_results_cover_every_family_with_baselines(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    fams = results["families"]
    assert {"sequential", "direct", "rating", "explanation", "review"} <= set(fams)
    # 4-4, the review family's unseen template, predicts a rating: its mean sits under the rating protocol
    for fam, proto in [("sequential", "full ranking"), ("rating", "rating"), ("explanation", "text"),
                       ("review", "rating"), ("direct", "candidates")]:
        assert fams[fam][proto]["seen"] and fams[fam][proto]["unseen"], fam
    assert fams["review"]["text"]["seen"]
    # a run that trained no sequence template is not scored by the continuation protocol (2-S3 is no zero-shot test)
    assert "continuation" not in fams["sequential"] and not any(t.startswith("2-S") for t in results["templates"])
    assert {"sequential", "direct", "rating", "explanation", "review"} <= set(results["baselines"])
    seq = results["templates"]["2-1"]
    assert seq["n"] == 12 and 0.0 <= seq["metrics"]["HR@10"] <= 1.0
    rating = results["templates"]["1-1"]
    assert "RMSE" in rating["metrics"] and rating["invalid"] >= 0
    md = (run_dir / "results.md").read_text()
    assert "## sequential" in md and "baseline: popularity" in md and "**unseen**" in md
    assert "| sequential | full ranking | NDCG@10 |" in md


def test_reload_reproduces_the_runs_predictions(run_dir, tmp_path):
    """`p5rec evaluate` on the saved run gives exactly the numbers computed in memory at the end of training."""
    from p5rec.cli import main as cli

    before = json.loads((run_dir / "results.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    from p5rec.eval.evaluation import EvalConfig, results_path

    full = (copy / "results.json").read_bytes()
    templates = ("2-1", "2-7", "1-1", "3-1", "4-1", "5-5", "5-1")
    assert cli(["evaluate", "--run", str(copy), "--max-users", "12", "--max-candidate-users", "3",
                "--templates", ",".join(templates)]) == 0
    # a partial evaluation writes beside the run's full results, never over them
    written = results_path(copy, EvalConfig(max_cases=12, max_candidate_cases=3, templates=templates))
    assert written.name.startswith("results-test-") and written.with_suffix(".md").is_file()
    assert (copy / "results.json").read_bytes() == full
    after = json.loads(written.read_text())
    # the saved run's prompt length is used, not a default
    assert after["eval_config"]["max_source_length"] == before["eval_config"]["max_source_length"] == 160
    for tid in ["2-1", "2-7", "1-1", "3-1", "4-1", "5-5", "5-1"]:
        # the same numbers up to float summation order (the expected star sums five probabilities per case);
        # NaN where no greedy answer parses, on both sides
        got, want = after["templates"][tid]["metrics"], before["templates"][tid]["metrics"]
        assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-6, abs=1e-9, nan_ok=True), tid


def test_resume_gives_the_same_model(run_dir, tmp_path):
    """Resuming from the step-12 checkpoint reaches exactly the weights of the uninterrupted 24-step run."""
    from safetensors.torch import load_file

    torch.set_num_threads(2)  # the tiny run's count (conftest): sums over another count differ in the last bits
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir / "checkpoint-12", resumed / "checkpoint-12")
    assert train_main(TINY + ["--output_dir", str(resumed), "--skip_test", "true", "--eval_users", "0",
                              "--resume_from_checkpoint", str(resumed / "checkpoint-12")]) == 0
    a, b = load_file(run_dir / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_predict_api_and_cli_agree(run_dir, capsys):
    from p5rec.cli import main as cli
    from p5rec.serve.inference import P5Rec, UnknownIdError

    rec = P5Rec.from_pretrained(run_dir)
    index = json.loads((run_dir / "index.json").read_text())
    users, items = sorted(index["users"]), sorted(index["items"])
    history = items[:3]
    recs = rec.recommend(history, user=users[0], k=5)
    assert len(recs) == 5 and len({p.item for p in recs}) == 5
    assert all(p.item in index["items"] and p.item not in history for p in recs)
    cold = rec.recommend(history, user="NEW-USER", k=5)  # unknown user: history-only prompt
    assert len(cold) == 5
    ranked = rec.rank(items[5:15], user=users[0], history=history)
    assert sorted(p.item for p in ranked) == sorted(items[5:15])
    rating = rec.predict_rating(users[0], items[0])
    assert set(rating) == {"rating", "text", "expected", "calibrated", "expected_mean", "calibrated_mean"}
    assert 1.0 <= rating["expected"] <= 5.0
    # the calibrated star is the expected one on the line the test evaluation fitted on validation
    results = json.loads((run_dir / "results.json").read_text())
    line = results["templates"][rec.default_template("rating")]["calibration"]
    assert line["n"] > 0 and line["slope"] >= 0
    assert rating["calibrated"] == pytest.approx(
        min(5.0, max(1.0, line["intercept"] + line["slope"] * rating["expected"])), abs=1e-3)
    # the mean star is the expected stars of the templates the test evaluation averaged, averaged
    ens = results["star_ensembles"]["rating"]
    assert len(ens["templates"]) >= 2 and ens["calibration"]["n"] > 0
    each = [rec.predict_rating(users[0], items[0], template=tid)["expected"] for tid in ens["templates"]]
    assert rating["expected_mean"] == pytest.approx(sum(each) / len(each), abs=1e-3)
    line = ens["calibration"]
    assert rating["calibrated_mean"] == pytest.approx(
        min(5.0, max(1.0, line["intercept"] + line["slope"] * rating["expected_mean"])), abs=1e-3)
    before, rec.calibration = rec.calibration, {}  # a run never evaluated on test has no line: no calibrated star
    ensembles, rec.star_ensembles = rec.star_ensembles, {}
    assert rec.predict_rating(users[0], items[0])["calibrated"] is None
    assert rec.predict_rating(users[0], items[0])["expected_mean"] is None
    rec.calibration, rec.star_ensembles = before, ensembles
    assert isinstance(rec.explain(users[0], items[0], feature="sound"), str)
    assert isinstance(rec.summarize("Great strings, bright tone and they stay in tune."), str)
    with pytest.raises(UnknownIdError, match="unknown item 'NOPE'"):
        rec.recommend(["NOPE"], user=users[0])
    with pytest.raises(UnknownIdError, match="unknown user 'NOBODY'"):
        rec.predict_rating("NOBODY", items[0])

    capsys.readouterr()
    assert cli(["predict", "--run", str(run_dir), "--task", "sequential", "--user", users[0],
                "--history", ",".join(history), "-k", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["item"] for p in out["items"]] == [p.item for p in recs]
    assert [p["score"] for p in out["items"]] == pytest.approx([p.score for p in recs], abs=1e-5)
    assert cli(["predict", "--run", str(run_dir), "--task", "rating", "--user", "NOBODY", "--item", items[0]]) == 2
    assert "unknown user 'NOBODY'" in capsys.readouterr().err
    # every task answers through the CLI as it does through the API (greedy and restricted decoding: deterministic)
    review = "Great strings, bright tone and they stay in tune."
    cases = [
        (["--task", "direct", "--user", users[0], "--candidates", ",".join(items[5:15])],
         lambda o: [p["item"] for p in o["items"]] == [p.item for p in rec.rank(items[5:15], user=users[0])]),
        (["--task", "rating", "--user", users[0], "--item", items[0]],
         lambda o: o["rating"] == rating["rating"] and o["expected"] == pytest.approx(rating["expected"])
         and o["calibrated"] == pytest.approx(rating["calibrated"])
         and o["expected_mean"] == pytest.approx(rating["expected_mean"])),
        (["--task", "explanation", "--user", users[0], "--item", items[0], "--feature", "sound"],
         lambda o: o["explanation"] == rec.explain(users[0], items[0], feature="sound")),
        (["--task", "review", "--review", review], lambda o: o["summary"] == rec.summarize(review)),
        (["--task", "review_rating", "--review", review], lambda o: o["rating"] == rec.rate_review(review)["rating"]),
    ]
    for flags, same in cases:
        assert cli(["predict", "--run", str(run_dir), "--json", *flags]) == 0
        assert same(json.loads(capsys.readouterr().out)), flags


def test_predict_batch_file(run_dir, tmp_path):
    from p5rec.cli import main as cli

    index = json.loads((run_dir / "index.json").read_text())
    users, items = sorted(index["users"]), sorted(index["items"])
    reqs = tmp_path / "requests.jsonl"
    lines = [{"task": "sequential", "user": users[i], "history": items[i : i + 3], "k": 3} for i in range(5)]
    lines.append({"task": "sequential", "user": users[0], "history": ["NOPE"]})
    lines.append({"task": "rating", "user": users[1], "item": items[1]})
    reqs.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "answers.jsonl"
    out.write_text("earlier answers\n")
    assert cli(["predict", "--run", str(run_dir), "--input", str(reqs), "--output", str(out)]) == 2
    assert out.read_text() == "earlier answers\n"
    assert cli(["predict", "--run", str(run_dir), "--input", str(reqs), "--output", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "requests.jsonl"]  # no temporary left
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    assert [a["line"] for a in answers] == list(range(1, 8))
    assert all(len(a["items"]) == 3 for a in answers[:5])
    assert "unknown item 'NOPE'" in answers[5]["error"]
    assert "rating" in answers[6]
