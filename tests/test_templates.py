"""Templates: every shipped template loads, validates and renders; validation errors name file/line/id;
rendering is deterministic per seed; id forms render as design.md §3 says."""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

import pytest

from p5rec.prompts import templates as T
from p5rec.prompts.templates import RenderConfig, load_templates, make_context, render_records, render_split, validate

from template_fixtures import FakeIndex, FakePrepared

P5_COUNTS = {"rating": 10, "sequential": 13, "explanation": 12, "review": 4, "direct": 8}
P5_UNSEEN = {"1-10", "2-13", "3-12", "4-4", "5-8"}
ALL_SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def shipped():
    return load_templates()


@pytest.fixture(scope="module")
def prepared():
    return FakePrepared()


def _p5_structured(ts):
    """The templates mirroring P5's Amazon set: numeric ids "<family>-<n>"."""
    return [t for t in ts if t.family in P5_COUNTS and t.id.split("-")[1].isdigit()]


# ------------------------------------------------------------------------------------------ inventory
def test_inventory_mirrors_p5(shipped):
    p5 = _p5_structured(shipped)
    assert len(p5) == 47
    assert Counter(t.family for t in p5) == P5_COUNTS
    assert {t.id for t in p5 if not t.seen} == P5_UNSEEN
    # ids are 1..n within each family
    for fam, n in P5_COUNTS.items():
        prefix = {"rating": "1", "sequential": "2", "explanation": "3", "review": "4", "direct": "5"}[fam]
        assert sorted(t.id for t in p5 if t.family == fam) == sorted(f"{prefix}-{i}" for i in range(1, n + 1))


def test_ranking_and_title_variants(shipped):
    ranking = shipped.by_family("ranking")
    assert {t.scoring for t in ranking} == {"pointwise", "pairwise", "listwise"}
    titles = [t for t in shipped if t.needs_titles]
    assert {t.id for t in titles} >= {"2-T1", "5-T1"}
    assert all("T" in t.id for t in titles)
    assert {t.family for t in titles} == {"sequential", "direct", "ranking"}


def test_every_template_is_short(shipped):
    for t in shipped:
        words = [w for w in T._new_env().from_string(t.source).render(
            {v: "X" if v not in ("history", "candidates", "history_titles", "candidate_titles", "ranked_candidates")
             else ["X", "Y"] for v in t.variables}).split()]
        assert len(words) <= 25, (t.id, t.source)


@pytest.mark.parametrize("path", T.shipped_files(), ids=lambda p: p.parent.name)
def test_shipped_files_validate_clean(path):
    assert validate(path) == []


def test_template_set_api(shipped):
    assert shipped.get("2-1").family == "sequential"
    with pytest.raises(KeyError):
        shipped.get("nope")
    assert len(shipped.seen()) + len(shipped.unseen()) == len(shipped) == len(list(shipped))
    assert set(shipped.families) == set(P5_COUNTS) | {"ranking"}
    only = load_templates(families=["review"])
    assert [t.id for t in only] == ["4-1", "4-2", "4-3", "4-4"]
    # each set compiles with its own environment
    assert only.env is not shipped.env


# ------------------------------------------------------------------------------------------ rendering
@pytest.mark.parametrize("split", ALL_SPLITS)
def test_every_template_renders_on_fake_dataset(shipped, prepared, split):
    cfg = RenderConfig(include_unseen=True, renders={f: 30 for f in shipped.families}, sequence_renders=30)
    rendered = set()
    for fam in shipped.families:
        stats: dict = {}
        ds = render_split(prepared, fam, split, cfg, shipped, stats=stats)
        assert ds.column_names == list(T.ROW_COLUMNS)
        assert all(ds["target"]) and all(ds["source"])
        assert set(ds["family"]) == {fam}
        assert not stats.get("templates_skipped_no_titles")
        for row in ds:
            t = shipped.get(row["template"])
            if t.answer_choices:
                assert row["target"] in t.answer_choices
                assert row["answer"] == row["target"]
            if t.answers_item:
                assert row["answer"] == row["item"] and row["answer"] in _catalogue()
            if t.variables & T.CANDIDATE_FIELDS:
                assert row["answer"] in row["candidates"] or t.answer_choices
            assert "{{" not in row["source"] and "Undefined" not in row["source"]
        rendered |= set(ds["template"])
    assert rendered == {t.id for t in shipped}


