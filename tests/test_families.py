"""Family specs: the header of tasks/<family>/templates.yaml declares the family; Python only reads it."""

import json
from pathlib import Path

import pytest

import p5rec.prompts.families as F
import p5rec.prompts.templates as T
from p5rec.eval.evaluation import protocol_of, results_markdown
from p5rec.data.prepare import FAMILY_DIRS

ROOT = Path(__file__).resolve().parents[1]

TEMPLATE = """
  - id: "S-1"
    name: stars_ids
    seen: true
    scoring: generation
    fields: [user, item, rating]
    source: "Stars from {{ user }} for {{ item }}?"
    target: "{{ rating }}"
"""


def _family_file(tmp_path, header: str, name: str = "stars.yaml") -> Path:
    path = tmp_path / name
    path.write_text(header + "schema:\n  user: u\n  item: i\n  rating: r\ntemplates:" + TEMPLATE)
    return path


def test_shipped_files_come_from_this_checkout():
    assert F.tasks_root() == ROOT / "tasks"
    assert all(p.is_relative_to(ROOT / "tasks") for p in T.shipped_files())


def test_shipped_specs_declare_every_protocol_their_templates_are_scored_by():
    templates = T.load_templates()
    specs = F.shipped_specs()
    assert list(specs) == ["sequential", "direct", "rating", "explanation", "review", "ranking"]  # by `order`
    assert F.main_families() == ("sequential", "direct", "rating", "explanation", "review")
    assert F.main_renders() == "sequential=3,direct=2,rating=2,explanation=6,review=3"
    for t in templates:
        assert protocol_of(t) in specs[t.family].protocols, (t.id, protocol_of(t))
    for spec in specs.values():
        assert spec.data in FAMILY_DIRS
        if spec.curve:
            assert set(spec.curve.protocols) <= set(spec.protocols)
        for role, (known, new) in spec.inference.items():
            assert templates.get(known).family == spec.family and templates.get(new).family == spec.family
    for spec in specs.values():  # a field the contrast prompt leaves empty is shown by one of its text templates
        shown = set().union(*(t.variables - t.target_variables for t in templates.by_family(spec.family)))
        assert set(spec.decoding.without) <= shown, spec.family
    assert specs["review"].decoding.contrast > 0  # chosen on validation (bench/README.md)
    for spec in specs.values():  # a chosen text is a training text of a field every text template shows
        if spec.decoding.choose:
            for t in templates.by_family(spec.family):
                assert spec.decoding.choose in t.variables - t.target_variables, (spec.family, t.id)
    assert specs["explanation"].decoding.choose == "item"  # chosen on validation (bench/README.md)
    roles = [r for s in specs.values() for r in s.inference]
    assert sorted(roles) == sorted(F.ROLES)  # every role P5Rec uses, each declared once


