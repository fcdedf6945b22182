"""Where outputs go and how they are written: atomic replacement, the file a partial evaluation writes, and the
checks `p5rec predict --output` makes before any decoding. Fast: no model is trained or loaded here (the end-to-end
cases run on a trained run in test_pipeline.py and test_faults.py)."""

import json
import os
from pathlib import Path

import pytest

from p5rec import atomic
from p5rec.cli import main as cli
from p5rec.eval.evaluation import EvalConfig, is_partial, results_path


# --- p5rec.atomic ------------------------------------------------------------------------------------------------


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    atomic.write_text(target, "old")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # the usual permissions, not tempfile's 0600

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_text(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    with pytest.raises(FileNotFoundError):
        atomic.write_text(tmp_path / "missing" / "x.json", "new")


def test_replace_dir_keeps_the_old_directory_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a").write_text("old")
    new = atomic.make_temporary_dir(target)
    assert atomic.stale_siblings(target) == [new]
    (new / "a").write_text("new")
    real_rename = os.rename

    def fail_second(src, dst):
        if Path(src) == new:
            raise OSError("interrupted")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_second)
    with pytest.raises(OSError, match="interrupted"):
        atomic.replace_dir(new, target)
    assert (target / "a").read_text() == "old"  # put back
    monkeypatch.setattr(os, "rename", real_rename)
    atomic.replace_dir(new, target)
    assert (target / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- evaluate: a partial evaluation never replaces results.json --------------------------------------------------


def test_results_path_full_and_partial(tmp_path):
    full = EvalConfig()
    assert not is_partial(full) and results_path(tmp_path, full) == tmp_path / "results.json"
    # every family named, in another order, and settings that do not change the numbers: still the full one
    assert results_path(tmp_path, EvalConfig(families=tuple(reversed(full.families)), batch_size=7,
                                             progress=False)) == tmp_path / "results.json"
    partial = [EvalConfig(families=("sequential",)), EvalConfig(templates=("2-1",)), EvalConfig(split="valid"),
               EvalConfig(max_cases=12), EvalConfig(templates=("2-1",), max_cases=12),
               EvalConfig(templates=("2-1",), num_beams=5)]
    paths = [results_path(tmp_path, c) for c in partial]
    assert all(is_partial(c) for c in partial)
    assert len(set(paths)) == len(paths) and tmp_path / "results.json" not in paths
    assert [p.name.split("-")[1] for p in paths] == ["test", "test", "valid", "test", "test", "test"]
    assert all(p.parent == tmp_path and p.suffix == ".json" and len(p.stem.split("-")[2]) == 12 for p in paths)
    # deterministic, and the same selection in any order is the same file
    assert results_path(tmp_path, EvalConfig(templates=("2-7", "2-1"))) == \
        results_path(tmp_path, EvalConfig(templates=("2-1", "2-7")))
    assert results_path(tmp_path, EvalConfig(templates=("2-1",), batch_size=3)) == paths[1]


# --- predict --output: checked before the run is even opened ----------------------------------------------------


def test_predict_output_is_checked_before_decoding(tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"task": "rating", "user": "u", "item": "i"}) + "\n")
    answers = tmp_path / "answers.jsonl"
    answers.write_text("earlier answers\n")
    no_run = tmp_path / "no-run"  # a run that does not exist: the output check must come first
    cases = [
        (["--output", str(answers)], f"--output {answers} exists; pass --overwrite"),
        (["--output", str(requests), "--overwrite"], "is the --input file"),
        (["--output", str(tmp_path / "." / "requests.jsonl"), "--overwrite"], "is the --input file"),
        (["--output", str(tmp_path / "nowhere" / "a.jsonl")], f"directory {tmp_path / 'nowhere'} does not exist"),
        (["--output", str(tmp_path)], "is a directory"),
    ]
    for flags, message in cases:
        assert cli(["predict", "--run", str(no_run), "--input", str(requests), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)
    if hasattr(os, "link"):
        alias = tmp_path / "alias.jsonl"  # a hard link to the input is the input
        os.link(requests, alias)
        assert cli(["predict", "--run", str(no_run), "--input", str(requests), "--output", str(alias),
                    "--overwrite"]) == 2
        assert "is the --input file" in capsys.readouterr().err
    assert answers.read_text() == "earlier answers\n"
    assert json.loads(requests.read_text())["task"] == "rating"
    # a free output path gets past the check, to the run (which is missing here)
    assert cli(["predict", "--run", str(no_run), "--input", str(requests), "--output", str(tmp_path / "new")]) == 2
    assert "no such run directory" in capsys.readouterr().err
