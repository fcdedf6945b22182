"""A sequence-objective run end to end on a small real slice of MI: train with the sequence recipe (item softmax,
embedding learning rate, best checkpoint on the continuation metric) and a user's own template file; evaluate
and predict through the one run loader, which refuses prepared data that changed since training."""

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from p5rec.train.training import main as train_main

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "samples" / "mi_tiny.json.gz"
USER_TEMPLATES = textwrap.dedent("""\
    family: sequential
    data: sequential
    schema: {user: user id surface, history: history, target: target, sequence: sequence}
    templates:
      - id: "my-seq"
        name: my_sequence
        seen: true
        scoring: sequence
        fields: [user, sequence]
        source: "Everything {{ user }} picked, in order."
        target: "{{ sequence | ids }}"
    """)


@pytest.fixture(scope="module")
def seq_run(tmp_path_factory):
    torch.set_num_threads(2)
    base = tmp_path_factory.mktemp("seq")
    (base / "my.yaml").write_text(USER_TEMPLATES)
    out = base / "run"
    args = [
        "--dataset", str(SAMPLE), "--cache_dir", str(base / "cache"), "--preset", "tiny", "--vocab_size", "300",
        "--families", "sequential", "--templates", "2-S1,2-1,my-seq", "--template_files", str(base / "my.yaml"),
        "--renders", "sequential=1", "--sequence_renders", "4", "--item_softmax", "true",
        "--embedding_init_std", "0.1", "--embedding_lr_multiplier", "8", "--learning_rate", "5e-3",
        "--per_device_train_batch_size", "16", "--max_steps", "20", "--eval_steps", "10", "--save_steps", "10",
        "--logging_steps", "5", "--eval_users", "10", "--test_max_cases", "10", "--test_max_candidate_cases", "2",
        "--disable_tqdm", "true",
        "--metric_for_best_model", "eval_sequential/continuation_NDCG@10", "--greater_is_better", "true",
        "--load_best_model_at_end", "true", "--output_dir", str(out),
    ]
    assert train_main(args) == 0
    return out


def test_sequence_run_records_and_scores_the_continuation_protocol(seq_run):
    config = json.loads((seq_run / "run_config.json").read_text())
    assert config["mixture"]["trained_templates"] == ["2-1", "2-S1", "my-seq"]
    assert json.loads((seq_run / "config.json").read_text())["item_token_range"][1] > 0
    curve = json.loads((seq_run / "learning_curve.json").read_text())
    assert [p["step"] for p in curve] == [10, 20]
    assert all("sequential/continuation" in p and "sequential" in p and p["train_seconds"] > 0 for p in curve)
    state = json.loads((seq_run / "trainer_state.json").read_text())
    best = max(p["sequential/continuation"]["NDCG@10"] for p in curve)
    assert state["best_metric"] == pytest.approx(best)

    results = json.loads((seq_run / "results.json").read_text())
    t = results["templates"]
    assert t["2-S1"]["protocol"] == t["my-seq"]["protocol"] == "continuation" and t["2-S1"]["seen"]
    assert t["2-1"]["protocol"] == "full ranking" and t["2-1"]["seen"]
    assert not t["2-S3"]["seen"] and not t["2-2"]["seen"]  # held out, or not in this run's mixture
    assert {"continuation", "full ranking"} <= set(results["families"]["sequential"])
    assert t["2-S1"]["n"] == 10 and 0 <= t["2-S1"]["metrics"]["NDCG@10"] <= 1