def _catalogue():
    from template_fixtures import CATALOGUE

    return set(CATALOGUE)


def test_eval_candidates_are_the_saved_ones(shipped, prepared):
    ds = render_split(prepared, "direct", "test", RenderConfig(template_ids=["5-5"]), shipped)
    saved = {r["user"]: r for r in prepared.family("direct")["test"]}
    assert len(ds) == len(saved)
    for row in ds:
        assert row["candidates"] == saved[row["user"]]["candidates"]
        assert row["answer"] == saved[row["user"]]["target"] in row["candidates"]
    seq = render_split(prepared, "sequential", "test", RenderConfig(template_ids=["2-7"]), shipped)
    for row in seq:
        assert row["candidates"] == saved[row["user"]]["candidates"]


def test_train_negatives_are_never_touched(shipped, prepared):
    touched = prepared.user_items()
    cfg = RenderConfig(template_ids=["5-1", "5-5", "R-5"], renders={"direct": 20, "ranking": 20}, n_list=4)
    for fam in ("direct", "ranking"):
        ds = render_split(prepared, fam, "train", cfg, shipped)
        for row in ds:
            if row["target"] == "no":
                assert row["item"] not in touched[row["user"]]
            for c in row["candidates"]:
                assert c == row["answer"] or c not in touched[row["user"]]
            if row["template"] == "R-5":
                assert len(row["candidates"]) == 4
        if fam == "direct":
            assert {"yes", "no"} <= set(ds["target"])


def test_unseen_only_when_asked(shipped, prepared):
    ds = render_split(prepared, "sequential", "test", RenderConfig(), shipped)
    assert "2-13" not in set(ds["template"])
    ds = render_split(prepared, "sequential", "test", RenderConfig(template_ids=["2-13"]), shipped)
    assert set(ds["template"]) == {"2-13"}


def test_title_templates_skipped_without_titles(shipped):
    bare = FakePrepared(with_titles=False)
    stats: dict = {}
    ds = render_split(bare, "sequential", "train", RenderConfig(renders={"sequential": 20}), shipped, stats=stats)
    assert stats["templates_skipped_no_titles"] == 2
    assert not {"2-T1", "2-T2"} & set(ds["template"])
    with_titles = render_split(FakePrepared(), "sequential", "test", RenderConfig(template_ids=["2-T1"]), shipped)
    assert "Gadget 1 deluxe" in with_titles[0]["source"]


def test_missing_rating_rows_dropped_and_counted(shipped):
    p = FakePrepared(nan_rating=True)
    stats: dict = {}
    ds = render_split(p, "rating", "train", RenderConfig(renders={"rating": 3}), shipped, stats=stats)
    assert stats["dropped_missing_data"] == 3
    assert len(ds) == 3 * (len(p.family("rating")["train"]) - 1)


def test_deterministic_per_seed(shipped, prepared):
    def rows(seed):
        cfg = RenderConfig(seed=seed, renders={"sequential": 3, "direct": 3})
        out = []
        for fam in ("sequential", "direct"):
            out += render_split(prepared, fam, "train", cfg, shipped).to_list()
        return out

    assert rows(1) == rows(1)
    assert rows(1) != rows(2)


