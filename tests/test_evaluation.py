"""One test per evaluation protocol, each on the session's tiny trained run: the protocol runs end to end on real
rendered cases and its metrics obey the identities of their definitions. A protocol registered without a check
here fails ``test_every_protocol_has_a_check``."""

from __future__ import annotations

import math

import pytest

from p5rec.eval.evaluation import PROTOCOLS, EvalConfig, build_catalogue_trie, protocol_of, score_template


def _ranking(m: dict, ks=(1, 5, 10)) -> None:
    hr = [m[f"HR@{k}"] for k in ks if f"HR@{k}" in m]
    assert hr == sorted(hr) and all(0.0 <= v <= 1.0 for v in hr)  # HR@K never falls as K grows
    for k in ks:
        if f"NDCG@{k}" in m:
            assert m[f"NDCG@{k}"] <= m[f"HR@{k}"] + 1e-9  # one relevant item: NDCG@K <= HR@K
    assert m["HR@1"] == pytest.approx(m["NDCG@1"])


def _text(m: dict) -> None:
    assert {"ROUGE-1", "ROUGE-2", "ROUGE-L", "distinct-1", "distinct-2"} <= set(m)
    assert 0.0 <= m["ROUGE-2"] <= 100.0 and 0.0 <= m["ROUGE-L"] <= 100.0
    assert any(k.startswith("BLEU-") for k in m)


def _rating(m: dict) -> None:
    assert m["MAE"] <= m["RMSE"] + 1e-9 and m["MAE_expected"] <= m["RMSE_expected"] + 1e-9
    assert 0.0 <= m["RMSE_expected"] <= 4.0  # an expected star lies in [1, 5]


def _accuracy(m: dict) -> None:
    assert 0.0 <= m["accuracy"] <= 1.0


def _listwise(m: dict) -> None:
    _ranking(m, ks=(1, 3, 5))
    assert m["HR@5"] == pytest.approx(1.0)  # five items listed, five ranked: the target is always among them


CHECKS = {
    "full ranking": _ranking,
    "continuation": _ranking,
    "candidates": _ranking,
    "yes/no over candidates": _ranking,
    "listwise": _listwise,
    "pairwise": _accuracy,
    "choice accuracy": _accuracy,
    "rating": _rating,
    "text": _text,
}


def test_every_protocol_has_a_check():
    assert set(CHECKS) == set(PROTOCOLS)


@pytest.fixture(scope="module")
def opened(tiny_run):
    from p5rec.run import Run

    run = Run.open(tiny_run)
    return run, run.prepared()


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_protocol_scores_its_first_template(opened, name):
    run, prepared = opened
    templates = run.templates
    t = next(t for t in templates if protocol_of(t) == name)
    cfg = EvalConfig(split="test", max_cases=6, max_candidate_cases=2, num_beams=5, progress=False,
                     max_source_length=run.max_source_length)
    tries = {"catalogue": build_catalogue_trie(prepared, run.tokenizer, run.render_config.id_form)}
    r = score_template(run.model, run.tokenizer, prepared, t, cfg, run.render_config, tries,
                       templates.family_info(t.family).data, templates)
    assert r.protocol == name and r.template == t.id
    assert 0 < r.n <= (2 if name == "yes/no over candidates" else 6)  # the caps of cfg hold
    assert all(math.isfinite(v) for k, v in r.metrics.items() if not k.endswith("_valid"))  # _valid: NaN if none parse
    assert all("source" in e for e in r.examples)
    CHECKS[name](r.metrics)
