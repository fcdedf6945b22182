"""One test per evaluation protocol, each on the session's tiny trained run: the protocol runs end to end on real
rendered cases and its metrics obey the identities of their definitions. A protocol registered without a check
here fails ``test_every_protocol_has_a_check``."""

from __future__ import annotations

import math

import numpy as np
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
    assert m["MAE_calibrated"] <= m["RMSE_calibrated"] + 1e-9 and 0.0 <= m["RMSE_calibrated"] <= 4.0


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


@pytest.mark.parametrize("split", ["test", "valid"])
def test_rating_calibration_fits_on_cases_it_does_not_score(opened, split, monkeypatch):
    """On test the line is fitted on validation's expected stars; on valid, on the other half of the cases. A
    model whose expected star is half the true star plus 1 is calibrated to the true star exactly."""
    from p5rec.eval import evaluation

    run, prepared = opened
    t = next(t for t in run.templates if protocol_of(t) == "rating")
    # 20 cases: each half of them holds more than one star (12 leave a half of 5s only, through which a line
    # has no slope to find)
    cfg = EvalConfig(split=split, max_cases=20, progress=False, max_source_length=run.max_source_length)
    truth = {}
    for part in ("valid", "test"):
        recs = evaluation._records(prepared, "rating", part, cfg.max_cases, cfg.seed)
        truth.update({s: float(g) for s, g in evaluation._render(t, recs, prepared, run.render_config)})
    seen = []

    def shifted(ctx, sources):
        seen.append(list(sources))
        return np.array([truth[s] for s in sources]) * 0.5 + 1.0

    monkeypatch.setattr(evaluation, "_expected_stars", shifted)
    tries = {"catalogue": build_catalogue_trie(prepared, run.tokenizer, run.render_config.id_form)}
    r = score_template(run.model, run.tokenizer, prepared, t, cfg, run.render_config, tries, "rating", run.templates)
    assert r.metrics["RMSE_expected"] > 0.1  # 0.5 * star + 1 is off the star
    assert r.metrics["RMSE_calibrated"] == pytest.approx(0.0, abs=1e-9)  # the line 2 * (e - 1) undoes it
    if split == "test":  # two calls: the scored test cases, then validation's to fit on
        assert len(seen) == 2 and not set(seen[0]) & set(seen[1])
    else:
        assert len(seen) == 1


def test_calibrate_stars_by_hand():
    from p5rec.eval.evaluation import calibrate_stars

    line = calibrate_stars(np.array([3.0, 4.0, 5.0]), np.array([3.5, 4.0, 4.5]))  # slope 0.5, intercept 2
    assert line(np.array([4.0, 1.0, 10.0])).tolist() == pytest.approx([4.0, 2.5, 5.0])  # clipped to [1, 5]
    flat = calibrate_stars(np.array([3.0, 4.0, 5.0]), np.array([5.0, 4.0, 3.0]))  # anti-correlated: slope 0
    assert flat(np.array([1.0, 5.0])).tolist() == pytest.approx([4.0, 4.0])
    assert calibrate_stars(np.array([4.0, 4.0]), np.array([2.0, 4.0]))(np.array([5.0])).tolist() == [3.0]
    assert calibrate_stars(np.zeros(0), np.zeros(0))(np.array([0.0, 3.0])).tolist() == [1.0, 3.0]


# ------------------------------------------------------------------ the prompt-reliance control
def _reliance(opened, families=("rating", "explanation"), cases=12):
    from p5rec.eval.evaluation import prompt_reliance

    run, prepared = opened
    chosen = [t for t in run.templates if t.family in families and t.seen]
    cfg = EvalConfig(split="test", reliance_cases=cases, progress=False, max_source_length=run.max_source_length)
    return chosen, prompt_reliance(run.model, run.tokenizer, prepared, chosen, cfg, run.render_config, run.templates)


def test_prompt_reliance_is_zero_for_a_model_that_cannot_see_its_prompt(opened, monkeypatch):
    """Every prompt encoded as the same text: the answers cannot depend on the case, the gain is 0 to float
    precision, and the report flags each family as not read."""
    from p5rec.eval import decoding
    from p5rec.eval.evaluation import results_markdown, unread_families

    real = decoding._encode
    monkeypatch.setattr(decoding, "_encode", lambda tok, texts, n, dev: real(tok, ["x"] * len(texts), n, dev))
    chosen, rel = _reliance(opened)
    assert set(rel["templates"]) == {t.id for t in chosen}
    assert all(r["n"] == 12 and abs(r["gain"]) < 1e-4 and r["nll"] > 0 for r in rel["templates"].values())
    report = {"prompt_reliance": rel}
    assert sorted(f for f, _ in unread_families(report)) == ["explanation", "rating"]