def test_template_weights_shift_renders_within_a_family(shipped, prepared):
    def counts(weights):
        cfg = RenderConfig(renders={"explanation": 20}, template_weights=weights)
        return Counter(r["template"] for r in render_split(prepared, "explanation", "train", cfg, shipped).to_list())

    even, hinted = counts({}), counts({"3-9": 50.0, "3-10": 0.0})
    assert sum(even.values()) == sum(hinted.values())  # the family's share of the mixture is unchanged
    assert hinted["3-9"] > 0.5 * sum(hinted.values()) > even["3-9"]
    assert "3-10" not in hinted and even["3-10"] > 0


def test_template_weights_flag_parses_and_rejects_bad_input():
    from p5rec.train.training import DataArguments, _template_weights

    args = DataArguments(template_weights="3-9=3, 3-10=0.5")
    assert args.template_weight_map() == {"3-9": 3.0, "3-10": 0.5}
    weights = _template_weights(args, load_templates())
    assert weights["3-9"] == 3.0 and weights["5-5"] == args.candidate_template_weight
    for bad in ("3-9", "3-9=x", "3-9=-1", "=2"):
        with pytest.raises(ValueError, match="--template_weights: expected"):
            DataArguments(template_weights=bad).template_weight_map()
    with pytest.raises(ValueError, match="unknown template ids"):
        _template_weights(DataArguments(template_weights="9-99=2"), load_templates())


def test_template_weight_key_sets_the_default_and_the_flag_overrides_it(tmp_path):
    """A template's `weight:` is its training share by default (the shipped hint templates take 8); the flag wins;
    a weight that is not a positive number is one validation line."""
    from p5rec.train.training import DataArguments, _template_weights

    shipped = load_templates()
    assert [shipped.get(t).weight for t in ("3-9", "3-10", "3-11", "3-1")] == [8.0, 8.0, 8.0, None]
    weights = _template_weights(DataArguments(), shipped)
    assert weights["3-9"] == 8.0 and "3-1" not in weights and weights["5-5"] == 0.3
    assert _template_weights(DataArguments(template_weights="3-9=2"), shipped)["3-9"] == 2.0
    f = _write(tmp_path, GOOD.replace("    seen: true\n", "    seen: true\n    weight: 2.5\n"))
    assert validate(f) == [] and load_templates(paths=[f]).get("X-1").weight == 2.5
    for bad in ("0", "-1", "many", "true"):
        f = _write(tmp_path, GOOD.replace("    seen: true\n", f"    seen: true\n    weight: {bad}\n"))
        [p] = _only(validate(f), "format")
        assert p.template == "X-1" and "'weight' must be a positive number" in str(p)


def test_token_and_text_forms(shipped):
    t = shipped.get("2-1")
    rec = {"user": "U3", "history": ["A5", "A9"], "target": "A2"}
    [(src, tgt)] = render_records(t, [rec], FakeIndex(), RenderConfig(id_form="token"))
    assert "<i5><i9>" in src and "<u3>" in src and tgt == "<i2>"
    [(src, tgt)] = render_records(t, [rec], FakeIndex(), RenderConfig(id_form="text"))
    assert "item_5 , item_9" in src and "user_3" in src and tgt == "item_2"


def test_anonymous_users_leave_no_user_id_or_name(shipped):
    from p5rec.prompts.mixture import id_tokens
    from p5rec.prompts.templates import ANONYMOUS_USER

    cfg = RenderConfig(anonymous_users=True)
    rec = {"user": "U3", "user_name": "Ann", "history": ["A5", "A9"], "target": "A2"}
    [(src, tgt)] = render_records(shipped.get("2-1"), [rec], FakeIndex(), cfg)
    assert src.startswith(ANONYMOUS_USER) and "<u3>" not in src and "<i5><i9>" in src and tgt == "<i2>"
    [(src, _)] = render_records(shipped.get("2-3"), [rec], FakeIndex(), cfg)
    assert "Ann" not in src and src.startswith(ANONYMOUS_USER)
    # and the tokenizer gets no user tokens
    from p5rec.data.indexing import Index

    index = Index("random", {"U3": "1", "U4": "2"}, {"A5": "1", "A9": "2"})
    assert id_tokens(index, "token", users=False) == ["<i1>", "<i2>"]
    assert set(id_tokens(index, "token")) == {"<u1>", "<u2>", "<i1>", "<i2>"}