@pytest.mark.parametrize("header, problem", [
    ("family: stars\ndata: rating\norder: first\n", "order: expected an integer, got 'first'"),
    ("family: stars\ndata: rating\ntrain: yes please\n", "train: expected true or false, got 'yes please'"),
    ("family: stars\ndata: rating\nrenders: -1\n", "renders: expected a whole number >= 0, got -1"),
    ("family: stars\ndata: rating\nprotocols: [rating]\n", "protocols: expected a mapping of protocol name"),
    ("family: stars\ndata: rating\nprotocols:\n  rating: {metrics: RMSE}\n",
     "protocols.rating.metrics: expected a list of metric names, got 'RMSE'"),
    ("family: stars\ndata: rating\nprotocols:\n  rating: {metrics: [RMSE], headline: MAE}\n",
     "protocols.rating.headline: expected one of its metrics (RMSE), got 'MAE'"),
    ("family: stars\ndata: rating\nprotocols:\n  rating: {metric: [RMSE]}\n",
     "protocols.rating: unknown key(s) metric; expected metrics, headline, baselines"),
    ("family: stars\ndata: rating\nbaselines: {mean: global mean}\n",
     "baselines.mean: expected a mapping with a method name"),
    ("family: stars\ndata: rating\ntask: [rating]\n", "task: expected a task type"),
    ("family: stars\ndata: rating\ncurve: {protocols: [rating]}\n", "curve.metric: expected a metric name, got None"),
    ("family: stars\ndata: rating\ncurve: {protocols: [], metric: RMSE}\n",
     "curve.protocols: expected a non-empty list of protocol names, got []"),
    ("family: stars\ndata: rating\ninference: {rate: S-1}\n", "inference.rate: expected a role P5Rec uses"),
    ("family: stars\ndata: rating\ninference: {rating_stars: [S-1]}\n", "inference.rating_stars: expected a role"),
    ("family: stars\ndata: rating\ninference: {explain: [S-1, S-9]}\n",
     "inference.explain: expected a template id of this file, got 'S-9'"),
    ("family: stars\ndata: rating\ndecoding: 3\n", "decoding: expected a mapping with contrast, without"),
    ("family: stars\ndata: rating\ndecoding: {contrast: -1, without: [item]}\n",
     "decoding.contrast: expected a number >= 0, got -1"),
    ("family: stars\ndata: rating\ndecoding: {contrast: 2, without: [item], plausibility: 1.5}\n",
     "decoding.plausibility: expected a number in [0, 1), got 1.5"),
    ("family: stars\ndata: rating\ndecoding: {contrast: 2, without: [review]}\n",
     "decoding.without: review not in the family's schema (user, item, rating)"),
    ("family: stars\ndata: rating\ndecoding: {contrast: 2}\n",
     "decoding.without: expected the fields the contrast prompt leaves empty"),
    ("family: stars\ndata: rating\ndecoding: {contrast: 2, without: [item], beams: 4}\n",
     "decoding: unknown key(s) beams; expected contrast, without, plausibility, choose"),
    ("family: stars\ndata: rating\ndecoding: {choose: shop}\n",
     "decoding.choose: shop not in the family's schema (user, item, rating)"),
    ("family: stars\ndata: rating\ndecoding: {choose: item, hints: [colour]}\n",
     "decoding.hints: colour not in the family's schema"),
    ("family: stars\ndata: rating\ndecoding: {choose: item, candidates: 0}\n",
     "decoding.candidates: expected an integer >= 1, got 0"),
    ("family: stars\ndata: rating\ndecoding: {choose: item, length_penalty: -1}\n",
     "decoding.length_penalty: expected a number >= 0, got -1"),
    ("family: stars\ndata: rating\ndecoding: {choose: item, contrast: 2, without: [user]}\n",
     "decoding: choose and contrast exclude each other"),
    ("family: stars\ndata: rating\ndecoding: {candidates: 4}\n",
     "decoding: hints, candidates and length_penalty need choose"),
])
def test_a_bad_header_is_one_line_naming_file_and_field(tmp_path, header, problem):
    path = _family_file(tmp_path, header)
    with pytest.raises(T.TemplateError) as exc:
        T.load_templates(paths=[path], include_shipped=False)
    lines = [str(p) for p in exc.value.problems]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith(f"{path}:") and problem in lines[0], lines
    assert any(str(p).startswith(f"{path}:") and problem in str(p) for p in T.validate(path))


def test_a_role_belongs_to_one_family_and_a_family_is_declared_once(tmp_path):
    clash = _family_file(tmp_path, "family: stars\ndata: rating\ninference: {rating: S-1}\n")
    with pytest.raises(T.TemplateError, match="inference.rating: already declared by family 'rating'"):
        T.load_templates(paths=[clash])
    # a file adding templates to a shipped family repeats family/data/schema and nothing else
    extra = _family_file(tmp_path, "family: rating\ndata: rating\nrenders: 9\n", "extra.yaml")
    with pytest.raises(T.TemplateError, match="renders: family 'rating' is declared by .*may only add templates"):
        T.load_templates(paths=[extra])
    ok = _family_file(tmp_path, "family: rating\ndata: rating\n", "ok.yaml")
    ts = T.load_templates(paths=[ok])
    shipped = F.shipped_specs()["rating"].renders
    assert "S-1" in ts and ts.family_info("rating").renders == shipped != 9  # the shipped declaration stands


