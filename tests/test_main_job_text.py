"""The main job's generated text, read from its committed test results (``bench/results/mi-main-results.json``,
written by ``python bench/mi.py --config main``): one sentence for every case is a failure of the model, not a
result, whatever ROUGE it scores.

Review summaries pass since 2026-12-07 (decoded against their prompt without the review: the family's
``decoding:``, at weight 5 since every family is split by leave-one-out; at 3, template 4-3 wrote 7.7 %).
Explanation fails, and is marked so (issue 17): the main job's 1.7 M-parameter model, trained for 7 minutes on
two CPU cores, writes a few stock sentences per explanation template (the hint templates copy their feature word,
"This is a great tuner.", but distinct-2 stays 0.2-1.3 %). ``strict=True`` turns the day it passes
into a failure too, so the marker is removed then and the test guards the main job from that run on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p5rec.eval.evaluation import DEGENERATE_DISTINCT2, degenerate_templates

MAIN_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "mi-main-results.json"


def _report() -> dict:
    return json.loads(MAIN_RESULTS.read_text(encoding="utf-8"))


def test_the_main_job_results_score_generated_text():
    report = _report()
    text = {tid: r for tid, r in report["templates"].items() if r["kind"] == "text"}
    assert {r["family"] for r in text.values()} >= {"explanation", "review"}
    # distinct-2 is what the check below reads: every text template must report it
    assert all("distinct-2" in r["metrics"] for r in text.values())


@pytest.mark.parametrize("family", [
    pytest.param("explanation", marks=pytest.mark.xfail(
        strict=True, reason="issue 17: the main job writes a few stock sentences per explanation template "
                            "(distinct-2 0.2-1.3 %)")),
    "review",
])
def test_the_main_job_writes_text_that_depends_on_the_case(family):
    report = _report()
    ours = {tid for tid, r in report["templates"].items() if r["family"] == family and r["seen"]}
    assert any(report["templates"][tid]["kind"] == "text" for tid in ours)
    bad = [(tid, round(d2, 2)) for tid, d2 in degenerate_templates(report) if tid in ours]
    assert not bad, f"seen {family} templates whose test outputs have distinct-2 below {DEGENERATE_DISTINCT2:g}: {bad}"
