"""The main job's generated text, read from its committed test results (``bench/results/mi-main-results.json``,
written by ``python bench/mi.py --config main``): one sentence for every case is a failure of the model, not a
result, whatever ROUGE it scores.

Review summaries pass since 2026-12-07 (decoded against their prompt without the review: the family's
``decoding:``, at weight 5 since every family is split by leave-one-out; at 3, template 4-3 wrote 7.7 %).
Explanations pass since 2026-12-08 because they are chosen, not written: each case's text is one of at most 8
training explanations of its item, the one the model scores highest (the family's ``decoding: choose``), and the
report says so. Written token by token, the main job's 1.7 M-parameter model, trained for 7 minutes on two CPU
cores, still writes a few stock sentences per template ("This is a great tuner.", distinct-2 0.2-1.3 %): that is
scored on the same run by ``p5rec evaluate --families explanation --text-choose none``
(``bench/results/mi-main-explanation-written-results.json``) and marked a failure (issue 17). ``strict=True``
turns the day it passes into a failure too, so the marker is removed then.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p5rec.eval.evaluation import DEGENERATE_DISTINCT2, degenerate_templates

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
MAIN_RESULTS = RESULTS / "mi-main-results.json"
WRITTEN_EXPLANATIONS = RESULTS / "mi-main-explanation-written-results.json"


def _report(path: Path = MAIN_RESULTS) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_main_job_results_score_generated_text():
    report = _report()
    text = {tid: r for tid, r in report["templates"].items() if r["kind"] == "text"}
    assert {r["family"] for r in text.values()} >= {"explanation", "review"}
    # distinct-2 is what the check below reads: every text template must report it
    assert all("distinct-2" in r["metrics"] for r in text.values())
    # and the report says which text was chosen among training texts rather than written
    assert set(report["decoding"].get("text_choose", {})) == {"explanation"}
    assert report["decoding"]["text_choose"]["explanation"]["choose"] == "item"


def _check_depends_on_the_case(report: dict, family: str) -> None:
    ours = {tid for tid, r in report["templates"].items() if r["family"] == family and r["seen"]}
    assert any(report["templates"][tid]["kind"] == "text" for tid in ours)
    bad = [(tid, round(d2, 2)) for tid, d2 in degenerate_templates(report) if tid in ours]
    assert not bad, f"seen {family} templates whose test outputs have distinct-2 below {DEGENERATE_DISTINCT2:g}: {bad}"


@pytest.mark.parametrize("family", ["explanation", "review"])
def test_the_main_job_writes_text_that_depends_on_the_case(family):
    _check_depends_on_the_case(_report(), family)


def test_the_written_explanations_were_scored_on_the_main_jobs_model():
    written, main = _report(WRITTEN_EXPLANATIONS), _report()
    assert written["manifest_fingerprint"] == main["manifest_fingerprint"] and written["split"] == "test"
    assert not written["decoding"].get("text_choose") and written["eval_config"]["text_choose"] == ""
    assert {r["family"] for r in written["templates"].values()} == {"explanation"}


@pytest.mark.xfail(strict=True, reason="issue 17: written token by token, the main job's explanations are a few "
                                       "stock sentences per template (distinct-2 0.2-1.3 %)")
def test_the_main_job_writes_explanations_that_depend_on_the_case_token_by_token():
    _check_depends_on_the_case(_report(WRITTEN_EXPLANATIONS), "explanation")