def test_history_keeps_most_recent(shipped):
    t = shipped.get("2-1")
    rec = {"user": "U1", "history": [f"A{i}" for i in range(1, 21)], "target": "A2"}
    [(src, _)] = render_records(t, [rec], FakeIndex(), RenderConfig(max_history=3))
    assert "<i18><i19><i20>." in src and "<i17>" not in src


def test_render_records_yes_no_per_candidate(shipped):
    t = shipped.get("5-1")
    recs = [{"user": "U1", "target": "A7", "item": c} for c in ("A7", "A8", "A9")]
    out = render_records(t, recs, FakeIndex(), RenderConfig())
    assert [tgt for _, tgt in out] == ["yes", "no", "no"]
    assert out[1][0] == "Will <u1> interact with <i8>? yes or no"


def test_make_context_fields_and_fallbacks():
    ctx = make_context("rating", {"user": "U2", "item": "A3", "rating": 4.0, "user_name": ""}, FakeIndex())
    assert ctx["user_name"] == "<u2>"  # no name -> the user surface
    assert ctx["rating"] == "4"
    assert set(ctx) >= {"user", "user_name", "item", "rating", "star"}
    assert make_context("rating", {"user": "U2", "item": "A3", "rating": 4.5}, FakeIndex())["rating"] == "4.5"


def test_surfaces_computed_once_per_id(shipped, prepared):
    p = FakePrepared()
    render_split(p, "sequential", "train", RenderConfig(renders={"sequential": 20}), shipped)
    assert p.index.calls <= len(_catalogue()) + 4  # every item and user converted at most once


# ------------------------------------------------------------------------------------------ validation
HEADER = """\
family: sequential
data: sequential
schema:
  user: user id surface
  history: list of item surfaces
  target: next item surface
  item: asked item
templates:
"""


def _write(tmp_path: Path, body: str) -> Path:
    f = tmp_path / "templates.yaml"
    f.write_text(HEADER + textwrap.dedent(body), encoding="utf-8")
    return f


GOOD = """\
  - id: "X-1"
    name: good
    seen: true
    scoring: generation
    fields: [user, history, target]
    source: "{{ user }} had {{ history | ids }}. Next?"
    target: "{{ target }}"
"""


def _only(problems, kind):
    hits = [p for p in problems if p.kind == kind]
    assert hits, problems
    return hits


def test_validate_user_file_ok(tmp_path):
    f = _write(tmp_path, GOOD)
    assert validate(f) == []
    ts = load_templates(paths=[f])
    assert ts.get("X-1").file == str(f) and "2-1" in ts


def test_validate_bad_jinja(tmp_path):
    f = _write(tmp_path, GOOD + """\
  - id: "X-2"
    name: broken
    seen: true
    scoring: generation
    fields: [user, target]
    source: "{{ user }} wants {% if %}"
    target: "{{ target }}"
""")
    [p] = _only(validate(f), "jinja")
    assert (p.file, p.line, p.template) == (str(f), 16, "X-2")
    assert f"{f}:16: [X-2] jinja:" in str(p)
    with pytest.raises(T.TemplateError):
        load_templates(paths=[f])


def test_validate_undefined_variable(tmp_path):
    f = _write(tmp_path, GOOD + """\
  - id: "X-2"
    name: typo
    seen: true
    scoring: generation
    fields: [user, target]
    source: "{{ usr }} next?"
    target: "{{ target }}"
""")
    [p] = _only(validate(f), "undefined_variable")
    assert (p.file, p.line, p.template) == (str(f), 16, "X-2") and "usr" in p.message


