"""What a run leaves for people: PNG plots linked from results.md, the model card README.md (refreshed with the
results, never over a README of the user's), and TensorBoard scalars of the per-family validation metrics."""

import json
import shutil
import struct

import pytest
import yaml

from p5rec.eval import modelcard, plots
from p5rec.train.training import clear_run_files, is_run_file

from conftest import HAS_TENSORBOARD

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def card_parts(path):
    text = path.read_text()
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_plots_are_pngs_linked_from_results_md(tiny_run):
    for name in ("learning_curve.png", "results.png"):
        data = (tiny_run / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
    md = (tiny_run / "results.md").read_text()
    assert "](results.png)" in md and "](learning_curve.png)" in md
    # nothing to draw: no file, no error
    assert plots.bar_panels([plots.Panel("empty", "NDCG@10", [])], tiny_run / "none.png") is None
    assert not (tiny_run / "none.png").exists()


def test_model_card_metadata_and_body_come_from_the_run(tiny_run):
    meta, body = card_parts(tiny_run / "README.md")
    results = json.loads((tiny_run / "results.json").read_text())
    assert meta["library_name"] == "p5rec" and meta["datasets"] == ["mi_tiny"]
    assert {"recommendation", "sequential-recommendation", "rating-prediction"} <= set(meta["tags"])
    assert {"ndcg", "rmse", "rouge"} <= set(meta["metrics"])
    entries = {e["task"]["name"]: e for e in meta["model-index"][0]["results"]}
    seq = {m["name"]: m["value"] for m in entries["sequential: full ranking"]["metrics"]}
    want = results["families"]["sequential"]["full ranking"]["seen"]["NDCG@10"]
    assert seq["NDCG@10 (seen templates, mean)"] == pytest.approx(want, abs=1e-4)
    rating = {m["name"]: m["value"] for m in entries["rating: rating"]["metrics"]}
    assert rating["RMSE (seen templates, mean)"] == pytest.approx(results["families"]["rating"]["rating"]["seen"]["RMSE"],
                                                                  abs=1e-4)
    index = json.loads((tiny_run / "index.json").read_text())
    assert "P5Rec.from_pretrained" in body and next(iter(index["items"])) in body
    assert f"{len(index['items'])} items" in body and "`random` strategy" in body
    assert "leave-one-out over the reviews too (rating, text)" in body  # the split the run was trained on
    assert "## Limitations" in body and "](results.png)" in body and "](learning_curve.png)" in body
    seq_row = next(r for r in results["headline"] if (r["family"], r["protocol"]) == ("sequential", "full ranking"))
    assert f"| sequential | full ranking | NDCG@10 | {seq_row['seen']:.4f} |" in body
    # the prompt-reliance control is in the results, and a family it flags is named among the limitations
    gains = {f: g["seen"]["gain"] for f, g in results["prompt_reliance"]["families"].items() if g.get("seen")}
    assert set(gains) >= {"sequential", "rating"}
    for fam, gain in gains.items():
        assert (f"- {fam}: its answers do not depend on the case" in body) == (gain < 0.01)


def test_card_is_refreshed_by_evaluation_and_never_replaces_a_users_readme(tiny_run, tmp_path):
    from p5rec.eval.evaluation import EvalConfig, evaluate_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    # the run's own evaluation rewrites results.json: the card follows it
    evaluate_run(run, EvalConfig(max_cases=4, templates=("2-1",), baselines=False, progress=False),
                 out=run / "results.json")
    meta, _ = card_parts(run / "README.md")
    assert [e["task"]["name"] for e in meta["model-index"][0]["results"]] == ["sequential: full ranking"]
    assert (run / "results.png").read_bytes().startswith(PNG_MAGIC)
    # a README that p5rec did not write stays as it is, and --overwrite_output_dir keeps it too
    (run / "README.md").write_text("# my notes\n")
    assert modelcard.write_model_card(run) is None
    assert (run / "README.md").read_text() == "# my notes\n"
    assert not is_run_file(run / "README.md")
    clear_run_files(run)
    assert sorted(p.name for p in run.iterdir()) == ["README.md"]


def tensorboard_scalars(event_file):
    """tag -> [(step, value)] from a TensorBoard event file (TFRecord framing: length, crc, Event proto, crc)."""
    try:
        from tensorboard.compat.proto import event_pb2
    except ImportError:
        from tensorboardX.proto import event_pb2
    data, out, i = event_file.read_bytes(), {}, 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        for v in event.summary.value:
            value = v.simple_value if v.HasField("simple_value") else (v.tensor.float_val or [None])[0]
            out.setdefault(v.tag, []).append((event.step, value))
    return out


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="no TensorBoard writer installed (pip install -e '.[test]')")
def test_tensorboard_gets_loss_and_each_familys_validation_metric(tiny_run):
    (event_file,) = (tiny_run / "runs").glob("*/events.out.tfevents.*")
    scalars = tensorboard_scalars(event_file)
    curve = json.loads((tiny_run / "learning_curve.json").read_text())
    assert [s for s, _ in scalars["train/loss"]] == [6, 12, 18, 24]
    assert [s for s, _ in scalars["eval/loss"]] == [p["step"] for p in curve] == [12, 24]
    for family, metric in (("sequential", "NDCG@10"), ("direct", "NDCG@10"), ("rating", "RMSE"),
                           ("explanation", "ROUGE-L"), ("review", "ROUGE-L")):
        # tensorboardX writes '@' as '_' in tags; torch's writer keeps it
        tag = next(t for t in scalars if t in (f"eval/{family}_{metric}", f"eval/{family}_{metric.replace('@', '_')}"))
        assert [(s, pytest.approx(v, abs=1e-5)) for s, v in scalars[tag]] == \
            [(p["step"], p[family][metric]) for p in curve], family
    # the metrics are in the Trainer's log too (trainer_state.json), where --metric_for_best_model reads them
    state = json.loads((tiny_run / "trainer_state.json").read_text())
    assert [h["eval_sequential_NDCG@10"] for h in state["log_history"] if "eval_loss" in h] == \
        [p["sequential"]["NDCG@10"] for p in curve]
