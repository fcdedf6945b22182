"""Data-parallel training over two CPU processes (accelerate launch, gloo): it trains, checkpoints, resumes and
evaluates as one process does, and one process writes the run directory. About 40 s: two launches of a tiny run."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "configs" / "accelerate" / "cpu.yaml"
# the tiny run (same mixture, so its cache is reused), fewer steps and cases
FEW = [*TINY, "--max_steps", "8", "--eval_steps", "4", "--save_steps", "4", "--logging_steps", "2",
       "--eval_users", "4", "--test_max_cases", "4", "--test_max_candidate_cases", "2", "--sasrec_baseline", "false"]


def launch(args: list[str]) -> subprocess.CompletedProcess:
    with socket.socket() as s:  # a free port: another run on this machine may hold accelerate's default
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
           "--main_process_port", str(port), str(ROOT / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: two processes on two cores
    env.pop("ACCELERATE_USE_CPU", None)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    launch([*FEW, "--output_dir", str(out)])
    return out


def test_two_processes_write_one_well_formed_run(two_process_run, tiny_run):
    run = two_process_run
    trained = json.loads((run / "train_results.json").read_text())
    assert trained["processes"] == 2
    for step in (4, 8):  # a checkpoint holds both processes' random states: both trained
        names = {p.name for p in (run / f"checkpoint-{step}").iterdir()}
        assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "optimizer.pt"} <= names
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["train_batch_size"] == 16
    # one process wrote: one log of one run, one learning curve point per evaluation
    log = (run / "train_log.txt").read_text()
    assert log.count("training done") == 1 and "process 0 of 2" in log and "process 1 of 2" not in log
    curve = json.loads((run / "learning_curve.json").read_text())
    assert [p["step"] for p in curve] == [4, 8]
    assert {"sequential", "direct", "rating", "explanation", "review"} <= set(curve[-1])
    # the same evaluation, in the same format, as the single-process run's
    ours, single = (json.loads((r / "results.json").read_text()) for r in (run, tiny_run))
    assert set(ours) == set(single) and set(ours["templates"]) == set(single["templates"])
    assert {f: set(p) for f, p in ours["families"].items()} == {f: set(p) for f, p in single["families"].items()}
    assert [(r["family"], r["protocol"], r["metric"]) for r in ours["headline"]] == \
        [(r["family"], r["protocol"], r["metric"]) for r in single["headline"]]
    assert all(t["n"] == 4 for t in ours["templates"].values() if t["n"] > 2)
    top = lambda path: [line for line in path.read_text().splitlines() if line.startswith("#")]  # noqa: E731
    assert top(run / "results.md")[1:] == top(tiny_run / "results.md")[1:]
    for name in ("README.md", "results.png", "learning_curve.png", "model.safetensors", "tokenizer.json"):
        assert (run / name).is_file(), name


def test_two_processes_resume_to_the_uninterrupted_weights(two_process_run, tmp_path):
    from safetensors.torch import load_file

    resumed = tmp_path / "resumed"
    shutil.copytree(two_process_run / "checkpoint-4", resumed / "checkpoint-4")
    launch([*FEW, "--output_dir", str(resumed), "--skip_test", "true",
            "--resume_from_checkpoint", str(resumed / "checkpoint-4")])
    a, b = load_file(two_process_run / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "train_results.json").read_text())["processes"] == 2


def test_cpu_launch_flags(monkeypatch, caplog):
    """Several processes and no GPU train on the CPU; `accelerate launch --cpu --num_processes N`, which starts one
    process, is said to."""
    from p5rec.train.training import _cpu_processes

    for name in ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_CPU", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    _cpu_processes()
    assert os.environ.get("ACCELERATE_USE_CPU") == (None if torch.cuda.is_available() else "true")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --cpu --num_processes 2` sets
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with caplog.at_level("WARNING", logger="p5rec.train.training"):
        _cpu_processes()
    assert "started one process" in caplog.text and "configs/accelerate/cpu.yaml" in caplog.text