def test_validate_duplicate_id_in_file_and_against_shipped(tmp_path):
    f = _write(tmp_path, GOOD + GOOD.replace("name: good", "name: other") + GOOD.replace('"X-1"', '"2-1"').replace("name: good", "name: third"))
    dups = _only(validate(f), "duplicate_id")
    by_id = {p.template: p for p in dups}
    assert by_id["X-1"].line == 16 and by_id["X-1"].file == str(f)
    assert by_id["2-1"].line == 23 and "shipped" in by_id["2-1"].message


def test_validate_duplicate_name(tmp_path):
    f = _write(tmp_path, GOOD + GOOD.replace('"X-1"', '"X-2"'))
    [p] = _only(validate(f), "duplicate_name")
    assert (p.line, p.template) == (16, "X-2")


def test_validate_missing_target(tmp_path):
    f = _write(tmp_path, GOOD + """\
  - id: "X-2"
    name: no_target
    seen: true
    scoring: generation
    fields: [user]
    source: "{{ user }} next?"
""")
    [p] = _only(validate(f), "missing_target")
    assert (p.file, p.line, p.template) == (str(f), 16, "X-2")


def test_validate_answer_choices_target_cannot_produce(tmp_path):
    f = _write(tmp_path, GOOD + """\
  - id: "X-2"
    name: yes_no_wrong
    seen: true
    scoring: choice
    answer_choices: ["yes", "no"]
    fields: [user, item, target]
    source: "Is {{ item }} next for {{ user }}?"
    target: "{{ 'true' if item == target else 'no' }}"
""")
    [p] = _only(validate(f), "answer_choices")
    assert (p.file, p.line, p.template) == (str(f), 16, "X-2") and "'true'" in p.message


def test_validate_choice_needs_answer_choices_and_known_scoring(tmp_path):
    f = _write(tmp_path, GOOD + """\
  - id: "X-2"
    name: no_choices
    seen: true
    scoring: choice
    fields: [user, item, target]
    source: "Is {{ item }} next for {{ user }}?"
    target: "{{ 'yes' if item == target else 'no' }}"
  - id: "X-3"
    name: odd_scoring
    seen: true
    scoring: vibes
    fields: [user, target]
    source: "{{ user }}?"
    target: "{{ target }}"
""")
    probs = validate(f)
    assert _only(probs, "answer_choices")[0].template == "X-2"
    [p] = _only(probs, "unknown_scoring")
    assert (p.line, p.template) == (23, "X-3")


def test_validate_unknown_field_and_yaml_error(tmp_path):
    f = _write(tmp_path, GOOD.replace("fields: [user, history, target]", "fields: [user, history, target, rating]"))
    [p] = _only(validate(f), "unknown_field")
    assert (p.line, p.template) == (9, "X-1")
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: x\ntemplates:\n  - id: [unclosed\n", encoding="utf-8")
    [p] = _only(validate(bad), "yaml")
    assert p.file == str(bad) and p.line >= 3


# ------------------------------------------------------------------------------------------ CLI
def _cli(argv, capsys):
    from p5rec.cli import build_parser

    args = build_parser(argv).parse_args(argv)
    rc = args.func(args)
    return rc, capsys.readouterr().out


def test_cli_list_validate_preview(tmp_path, capsys):
    rc, out = _cli(["templates", "list"], capsys)
    assert rc == 0 and "2-13" in out and "unseen" in out and "sequential" in out
    rc, out = _cli(["templates", "list", "--family", "review", "--unseen"], capsys)
    assert "4-4" in out and "4-1" not in out
    rc, out = _cli(["templates", "validate"], capsys)
    assert rc == 0 and out.strip().startswith("OK:")
    bad = _write(tmp_path, GOOD.replace("{{ target }}", "{{ tgt }}"))
    rc, out = _cli(["templates", "validate", str(bad)], capsys)
    assert rc == 1 and f"{bad}:9: [X-1] undefined_variable" in out
    rc, out = _cli(["templates", "preview", "2-1", "-n", "2", "--id-form", "text"], capsys)
    assert rc == 0 and out.count("source:") == 2 and "item_" in out