def test_a_new_family_defaults_to_no_main_job_and_no_headline(tmp_path):
    ts = T.load_templates(paths=[_family_file(tmp_path, "family: stars\ndata: rating\n")])
    spec = ts.family_info("stars")
    assert (spec.train, spec.renders, spec.protocols, spec.curve, spec.inference) == (False, 1, {}, None, {})
    assert spec.order > max(s.order for s in F.shipped_specs().values())


def test_results_markdown_follows_the_specs():
    """The headline metric, its baseline and a family's columns come from the spec, not from Python."""
    spec, problems = F.parse_spec({"family": "stars", "data": "rating", "protocols": {
        "rating": {"metrics": ["MAE", "RMSE"], "headline": "MAE", "baselines": ["nope", "global mean"]}}}, "x.yaml")
    assert not problems
    row = {"template": "S-1", "family": "stars", "seen": True, "scoring": "generation", "kind": "rating",
           "protocol": "rating", "metrics": {"RMSE": 1.25, "MAE": 0.5}, "n": 4, "invalid": 0}
    report = {"split": "test", "run": "r", "model": {"preset": "tiny", "parameters": 1e6},
              "decoding": {"id_form": "token"}, "templates": {"S-1": row},
              "families": {"stars": {"rating": {"seen": {"RMSE": 1.25, "MAE": 0.5}, "unseen": {}}}},
              "baselines": {"stars": {"global mean": {"RMSE": 1.1, "MAE": 0.9, "n": 4}}}}
    md = results_markdown(report, specs={"stars": spec})
    assert "| stars | rating | MAE | 0.5000 | – | 0.9000 (global mean) |" in md
    assert "| template | protocol | seen | n | MAE | RMSE |" in md
    assert "| stars |" not in results_markdown(report, specs={})  # no spec: no headline row


def test_shipped_headline_metrics_are_reported_by_a_real_run():
    """Every declared headline metric is a key the protocol writes (checked on the committed MI results)."""
    report = json.loads((ROOT / "bench" / "results" / "mi-main-results.json").read_text())
    for fam, protos in report["families"].items():
        for proto, groups in protos.items():
            declared = F.shipped_specs()[fam].protocols[proto]
            if declared.headline:
                assert declared.headline in (groups["seen"] or groups["unseen"]), (fam, proto)


# ------------------------------------------------------------------------------------------------ the bar
NEW_FAMILY = """# A family that is only this file: star ratings asked two new ways, on the prepared rating table.
family: stars
data: rating
renders: 2
protocols:
  rating: {metrics: [RMSE, MAE], headline: RMSE, baselines: [biased MF, the usual star]}
baselines:
  the usual star: {method: global mean, field: rating}
curve: {protocols: [rating], metric: MAE}
schema:
  user: user id surface
  item: item id surface
  rating: the true star rating as text
templates:
  - id: "S-1"
    name: stars_ids
    seen: true
    scoring: generation
    fields: [user, item, rating]
    source: "How many stars from {{ user }} for {{ item }}?"
    target: "{{ rating }}"
  - id: "S-2"
    name: stars_ids_unseen
    seen: false
    scoring: generation
    fields: [user, item, rating]
    source: "{{ item }} gets how many stars from {{ user }}?"
    target: "{{ rating }}"
"""


TINY = [
    "--dataset", str(ROOT / "data" / "samples" / "mi_tiny.json.gz"), "--preset", "tiny", "--vocab_size", "500",
    "--per_device_train_batch_size", "16", "--max_steps", "8", "--eval_steps", "8", "--save_steps", "8",
    "--logging_steps", "4", "--eval_users", "8", "--disable_tqdm", "true", "--learning_rate", "5e-3",
]


