"""Hostile and broken inputs: each gets one clear line (file, line or field, what was expected), nothing runs that a
template should not run, and nothing good is lost next to something bad.

Covers the template sandbox, template validation, `p5rec templates preview`, `p5rec predict` requests, numeric
arguments, readers (P5 duplicate users, ratings), damaged run/checkpoint/prepared files, and a bounded load test of
`p5rec predict` (bench/predict_load.py) on a tiny run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import textwrap
from pathlib import Path

import pytest

from p5rec.prompts import templates as T
from p5rec.cli import main as cli
from p5rec.data.readers import DataFormatError, read

ROOT = Path(__file__).resolve().parents[1]


def one_line(text: str) -> str:
    """The text, asserted to be exactly one line and no traceback."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def argparse_error(argv: list[str], capsys) -> str:
    """Run the CLI expecting argparse to refuse ``argv``: exit status 2, its error as the last stderr line."""
    with pytest.raises(SystemExit) as info:
        cli(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ template sandbox
HEADER = textwrap.dedent("""\
    family: sequential
    data: sequential
    schema: {user: user id surface, history: history, target: target}
    templates:
    """)


def entry(tid: str, source: str, target: str = "{{ target }}", fields: str = "[user, history, target]") -> str:
    return textwrap.indent(textwrap.dedent(f"""\
        - id: "{tid}"
          name: n_{tid.replace('-', '_')}
          seen: true
          scoring: generation
          fields: {fields}
          source: "{source}"
          target: "{target}"
        """), "  ")


def template_file(tmp_path: Path, *entries: str, header: str = HEADER) -> Path:
    f = tmp_path / "templates.yaml"
    f.write_text(header + "".join(entries), encoding="utf-8")
    return f


def test_sandbox_escape_neither_runs_nor_validates(tmp_path, capsys):
    marker = tmp_path / "escaped"
    escapes = [  # the example, and one that reaches os through builtins (ran under the plain environment)
        f"{{{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}}} {{{{ user }}}}",
        f"{{{{ cycler.__init__.__globals__.__builtins__['__import__']('os').popen('touch {marker}').read() }}}}",
    ]
    f = template_file(tmp_path, entry("E-1", escapes[0], fields="[user, target]"),
                      entry("E-2", escapes[1], fields="[user, target]"))
    problems = T.validate(f)
    by_id = {p.template: p for p in problems if p.kind == "sandbox"}
    assert set(by_id) == {"E-1", "E-2"}, problems
    assert str(by_id["E-1"]).startswith(f"{f}:5: [E-1] sandbox: source: reaches for '__init__', '__globals__'")
    assert (by_id["E-2"].line, by_id["E-2"].file) == (12, str(f))
    rc = cli(["templates", "validate", str(f)])
    out = capsys.readouterr().out
    assert rc == 1 and "OK" not in out and f"{f}:5: [E-1] sandbox:" in out
    with pytest.raises(T.TemplateError, match="sandbox"):
        T.load_templates(paths=[f])
    assert cli(["templates", "preview", "E-1", "--file", str(f)]) == 2
    assert "sandbox" in one_line(capsys.readouterr().err)
    assert not marker.exists()


def test_sandbox_guards_the_fast_render_path(tmp_path, capsys):
    """A name computed at render time escapes the static check; the sandbox still stops it on the path that
    render_split takes (``_render``), and validate reports it as a sandbox problem. Mutating a field is refused."""
    env = T._new_env()
    assert env.sandboxed
    computed = env.from_string("{{ user | attr('_' ~ '_class__') }}")
    with pytest.raises(T.SecurityError):
        T._render(computed, {"user": "<u1>"})
    history = ["<i1>", "<i2>"]
    with pytest.raises(T.SecurityError):
        T._render(env.from_string("{{ history.append('<i9>') }}{{ history | ids }}"), {"history": history})
    assert history == ["<i1>", "<i2>"]
    f = template_file(tmp_path, entry("E-3", "{{ user | attr('_' ~ '_class__') }} {{ user }}",
                                      fields="[user, target]"))
    [p] = [p for p in T.validate(f) if p.kind == "sandbox"]
    assert str(p).startswith(f"{f}:5: [E-3] sandbox: refused by the template sandbox: access to attribute "
                             "'__class__' of 'str' object is unsafe")
    assert cli(["templates", "preview", "E-3", "--file", str(f)]) == 2
    assert one_line(capsys.readouterr().err).startswith(f"p5rec templates preview: {f}:5: [E-3] SecurityError: ")
    # the shipped templates render as before under the sandbox
    assert all(not T.validate(path) for path in T.shipped_files(["sequential"]))


def test_validate_flags_source_that_renders_empty(tmp_path):
    f = template_file(tmp_path, entry("X-1", "{{ user }} next?"),
                      entry("X-2", "{% if history | length > 99 %}{{ user }}{% endif %}"))
    problems = T.validate(f)
    assert [str(p) for p in problems] == [f"{f}:12: [X-2] render: source renders empty on a synthetic record"]


def test_validate_flags_unknown_family_without_a_prepared_table(tmp_path):
    header = "family: mystery\nschema: {user: user id surface, target: target}\ntemplates:\n"
    f = template_file(tmp_path, entry("M-1", "{{ user }}?", fields="[user, target]"), header=header)
    [p] = T.validate(f)
    assert (p.file, p.line, p.kind) == (str(f), 1, "family")
    assert "family 'mystery' is not a known family" in p.message and "data 'mystery' is not a prepared table" \
        in p.message and "sequential" in p.message
    # a new family that reads a real table is fine
    f.write_text(f.read_text().replace("family: mystery\n", "family: mystery\ndata: sequential\n"))
    assert T.validate(f) == []


# ------------------------------------------------------------------------------------------ templates preview
def test_preview_unknown_template_id(capsys):
    assert cli(["templates", "preview", "9-99"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("p5rec templates preview: no template '9-99'")


def test_preview_dataset_that_is_not_prepared(tmp_path, capsys):
    (tmp_path / "raw.csv").write_text("user,item\n")
    assert cli(["templates", "preview", "2-1", "--dataset", str(tmp_path)]) == 2
    line = one_line(capsys.readouterr().err)
    assert str(tmp_path) in line and "not a prepared dataset (no manifest.json)" in line


@pytest.fixture(scope="module")
def p5seq_prepared(tmp_path_factory):
    """A prepared P5 sequence dataset: sequential and direct only (no ratings, no text)."""
    from p5rec.data.prepare import prepare

    base = tmp_path_factory.mktemp("p5seq")
    (base / "raw").mkdir()
    lines = [f"{u} " + " ".join(str((u * 3 + j) % 12 + 1) for j in range(6)) for u in range(1, 9)]
    (base / "raw" / "sequential_data.txt").write_text("\n".join(lines) + "\n")
    return prepare(base / "raw", base / "prepared", fmt="p5seq", k=2, n_negatives=2)


def test_preview_family_the_dataset_lacks(p5seq_prepared, capsys):
    assert cli(["templates", "preview", "1-1", "--dataset", str(p5seq_prepared)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "has no 'rating' table for template 1-1" in line and "no ratings in the source" in line
    assert "sequential, direct" in line
    assert cli(["templates", "preview", "2-1", "--dataset", str(p5seq_prepared), "-n", "1"]) == 0  # what it has


# ------------------------------------------------------------------------------------------ numeric arguments
@pytest.mark.parametrize("argv, option, minimum", [
    (["evaluate", "--run", "nowhere", "--max-users", "-1"], "--max-users", 0),
    (["evaluate", "--run", "nowhere", "--max-candidate-users", "-1"], "--max-candidate-users", 0),
    (["evaluate", "--run", "nowhere", "--beams", "0"], "--beams", 1),
    (["evaluate", "--run", "nowhere", "--batch-size", "three"], "--batch-size", 1),
    (["data", "prepare", "--path", "nowhere", "--k", "-5"], "--k", 0),
    (["data", "prepare", "--path", "nowhere", "--n-negatives", "0"], "--n-negatives", 1),
    (["predict", "--run", "nowhere", "--task", "sequential", "-k", "0"], "-k", 1),
    (["predict", "--run", "nowhere", "--task", "sequential", "-k", "-2"], "-k", 1),
])
def test_numeric_argument_out_of_range(argv, option, minimum, capsys):
    line = argparse_error(argv, capsys)
    assert f"argument {option}: expected an integer >= {minimum}, got '{argv[-1]}'" in line


# ------------------------------------------------------------------------------------------ readers
def test_p5seq_user_listed_twice_is_refused(tmp_path):
    (tmp_path / "sequential_data.txt").write_text("1 1 2 3\n2 4 2\n\n1 5 6\n")
    with pytest.raises(DataFormatError) as info:
        read("p5seq", tmp_path)
    assert one_line(str(info.value)) == (f"{tmp_path / 'sequential_data.txt'} line 4: user '1' is listed twice "
                                         "(lines 1 and 4); a P5 sequence file has one line per user")
    assert info.value.line == 4
    skipped = read("p5seq", tmp_path, on_error="skip")  # the first listing kept, the second counted
    assert skipped.counts["malformed"] == 1
    assert skipped.interactions["user"] == ["1", "1", "1", "2", "2"]
    assert skipped.interactions["item"] == ["1", "2", "3", "4", "2"]


GOOD_ROWS = ["u1,i1,4,1393545600", "u1,i2,5,1393545700", "u2,i1,3,1393545800", "u2,i3,,1393545900"]


@pytest.mark.parametrize("value, expected", [
    ("42", "field 'score' (for 'rating') is '42', outside the rating range [0, 10]"),
    ("-1", "field 'score' (for 'rating') is '-1', outside the rating range [0, 10]"),
    ("inf", "field 'score' (for 'rating') is not a finite number: 'inf'"),
    ("NaN", "field 'score' (for 'rating') is not a finite number: 'NaN'"),
])
def test_rating_out_of_range_or_not_finite(tmp_path, value, expected):
    path = tmp_path / "log.csv"
    path.write_text("\n".join(["uid,iid,score,ts", *GOOD_ROWS[:2], f"u3,i2,{value},1393546000", *GOOD_ROWS[2:]]))
    columns = {"user": "uid", "item": "iid", "rating": "score", "timestamp": "ts"}
    with pytest.raises(DataFormatError) as info:
        read("csv", path, columns=columns)
    assert one_line(str(info.value)) == f"{path} line 4: {expected}"
    result = read("csv", path, columns=columns, on_error="skip")
    assert result.counts["malformed"] == 1 and result.counts["interactions"] == 4
    ratings = result.interactions["rating"]
    assert ratings[:3] == [4.0, 5.0, 3.0] and math.isnan(ratings[3])  # a missing rating stays NaN (implicit)


def test_rating_out_of_range_in_a_rated_format(tmp_path):
    lines = [json.dumps({"reviewerID": "U1", "asin": "A1", "overall": 5.0}),
             json.dumps({"reviewerID": "U2", "asin": "A1", "overall": 42}),
             json.dumps({"reviewerID": "U3", "asin": "A2", "overall": "NaN"})]
    path = tmp_path / "reviews_X.json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"reviews_X.json line 2: field 'overall' is 42, outside the rating"):
        read("amazon2014", path)
    result = read("amazon2014", path, on_error="skip")
    assert result.counts["malformed"] == 2 and result.interactions["user"] == ["U1"]


def test_rating_mapped_to_a_timestamp_column_names_the_column(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("\n".join(["uid,iid,score,ts", *GOOD_ROWS]))
    columns = {"user": "uid", "item": "iid", "rating": "ts"}
    with pytest.raises(DataFormatError, match=r"line 2: field 'ts' \(for 'rating'\) is '1393545600', outside"):
        read("csv", path, columns=columns)
    with pytest.raises(DataFormatError) as info:
        read("csv", path, columns=columns, on_error="skip")
    line = one_line(str(info.value))
    assert line.startswith(f"{path}: column 'ts', mapped to 'rating' by columns=, does not hold ratings: 4 of 4")


def test_corrupt_parquet_names_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": ["u1", "u2"], "item": ["i1", "i2"]}), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError) as info:
        read("parquet", path)
    assert one_line(str(info.value)).startswith(f"{path}: not a readable Parquet file")


# ------------------------------------------------------------------------------------------ a tiny run
# quick_run (2 steps, checkpoint-2) and ids: tests/conftest.py


def copy_run(run: Path, dest: Path) -> Path:
    return Path(shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoint-*")))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ------------------------------------------------------------------------------------------ predict requests
BAD_REQUESTS = {  # kind -> (line text, the error it must get)
    "not_json": ('{"task": "sequential", "history": [', "not JSON (Expecting value"),
    "not_object": ("[1, 2, 3]", "not a JSON object (found an array)"),
    "k_text": ({"task": "sequential", "k": "three"}, "field 'k' must be a positive integer, got \"three\""),
    "k_negative": ({"task": "sequential", "k": -1}, "field 'k' must be a positive integer, got -1"),
    "k_zero": ({"task": "sequential", "k": 0}, "field 'k' must be a positive integer, got 0"),
    "candidates_number": ({"task": "direct", "candidates": 5}, "field 'candidates' must be a non-empty list"),
    "user_list": ({"task": "rating", "user": ["a", "b"], "item": "x"}, "field 'user' must be a string"),
    "history_text": ({"task": "sequential", "history": "abc"}, "field 'history' must be a list of strings"),
    "missing_item": ({"task": "rating", "user": "someone"}, "field 'item' is required for task 'rating'"),
    "unknown_task": ({"task": "dance"}, "unknown task 'dance'"),
    "unknown_item": ({"task": "sequential", "history": ["NOPE"]}, "unknown item 'NOPE'"),
}


@pytest.fixture(scope="module")
def batch(quick_run, ids, tmp_path_factory):
    """One request file: a good request, then each bad kind followed by a good one; answered once."""
    users, items = ids
    good = [{"task": "sequential", "user": users[i], "history": items[i : i + 3], "k": 3} for i in range(12)]
    good[3] = {"task": "rating", "user": users[1], "item": items[1]}
    good[5] = {"task": "direct", "user": users[2], "candidates": items[:5]}
    good[7] = {"task": "sequential", "user": users[0], "history": items[:2], "k": 2, "template": "2-1"}
    lines, where = [json.dumps(good[0])], {}
    for j, (kind, (bad, _)) in enumerate(BAD_REQUESTS.items()):
        lines.append(bad if isinstance(bad, str) else json.dumps(bad))
        where[kind] = len(lines)
        lines.append(json.dumps(good[j + 1]))
    path = tmp_path_factory.mktemp("batch") / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = path.with_name("answers.jsonl")
    assert cli(["predict", "--run", str(quick_run), "--input", str(path), "--output", str(out)]) == 0
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    return lines, where, answers


def test_predict_batch_answers_every_good_line_in_order(batch):
    lines, where, answers = batch
    assert [a["line"] for a in answers] == list(range(1, len(lines) + 1))
    bad = set(where.values())
    for a in answers:
        if a["line"] in bad:
            continue
        assert "error" not in a, a
        assert a["request"] == json.loads(lines[a["line"] - 1])
        k = a["request"].get("k")
        assert ("rating" in a) if a["request"]["task"] == "rating" else (len(a["items"]) == (k or 5))


@pytest.mark.parametrize("kind", list(BAD_REQUESTS))
def test_predict_batch_bad_line_gets_its_own_error(batch, kind):
    lines, where, answers = batch
    n = where[kind]
    [answer] = [a for a in answers if a["line"] == n]
    assert answer["error"].startswith(f"line {n}: ") and BAD_REQUESTS[kind][1] in answer["error"], answer
    assert "items" not in answer and "rating" not in answer
    one_line(answer["error"])


def test_predict_single_request_missing_field(quick_run, capsys):
    assert cli(["predict", "--run", str(quick_run), "--task", "rating", "--user", "someone"]) == 2
    assert one_line(capsys.readouterr().err) == "p5rec predict: field 'item' is required for task 'rating'"


# ------------------------------------------------------------------------------------------ damaged run files
@pytest.mark.parametrize("name, damage", [
    ("config.json", "missing"), ("config.json", "truncated"),
    ("tokenizer.json", "missing"), ("tokenizer.json", "truncated"),
    ("model.safetensors", "missing"), ("model.safetensors", "truncated"),
    ("run_config.json", "truncated"), ("index.json", "truncated"),
])
def test_damaged_run_file_is_one_line_naming_it(quick_run, tmp_path, capsys, name, damage):
    from p5rec.run import Run, RunError

    run = copy_run(quick_run, tmp_path / "run")
    if damage == "missing":
        (run / name).unlink()
    else:
        truncate(run / name)
    with pytest.raises(RunError) as info:
        Run.open(run, device="cpu")
    names_it = lambda text: str(run / name) in text or f"missing {name}" in text  # noqa: E731
    assert names_it(one_line(str(info.value))), info.value
    for argv in (["evaluate", "--run", str(run), "--no-sasrec"],
                 ["predict", "--run", str(run), "--task", "sequential", "--history", "x"]):
        assert cli(argv) == 2, argv
        line = one_line(capsys.readouterr().err)
        assert line.startswith(f"p5rec {argv[0]}: ") and names_it(line), line
    assert not (run / "results.json").exists()


def test_damaged_prepared_manifest_is_one_line_naming_it(quick_run, tmp_path, capsys):
    from p5rec.data.prepare import PreparedError, load_prepared
    from p5rec.run import Run, RunError

    source = Path(json.loads((quick_run / "run_config.json").read_text())["prepared_dir"])
    prepared = Path(shutil.copytree(source, tmp_path / "prepared"))
    manifest = prepared / "manifest.json"
    good = manifest.read_text()
    truncate(manifest)
    with pytest.raises(PreparedError) as info:
        load_prepared(prepared)
    assert one_line(str(info.value)).startswith(f"{manifest} line ")
    assert "not valid JSON" in str(info.value)
    manifest.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "families"}))
    with pytest.raises(PreparedError, match="field 'families' is missing"):
        load_prepared(prepared)
    for argv in (["data", "stats", str(prepared)], ["templates", "preview", "2-1", "--dataset", str(prepared)]):
        assert cli(argv) == 2, argv
        assert str(manifest) in one_line(capsys.readouterr().err)
    # a run whose prepared data is damaged says so, naming the manifest
    run = copy_run(quick_run, tmp_path / "run")
    config = json.loads((run / "run_config.json").read_text())
    (run / "run_config.json").write_text(json.dumps({**config, "prepared_dir": str(prepared)}))
    with pytest.raises(RunError, match=f"damaged: {manifest}: field 'families'"):
        Run.open(run, device="cpu").prepared()


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_resume_from_corrupt_optimizer_is_refused_before_training(quick_run, tmp_path, capsys, damage):
    from test_pipeline import TINY

    from p5rec.train.training import main as train_main

    checkpoint = Path(shutil.copytree(quick_run / "checkpoint-2", tmp_path / "checkpoint-2"))
    optimizer = checkpoint / "optimizer.pt"
    if damage == "truncated":
        truncate(optimizer)
    else:  # same length, one byte changed inside a stored tensor: only the zip member's checksum tells
        data = bytearray(optimizer.read_bytes())
        data[len(data) // 2] ^= 0xFF
        optimizer.write_bytes(bytes(data))
    out = tmp_path / "resumed"
    assert train_main(TINY + ["--output_dir", str(out), "--resume_from_checkpoint", str(checkpoint)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"train: {optimizer}: ") and ("truncated" in line or "corrupt" in line)
    assert not out.exists()  # refused before anything was prepared, rendered or trained


# ------------------------------------------------------------------------------------------ bounded load test
def test_predict_load_bench_on_a_tiny_run(quick_run, tmp_path):
    spec = importlib.util.spec_from_file_location("predict_load", ROOT / "bench" / "predict_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.load_test(quick_run, tmp_path, n=300, malformed=0.05, seed=1, in_process=True)
    assert report["ok"], report["problems"]
    assert report["malformed"] == 15 and report["errors"] == 15 and report["answered"] == 285
    assert set(report["malformed_kinds"]) == set(bench.MALFORMED)
    assert report["requests_per_s"] > 0 and report["cli_requests_per_s"] > 0
    # the check itself fails when an answer is missing or a bad line is answered
    lines = (tmp_path / "answers.jsonl").read_text().splitlines()
    answers = [json.loads(x) for x in lines]
    _, bad = bench.build_requests(*[sorted(json.loads((quick_run / "index.json").read_text())[k]) for k in
                                    ("users", "items")], 300, 0.05, 1)
    assert bench.check_answers(answers, 300, bad) == []
    assert bench.check_answers(answers[:-1], 300, bad)
    first_bad = min(bad)
    doctored = [dict(a, items=[]) if a["line"] == first_bad else a for a in answers]
    doctored[first_bad - 1].pop("error")
    assert any(f"line {first_bad}" in p for p in bench.check_answers(doctored, 300, bad))