def test_prompt_reliance_gives_no_case_its_own_prompt(opened, monkeypatch):
    """A scorer that knows each case's own prompt (log P = -1 under it, -3 under any other): the control must
    move every case to another's prompt (gain exactly 2 nats per token), and per-token means weigh tokens."""
    from p5rec.eval import decoding
    from p5rec.eval.evaluation import unread_families

    import numpy as np

    perms: list[np.ndarray] = []  # the control's derangement per template: case c's answer goes to prompt perm[c]
    real = decoding.derangement
    monkeypatch.setattr(decoding, "derangement", lambda n, rng: perms.append(real(n, rng)) or perms[-1])
    calls: list[list[str]] = []  # each template's prompts, scored once with two answers each

    def fake(model, tokenizer, sources, candidates, **kw):
        calls.append(list(sources))
        perm = perms[-1]
        assert len(perm) == len(sources) and not np.any(perm == np.arange(len(perm)))
        out = []
        for case in range(len(sources)):
            p = perm[case]  # the prompt that also scores this case's answer, second
            assert candidates[p][1] == candidates[case][0]
        for p in range(len(sources)):
            case = int(np.flatnonzero(perm == p)[0])
            out.append((np.array([-1.0, -1.0 if sources[p] == sources[case] else -3.0]), np.ones(2, dtype=int)))
        return out

    monkeypatch.setattr(decoding, "candidate_logprobs", fake)
    _, rel = _reliance(opened)
    assert len(calls) == len(rel["templates"])
    # two cases may render the same prompt (then the moved one is "its own"): rare, never most of a template
    assert all(r["nll"] == 1.0 and r["gain"] > 1.0 for r in rel["templates"].values())
    assert sum(r["gain"] == 2.0 for r in rel["templates"].values()) >= len(rel["templates"]) // 2
    assert unread_families({"prompt_reliance": rel}) == []


# ------------------------------------------------------------------ baselines on the protocol's own cases
def test_yes_no_baseline_scores_the_users_the_protocol_scores(opened):
    """The yes/no templates score max_candidate_cases users (each costs 100 prompts); the popularity beside them
    must rank the same users' candidates, not every user's: popularity_direct over exactly those rows."""
    from p5rec.eval import baselines, metrics
    from p5rec.eval.evaluation import BASELINES, BaselineContext, _attach_candidates, _records

    run, prepared = opened
    spec = run.templates.family_info("direct")
    name = spec.protocols["yes/no over candidates"].baselines[0]
    assert spec.baseline(name).method == "popularity" and name != "popularity"
    counts = prepared.train_item_counts()
    everyone = prepared.family("direct")["test"]
    for cap in (2, 0):
        cfg = EvalConfig(split="test", max_candidate_cases=cap, families=("direct",), progress=False)
        got = BASELINES["popularity"](BaselineContext(prepared, cfg, spec, "yes/no over candidates", name, {}))[name]
        rows = _attach_candidates(prepared, "test", _records(prepared, "direct", "test", cap, cfg.seed))
        assert len(rows) == (cap or len(everyone))
        want = metrics.ranking_metrics(baselines.popularity_direct({"candidates": [r["candidates"] for r in rows]},
                                                                   counts), [r["target"] for r in rows])
        assert got == pytest.approx(want)
    # the candidate lists, capped by max_cases (0: all), still rank every user
    cfg = EvalConfig(split="test", max_candidate_cases=2, families=("direct",), progress=False)
    lists = BASELINES["popularity"](BaselineContext(prepared, cfg, spec, "candidates", "popularity", {}))["popularity"]
    assert lists == pytest.approx(metrics.ranking_metrics(baselines.popularity_direct(everyone, counts),
                                                          everyone["target"]))


