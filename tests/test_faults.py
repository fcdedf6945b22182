"""Crashes: a process killed with SIGKILL at a chosen point (a training half-way through writing a checkpoint, a
preparation half-way through writing its tables) loses nothing that was finished, leaves nothing half-written under
an output's name, and the work can go on: the resumed training ends with exactly the weights and learning curve
of an uninterrupted one. Also what training refuses to do to an existing --output_dir.

The child processes wait at the chosen point (a patched function writes a signal file, then sleeps) so that the
kill lands there on every run, however loaded the machine is.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from p5rec.data.prepare import load_prepared, prepare
from p5rec.train.training import last_checkpoint
from p5rec.train.training import main as train_main
from test_prepare import write_amazon

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "samples" / "mi_tiny.json.gz"
# 24 steps, a checkpoint every 6, the learning curve at 12 and 24 (a few seconds once the mixture is cached)
TRAIN = [
    "--dataset", str(SAMPLE), "--preset", "tiny", "--vocab_size", "300", "--families", "sequential",
    "--templates", "2-1", "--renders", "sequential=1", "--per_device_train_batch_size", "8", "--max_steps", "24",
    "--save_steps", "6", "--eval_steps", "12", "--logging_steps", "3", "--eval_users", "8", "--skip_test", "true",
    "--sasrec_baseline", "false", "--disable_tqdm", "true", "--learning_rate", "5e-3",
]
KILL_AT = "checkpoint-18"  # killed after writing this checkpoint's weights, before its optimizer and state

# The child: train.py's main with Trainer.save_model patched to stop (signal, then sleep) inside checkpoint KILL_AT.
TRAIN_CHILD = textwrap.dedent("""\
    import os, sys, time
    from pathlib import Path
    from p5rec.train.trainer import P5Trainer
    from p5rec.train.training import main
    stop_in, signal_file = sys.argv[1], Path(sys.argv[2])
    save_model = P5Trainer.save_model
    def save_then_wait(self, output_dir=None, _internal_call=False):
        save_model(self, output_dir, _internal_call)
        if output_dir and Path(output_dir).name == stop_in:
            signal_file.write_text(str(os.getpid()))
            time.sleep(600)
    P5Trainer.save_model = save_then_wait
    sys.exit(main(sys.argv[3:]))
    """)

# The child: prepare() with the table hashing patched to stop after the first table is on disk.
PREPARE_CHILD = textwrap.dedent("""\
    import os, sys, time
    from pathlib import Path
    import p5rec.data.prepare as P
    signal_file = Path(sys.argv[3])
    def hash_then_wait(ds):
        signal_file.write_text(str(os.getpid()))
        time.sleep(600)
    P._table_sha256 = hash_then_wait
    P.prepare(Path(sys.argv[1]), Path(sys.argv[2]), k=2, n_negatives=2, seed=5, overwrite=True)
    """)


def run_and_kill(script: str, args: list[str], signal_file: Path, timeout: float = 240) -> None:
    """Run ``script`` in a child Python, wait until it writes ``signal_file``, SIGKILL it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not signal_file.exists():
            if child.poll() is not None:
                raise AssertionError(f"the child ended ({child.returncode}) before the kill point: "
                                     f"{child.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the child never reached the kill point")
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()