def test_a_new_family_is_a_folder_trained_and_evaluated_without_python(tmp_path):
    """The bar: a family folder outside the package, passed with --template_files, trains and is evaluated."""
    import torch

    from p5rec.cli import main as cli
    from p5rec.train.training import main as train_main
    torch.set_num_threads(1)
    folder = tmp_path / "tasks" / "stars"
    folder.mkdir(parents=True)
    (folder / "templates.yaml").write_text(NEW_FAMILY)
    assert cli(["templates", "validate", str(folder / "templates.yaml")]) == 0
    out = tmp_path / "run"
    assert train_main(TINY + ["--output_dir", str(out), "--families", "stars", "--template_files",
                              str(folder / "templates.yaml"), "--skip_test", "true", "--sasrec_baseline",
                              "false"]) == 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["mixture"]["trained_templates"] == ["S-1"] and config["render"]["renders"]["stars"] == 2
    curve = json.loads((out / "learning_curve.json").read_text())
    assert curve[-1]["stars"]["template"] == "S-1" and "MAE" in curve[-1]["stars"]  # the spec's curve metric

    assert cli(["evaluate", "--run", str(out), "--families", "stars", "--max-users", "12", "--no-sasrec"]) == 0
    written = sorted(out.glob("results-test-*.json"))
    assert len(written) == 1
    report = json.loads(written[0].read_text())
    assert set(report["templates"]) == {"S-1", "S-2"}
    groups = report["families"]["stars"]["rating"]
    assert groups["seen"]["RMSE"] >= 0 and groups["unseen"]["RMSE"] >= 0
    # the baselines the spec names, computed by the methods it names, on the same cases
    assert set(report["baselines"]["stars"]) == {"biased MF", "the usual star"}
    assert report["baselines"]["stars"]["the usual star"]["RMSE"] > 0
    md = written[0].with_suffix(".md").read_text()
    assert "| stars | rating | RMSE |" in md and "## stars" in md
    assert "| template | protocol | seen | n | RMSE | MAE |" in md


def test_p5rec_defaults_are_the_roles_the_specs_declare():
    from p5rec.serve.inference import P5Rec
    from p5rec.prompts.templates import RenderConfig

    class Index:
        users, items = {"u1": 0}, {"i1": 0}

    rec = P5Rec(None, None, Index(), T.load_templates(), RenderConfig(), trained={"2-1"}, trie=object())
    specs = F.shipped_specs()
    for spec in specs.values():
        for role, (known, new) in spec.inference.items():
            assert (rec.default_template(role), rec.default_template(role, known_user=False)) == (known, new)
    assert rec._recommend_template(True) == specs["sequential"].inference["recommend"][0]  # no sequence template trained
    # recommending and ranking with a history also take the direct family's candidate templates, nothing else
    direct = specs["direct"].inference["rank_direct"][0]
    assert rec._template(direct, "rank").family == "direct"
    with pytest.raises(ValueError, match="belongs to family 'rating', not 'sequential'"):
        rec._template(specs["rating"].inference["rating"][0], "recommend")
    bare = P5Rec(None, None, Index(), T.load_templates(families=["rating"]), RenderConfig(), trie=object())
    with pytest.raises(ValueError, match="no family of this run declares a default template for 'summarize'"):
        bare.default_template("summarize")


def test_a_bad_family_file_stops_training_with_one_line(tmp_path, capsys):
    from p5rec.train.training import main as train_main

    bad = _family_file(tmp_path, "family: stars\ndata: rating\nrenders: many\n")
    assert train_main(TINY + ["--output_dir", str(tmp_path / "run"), "--template_files", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train: {bad}:3: [] family: renders: expected a whole number >= 0, got 'many'"]


def test_a_baseline_with_an_unknown_method_is_refused_naming_the_file(tmp_path):
    from p5rec.eval.evaluation import EvalConfig, run_baselines
    from template_fixtures import FakePrepared

    path = _family_file(tmp_path, "family: stars\ndata: rating\nprotocols:\n  rating: {metrics: [RMSE], "
                                  "baselines: [oracle]}\n")
    specs = {"stars": T.load_templates(paths=[path], include_shipped=False).family_info("stars")}
    prepared = FakePrepared()
    prepared.has_family = lambda name: True
    with pytest.raises(ValueError, match=f"{path}: baseline 'oracle' of protocol 'rating': unknown method 'oracle'"):
        run_baselines(prepared, EvalConfig(families=("stars",)), specs)