# ------------------------------------------------------------------ text decoded against the prompt without its evidence
def test_summaries_are_decoded_against_the_prompt_without_the_review_in_evaluation_and_in_p5rec(opened, monkeypatch):
    """The review family's `decoding:` contrasts each summary prompt with the same prompt whose review is empty;
    P5Rec.summarize decodes a request exactly as the evaluation decodes the same case; a rating read from a review
    and a family without `decoding:` are decoded plainly; --text-contrast 0 turns it off."""
    from p5rec.eval import decoding, evaluation
    from p5rec.serve.inference import P5Rec

    run, prepared = opened
    calls: list[tuple[list[str], dict]] = []

    def fake(model, tokenizer, sources, **kw):
        calls.append((list(sources), kw))
        return ["Great strings"] * len(sources)

    monkeypatch.setattr(decoding, "generate_text", fake)
    spec = run.templates.family_info("review").decoding
    t = next(t for t in run.templates.by_family("review") if protocol_of(t) == "text" and "review" in t.variables)
    tries = {"catalogue": build_catalogue_trie(prepared, run.tokenizer, run.render_config.id_form)}

    def score(template, **cfg):
        calls.clear()
        cfg = EvalConfig(split="test", max_cases=4, progress=False, max_source_length=run.max_source_length, **cfg)
        score_template(run.model, run.tokenizer, prepared, template, cfg, run.render_config, tries,
                       run.templates.family_info(template.family).data, run.templates)
        return calls[-1]

    sources, kw = score(t)
    assert kw["contrast"] == spec.contrast > 0 and kw["plausibility"] == spec.plausibility
    records = evaluation._records(prepared, "review", "test", 4, 42)
    for source, other, rec in zip(sources, kw["contrast_sources"], records):
        review = evaluation._render(t, [rec], prepared, run.render_config)[0][0][len(other.rstrip()):].strip()
        assert source.startswith(other.rstrip()) and len(other) < len(source) and review  # the review, cut out
    assert "contrast" not in score(t, text_contrast=0.0)[1]
    explanation = next(t for t in run.templates.by_family("explanation") if protocol_of(t) == "text")
    assert "contrast" not in score(explanation, text_choose="")[1]  # written, not chosen: its spec has no contrast

    rec = P5Rec.from_pretrained(run.path)
    r = records[0]
    calls.clear()
    rec.summarize(r["review"], user=r["user"], template=t.id)
    (served,), served_kw = calls[-1]
    assert served == sources[0] and served_kw["contrast_sources"] == [kw["contrast_sources"][0]]
    assert served_kw["contrast"] == kw["contrast"]
    calls.clear()
    rec.rate_review(r["review"], user=r["user"])
    assert calls and "contrast" not in calls[-1][1]


def test_results_markdown_says_how_text_was_decoded():
    from p5rec.eval.evaluation import _text_decoding_line

    base = {"text_beams": 4, "max_new_tokens": 32, "text_no_repeat_ngram": 3}
    per_family = {"review": {"contrast": 3.0, "without": ["review"], "plausibility": 0.1}}
    assert _text_decoding_line({**base, "text_contrast": per_family}) == (
        "Text: 4 beams, at most 32 tokens, no repeated 3-gram; review decoded against its prompt without review "
        "(contrast 3, plausibility 0.1).")
    assert _text_decoding_line({**base, "text_contrast": 0.0}) == "Text: 4 beams, at most 32 tokens, no repeated 3-gram."
    old = _text_decoding_line({**base, "text_no_repeat_ngram": 0, "text_contrast": 2.0})  # a report of 2026-12-06
    assert old == "Text: 4 beams, at most 32 tokens; every family decoded against another case's prompt (contrast 2)."


# ------------------------------------------------------------------ text chosen among the item's training texts
def test_a_text_pool_is_a_fixed_draw_of_the_keys_texts_narrowed_by_the_shown_hint():
    from collections import Counter

    from p5rec.eval.evaluation import TextPool
    from p5rec.prompts.families import DecodingSpec

    texts = [f"text {k} about strings" for k in range(10)] + ["the tuner holds", "the tuner holds", "a cable"]
    rows = {"item": ["i1"] * 10 + ["i2", "i3", "i2"], "feature": ["strings"] * 10 + ["tuner", "tuner", "cable"],
            "explanation": texts}
    spec = DecodingSpec(choose="item", hints=("feature",), candidates=4)
    pool = TextPool.from_rows(rows, "explanation", spec)
    first = pool.candidates({"item": "i1"})
    assert len(first) == 4 and set(first) <= set(texts[:10])
    # the draw does not follow the rows' order, nor repeat a text, nor change when the rows are shuffled
    shuffled = TextPool.from_rows({k: v[::-1] for k, v in rows.items()}, "explanation", spec)
    assert shuffled.candidates({"item": "i1"}) == first and first != texts[:4]
    assert pool.candidates({"item": "i2"}) == ["a cable", "the tuner holds"] or \
        pool.candidates({"item": "i2"}) == ["the tuner holds", "a cable"]
    # a shown hint keeps the texts that mention it; when none does, the hint's most common texts
    assert pool.candidates({"item": "i2", "feature": "Tuner"}, ("feature",)) == ["the tuner holds"]
    assert pool.candidates({"item": "i1", "feature": "tuner"}, ("feature",)) == ["the tuner holds"]
    assert pool.candidates({"item": "i1", "feature": "strings"}, ("feature",)) == first
    # an item without training texts: the most common ones
    common = [t for t, _ in Counter(texts).most_common(4)]
    assert pool.candidates({"item": "new"}) == common and common[0] == "the tuner holds"
    with pytest.raises(ValueError, match="'feature'"):
        TextPool.from_rows({"item": rows["item"], "explanation": texts}, "explanation", spec)


