"""Shared test set-up: fully offline, a private cache, deterministic threads; the tiny trained run."""

import json
import os
import tempfile
from pathlib import Path

import pytest

# Set at import, before any fixture of any scope runs, so nothing a test does touches ~/.cache/p5rec.
os.environ["P5REC_CACHE"] = tempfile.mkdtemp(prefix="p5rec-test-cache-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """test_pipeline's tiny MI run, trained 2 steps with one checkpoint; same data and mixture settings, so the
    prepared data and the tokenized mixture are shared through the session's cache. Read-only: a test that damages
    a run copies it first (test_hostile_inputs.py, test_serve.py)."""
    import torch
    from test_pipeline import TINY

    from p5rec.training import main as train_main

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert train_main(TINY + ["--output_dir", str(out), "--max_steps", "2", "--save_steps", "2",
                              "--eval_strategy", "no", "--skip_test", "true", "--eval_users", "0"]) == 0
    return out


@pytest.fixture(scope="session")
def ids(tiny_run) -> tuple[list[str], list[str]]:
    """(sorted raw user ids, sorted raw item ids) of the tiny run."""
    index = json.loads((tiny_run / "index.json").read_text())
    return sorted(index["users"]), sorted(index["items"])