def test_recommend_continues_the_history(seq_run):
    from p5rec.eval.decoding import continue_items
    from p5rec.serve.inference import P5Rec

    rec = P5Rec.from_pretrained(seq_run)
    items = sorted(rec.index.items)
    user = sorted(rec.index.users)[0]
    history = items[:3]
    got = rec.recommend(history, user=user, k=5)
    source = rec._sources(rec.templates.get("2-S1"), [{"user": user, "history": history}])
    want = continue_items(rec.model, rec.tokenizer, source, [history], rec.trie, k=5, exclude=[history],
                          max_items=49, max_source_length=rec.max_source_length)[0]
    assert [(p.item, p.score) for p in got] == [(i, pytest.approx(s, abs=1e-5)) for i, s in want]
    assert all(p.item not in history for p in got)
    # P5's prompt on the same run, by name
    assert len(rec.recommend(history, user=user, k=5, template="2-1")) == 5


def test_evaluate_uses_the_runs_template_files_and_refuses_bad_selections(seq_run, tmp_path, capsys):
    from p5rec.cli import main as cli

    copy = tmp_path / "copy"
    shutil.copytree(seq_run, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    before = (copy / "results.json").read_text()
    assert cli(["evaluate", "--run", str(copy), "--families", "sequentail"]) == 2
    assert "unknown families or templates ['sequentail']" in capsys.readouterr().err
    assert (copy / "results.json").read_text() == before
    assert cli(["evaluate", "--run", str(copy), "--templates", "my-seq", "--max-users", "10"]) == 0
    assert (copy / "results.json").read_text() == before  # a partial evaluation writes beside it
    written = capsys.readouterr().out.strip().splitlines()[-1]
    assert written.startswith("p5rec evaluate: wrote ") and "results-test-" in written
    after = json.loads(Path(written.split()[3]).read_text())
    assert after["templates"]["my-seq"]["metrics"] == json.loads(before)["templates"]["my-seq"]["metrics"]


def test_run_refuses_prepared_data_that_changed(seq_run, tmp_path, capsys):
    from p5rec.cli import main as cli
    from p5rec.run import Run, RunError

    copy = tmp_path / "copy"
    shutil.copytree(seq_run, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((copy / "run_config.json").read_text())
    prepared = tmp_path / "prepared"
    shutil.copytree(config["prepared_dir"], prepared)
    config["prepared_dir"] = str(prepared)
    (copy / "run_config.json").write_text(json.dumps(config))
    assert Run.open(copy).prepared().path == prepared  # the same data elsewhere is fine
    manifest = json.loads((prepared / "manifest.json").read_text())
    trained_on = manifest["fingerprint"]
    manifest["fingerprint"] = "0" * 64
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunError, match=f"changed since training .*{trained_on[:12]}"):
        Run.open(copy).prepared()
    assert cli(["evaluate", "--run", str(copy), "--templates", "2-1"]) == 2
    err = capsys.readouterr().err
    assert "000000000000" in err and trained_on[:12] in err


def test_star_calibration_reads_the_lines_and_survives_a_broken_results_file(tmp_path, caplog):
    """The served calibrated star comes from results.json; without one (or with one that does not read) serving
    goes on without it, and a broken file is named in the log."""
    from p5rec.run import Run

    run = Run(tmp_path, {}, None, None, None, None, None)
    assert run.star_calibration == {}
    (tmp_path / "results.json").write_text(json.dumps({"templates": {
        "1-1": {"calibration": {"intercept": 2.0, "slope": 0.5, "n": 10}}, "2-1": {"calibration": None}}}))
    assert run.star_calibration == {"1-1": (2.0, 0.5)}
    assert run.star_ensembles == {}
    (tmp_path / "results.json").write_text(json.dumps({"templates": {}, "star_ensembles": {"rating": {
        "templates": ["1-1", "1-2"], "calibration": {"intercept": 1.0, "slope": 0.75, "n": 10}}}}))
    assert run.star_ensembles == {"rating": {"templates": ["1-1", "1-2"], "line": (1.0, 0.75)}}
    (tmp_path / "results.json").write_text('{"templates": {"1-1": ')
    with caplog.at_level("WARNING"):
        assert run.star_calibration == {}
        assert run.star_ensembles == {}
    assert "results.json" in caplog.text and "no rating calibration" in caplog.text
    assert "no rating ensemble" in caplog.text