def test_chosen_explanations_are_training_texts_of_the_case_and_p5rec_serves_the_scored_one(opened, tiny_run,
                                                                                          caplog):
    """The explanation family's `decoding: choose` answers each case with one of its TextPool candidates, in
    evaluation and in P5Rec alike; --text-choose none writes it token by token; without the prepared data P5Rec
    writes it and says so."""
    from p5rec.eval import evaluation
    from p5rec.serve.inference import P5Rec

    run, prepared = opened
    spec = run.templates.family_info("explanation").decoding
    assert spec.choose == "item"
    tries = {"catalogue": build_catalogue_trie(prepared, run.tokenizer, run.render_config.id_form)}
    records = evaluation._records(prepared, "explanation", "test", 5, 42)
    rec = P5Rec.from_pretrained(run.path)
    for t in [run.templates.get("3-1"), run.templates.get("3-9")]:
        cfg = EvalConfig(split="test", max_cases=5, progress=False, max_source_length=run.max_source_length,
                         baselines=False)
        r = score_template(run.model, run.tokenizer, prepared, t, cfg, run.render_config, tries, "explanation",
                           run.templates)
        pool = evaluation.text_pool(prepared, "explanation", t, spec)
        hints = evaluation.shown_hints(spec, t)
        assert hints == (("feature",) if "feature" in t.variables else ())
        for ex, case in zip(r.examples, records):
            assert ex["output"] in pool.candidates(case, hints)
            served = rec.explain(case["user"], case["item"], feature=case["feature"] if hints else None,
                                 rating=float(case["rating"]), template=t.id)
            assert served == ex["output"]
    free = score_template(run.model, run.tokenizer, prepared, run.templates.get("3-1"),
                          EvalConfig(split="test", max_cases=5, progress=False, text_choose="",
                                     max_source_length=run.max_source_length), run.render_config, tries,
                          "explanation", run.templates)
    assert free.n == 5 and "distinct-2" in free.metrics
    bare = P5Rec(run.model, run.tokenizer, run.index, run.templates, run.render_config, run.max_source_length)
    with caplog.at_level("WARNING"):
        text = bare.explain(records[0]["user"], records[0]["item"], template="3-1")
    assert isinstance(text, str) and "written token by token" in caplog.text


# ------------------------------------------------------------------ the expected star averaged over templates
def test_the_star_ensemble_scores_the_mean_of_the_seen_templates_expected_stars():
    from p5rec.eval.evaluation import TemplateResult, star_ensembles
    from p5rec.eval.metrics import rating_metrics
    from p5rec.prompts.families import shipped_specs

    gold = np.array([5.0, 4.0, 1.0, 5.0, 3.0, 4.0])
    fit_gold = np.array([4.0, 5.0, 2.0, 3.0])

    def result(tid, expected, seen=True, family="rating", gold=gold, fit=True):
        return TemplateResult(tid, family, seen, "generation", "rating", {}, len(gold), protocol="rating",
                              stars={"expected": np.asarray(expected, float), "gold": gold,
                                     "fit": (np.array([4.2, 4.6, 3.0, 3.8]), fit_gold) if fit else None})

    a, b = [4.8, 3.9, 2.0, 4.4, 3.5, 4.1], [4.0, 4.5, 1.5, 4.6, 2.5, 3.9]
    specs = shipped_specs()
    rs = [result("1-1", a), result("1-2", b), result("1-10", [1.0] * 6, seen=False),
          result("4-2", [3.0] * 6, family="review")]
    out = star_ensembles(rs, specs)
    assert set(out) == {"rating"}  # review's rating protocol declares no ensemble; unseen templates stay out
    ens = out["rating"]
    mean = (np.array(a) + np.array(b)) / 2
    assert ens["templates"] == ["1-1", "1-2"] and ens["n"] == 6
    assert ens["RMSE_ensemble"] == pytest.approx(rating_metrics(mean.tolist(), gold.tolist())["RMSE"])
    # averaging cancels what each wording adds: here the mean beats both templates
    assert ens["RMSE_ensemble"] < min(rating_metrics(e, gold.tolist())["RMSE"] for e in (a, b))
    line = ens["calibration"]
    assert line["n"] == 4 and line["slope"] >= 0
    calibrated = np.clip(line["intercept"] + line["slope"] * mean, 1, 5)
    assert ens["RMSE_ensemble_calibrated"] == pytest.approx(rating_metrics(calibrated.tolist(), gold.tolist())["RMSE"])
    # one seen template, or templates that scored other cases: no ensemble
    assert star_ensembles(rs[:1], specs) == {}
    assert star_ensembles([rs[0], result("1-2", b[:5], gold=gold[:5])], specs) == {}
    # on validation (no fitted line): calibrated by halves, and no line to serve
    valid = star_ensembles([result("1-1", a, fit=False), result("1-2", b, fit=False)], specs)["rating"]
    assert valid["calibration"] is None and np.isfinite(valid["RMSE_ensemble_calibrated"])
