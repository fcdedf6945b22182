"""The results report flags degenerate generated text (one output for nearly every case)."""

from p5rec.eval import metrics
from p5rec.eval.evaluation import DEGENERATE_DISTINCT2, degenerate_templates, results_markdown

REFS = ["great strings for the price", "the strap broke after a week", "warm tone, quiet pedal",
        "cheap cable but solid plugs", "stays in tune all night"] * 20


def _report(outputs: dict[str, list[str]]) -> dict:
    templates = {
        tid: {"template": tid, "family": "review", "seen": True, "scoring": "text", "kind": "text", "n": len(out),
              "metrics": metrics.text_metrics(out, REFS[:len(out)], bleu_orders=(2,)), "invalid": 0, "examples": [],
              "protocol": "text"}
        for tid, out in outputs.items()
    }
    return {"split": "test", "run": "r", "model": {"preset": "tiny", "parameters": 1}, "decoding": {"id_form": "token"},
            "templates": templates, "families": {}, "baselines": {}}


def test_constant_or_looping_text_is_flagged_and_varied_text_is_not():
    varied = [f"{a} {b}" for a, b in zip(["good", "bad", "fine", "loud", "soft"] * 20,
                                          [f"w{i}" for i in range(100)])]
    report = _report({"4-1": ["this is a great."] * 100,  # the main job's output for every case
                      "4-2": ["but it is, but it is, but it is"] * 100,
                      "4-3": varied})
    flagged = dict(degenerate_templates(report))
    assert set(flagged) == {"4-1", "4-2"}
    assert all(v < DEGENERATE_DISTINCT2 for v in flagged.values())
    assert report["templates"]["4-3"]["metrics"]["distinct-2"] >= DEGENERATE_DISTINCT2
    md = results_markdown(report)
    assert "Degenerate text" in md and "4-1" in md.split("Degenerate text")[1].split("\n")[0]


def test_no_flag_without_degenerate_text():
    report = _report({"4-3": [r.upper() for r in REFS[:5]] + REFS[5:10]})
    assert degenerate_templates(report) == []
    assert "Degenerate text" not in results_markdown(report)
