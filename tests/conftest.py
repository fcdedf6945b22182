"""Shared test set-up: fully offline, a private cache, deterministic threads."""

import os
import tempfile

# Set at import, before any fixture of any scope runs, so nothing a test does touches ~/.cache/p5rec.
os.environ["P5REC_CACHE"] = tempfile.mkdtemp(prefix="p5rec-test-cache-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "samples" / "mi_tiny.json.gz"
# A tiny run on a real slice of MI: every family, two evaluations, two checkpoints (tens of seconds on a CPU).
TINY = [
    "--dataset", str(SAMPLE), "--preset", "tiny", "--vocab_size", "500",
    "--renders", "sequential=2,direct=1,rating=1,explanation=1,review=1",
    "--per_device_train_batch_size", "16", "--max_steps", "24", "--eval_steps", "12", "--save_steps", "12",
    "--logging_steps", "6", "--eval_users", "8", "--test_max_cases", "12", "--test_max_candidate_cases", "3",
    "--disable_tqdm", "true", "--learning_rate", "5e-3", "--max_source_length", "160",
]
HAS_TENSORBOARD = any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A test that changes torch's thread count (test_families, test_faults) gives it back: results compared to
    the tiny run's must be computed with the thread count it was scored with (sums differ in the 7th digit)."""
    import sys

    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    yield
    if threads is not None:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny run, trained once per session (test_pipeline, test_reports, test_distributed read it; none may
    change it). Logs to TensorBoard when a writer is installed (the test extra brings tensorboardX)."""
    import torch

    from p5rec.train.training import main as train_main

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    extra = ["--report_to", "tensorboard"] if HAS_TENSORBOARD else []
    assert train_main(TINY + extra + ["--output_dir", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> Path:
    """The tiny run's data and mixture, trained 2 steps with one checkpoint (checkpoint-2) and no evaluation: for
    tests that need a run directory and its checkpoint, not its results. Read-only: a test that damages a run
    copies it first (test_hostile_inputs.py)."""
    import torch

    from p5rec.train.training import main as train_main

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("runs") / "quick"
    assert train_main(TINY + ["--output_dir", str(out), "--max_steps", "2", "--save_steps", "2",
                              "--eval_strategy", "no", "--skip_test", "true", "--eval_users", "0"]) == 0
    return out


@pytest.fixture(scope="session")
def ids(tiny_run) -> tuple[list[str], list[str]]:
    """(sorted raw user ids, sorted raw item ids) of the tiny run."""
    import json

    index = json.loads((tiny_run / "index.json").read_text())
    return sorted(index["users"]), sorted(index["items"])