def tree(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directory`` with its bytes and modification time."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def curve(run_dir: Path) -> list[dict]:
    """The learning curve without its wall-clock fields."""
    return [{k: v for k, v in p.items() if k not in ("seconds", "train_seconds")}
            for p in json.loads((run_dir / "learning_curve.json").read_text())]


def losses(run_dir: Path) -> list[tuple]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [(e["step"], e.get("loss"), e.get("eval_loss")) for e in state["log_history"] if "train_runtime" not in e]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A training killed half-way through writing checkpoint-18: checkpoint-12 is complete, 18 is not."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("killed")
    run_dir, signal_file = base / "run", base / "stopped"
    run_and_kill(TRAIN_CHILD, [KILL_AT, str(signal_file), *TRAIN, "--cache_dir", str(base / "cache"),
                               "--output_dir", str(run_dir)], signal_file)
    assert (run_dir / KILL_AT / "model.safetensors").exists()
    assert not (run_dir / KILL_AT / "trainer_state.json").exists()
    return run_dir, base / "cache"


def test_killed_training_resumes_to_the_uninterrupted_result(killed_run, tmp_path):
    from safetensors.torch import load_file

    killed, cache = killed_run
    resumed = tmp_path / "resumed"
    shutil.copytree(killed, resumed)
    last = last_checkpoint(resumed)
    assert last == resumed / "checkpoint-12"  # the half-written checkpoint-18 is passed over
    assert train_main(TRAIN + ["--cache_dir", str(cache), "--output_dir", str(resumed),
                               "--resume_from_checkpoint", str(last)]) == 0
    whole = tmp_path / "whole"
    assert train_main(TRAIN + ["--cache_dir", str(cache), "--output_dir", str(whole)]) == 0

    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [p["step"] for p in curve(whole)] == [12, 24]
    assert curve(resumed) == curve(whole)
    assert losses(resumed) == losses(whole)
    assert is_complete_checkpoint(resumed / KILL_AT)  # rewritten whole by the resumed run


def is_complete_checkpoint(path: Path) -> bool:
    from p5rec.train.training import is_checkpoint

    return is_checkpoint(path) and (path / "optimizer.pt").exists()


def _refused(args, capsys, pattern: str) -> None:
    """train.py stops with exit 2 and one line on stderr (no traceback) matching ``pattern``."""
    assert train_main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train: ")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err[-2000:]
    assert "Traceback" not in err


def test_training_refuses_to_mix_with_an_existing_run(killed_run, tmp_path, capsys):
    killed, cache = killed_run
    run_dir = tmp_path / "run"
    shutil.copytree(killed, run_dir)
    before = tree(run_dir)
    args = TRAIN + ["--cache_dir", str(cache), "--output_dir", str(run_dir)]
    _refused(args, capsys, "already holds a run .*--overwrite_output_dir true")
    # a resume that cannot start fails before anything in the run directory is written
    for checkpoint, why in ((run_dir / "checkpoint-99", "no such directory"), (run_dir / KILL_AT, "incomplete")):
        _refused(args + ["--resume_from_checkpoint", str(checkpoint)], capsys,
                 f"not a checkpoint \\({why}.*checkpoint-12")
    _refused(args + ["--resume_from_checkpoint", str(run_dir / "checkpoint-12"), "--overwrite_output_dir", "true"],
             capsys, "would delete")
    assert tree(run_dir) == before

    # a directory that is not a run is never written into, not even with --overwrite_output_dir
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("\\documentclass{article}")
    _refused(TRAIN + ["--cache_dir", str(cache), "--output_dir", str(mine), "--overwrite_output_dir", "true"], capsys,
             "is not a p5rec run .*thesis.tex")
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]

    # --overwrite_output_dir clears the earlier run's files first (a user's own file stays): nothing old remains
    (run_dir / "notes.txt").write_text("mine")
    assert "mixture:" in (run_dir / "train_log.txt").read_text()  # the killed child logged at INFO
    assert train_main(args + ["--max_steps", "6", "--eval_steps", "6", "--overwrite_output_dir", "true"]) == 0
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-6"]
    assert [p["step"] for p in curve(run_dir)] == [6]
    assert json.loads((run_dir / "trainer_state.json").read_text())["global_step"] == 6
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert "mixture:" not in (run_dir / "train_log.txt").read_text()  # not the earlier run's log


def test_a_runs_log_is_its_own(tmp_path):
    """Two runs in one process: the second run's lines never reach the first run's train_log.txt."""
    import logging

    from p5rec.train.training import _add_file_log

    root = logging.getLogger()
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    try:
        _add_file_log(first)
        logging.getLogger("p5rec.test").warning("line of the first run")
        _add_file_log(second)
        logging.getLogger("p5rec.test").warning("line of the second run")
    finally:
        for handler in [h for h in root.handlers if getattr(h, "p5rec_run_log", False)]:
            root.removeHandler(handler)
            handler.close()
    assert "second" not in first.read_text() and "line of the first run" in first.read_text()
    assert "line of the second run" in second.read_text() and "first" not in second.read_text()


def test_killed_prepare_leaves_the_old_output_whole(tmp_path):
    """SIGKILL half-way through writing the tables: the earlier output under the target name is untouched, the
    half-written one sits only in a hidden sibling, and the next preparation into the same target works."""
    src = write_amazon(tmp_path / "reviews_Tiny_5.json.gz")
    out = prepare(src, tmp_path / "out", k=2, n_negatives=2, seed=3)
    before = tree(out)
    signal_file = tmp_path / "stopped"
    run_and_kill(PREPARE_CHILD, [str(src), str(out), str(signal_file)], signal_file)

    assert tree(out) == before
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp")
    assert (leftovers[0] / "interactions").is_dir() and not (leftovers[0] / "manifest.json").exists()
    assert load_prepared(out).manifest["params"]["seed"] == 3

    prepare(src, out, k=2, n_negatives=2, seed=5, overwrite=True)
    assert load_prepared(out).manifest["params"]["seed"] == 5
    assert set(p.name for p in tmp_path.iterdir()) >= {"out", leftovers[0].name}  # the leftover is reported, not
    # deleted: another process might still be writing it

    fresh = tmp_path / "fresh"  # killed before there was any output: nothing under the target name
    run_and_kill(PREPARE_CHILD, [str(src), str(fresh), str(tmp_path / "stopped2")], tmp_path / "stopped2")
    assert not fresh.exists()
    prepare(src, fresh, k=2, n_negatives=2, seed=5)
    assert load_prepared(fresh).manifest["fingerprint"] == load_prepared(out).manifest["fingerprint"]
