"""Shared test set-up: fully offline, a private cache, deterministic threads."""

import os
import tempfile

# Set at import, before any fixture of any scope runs, so nothing a test does touches ~/.cache/p5rec.
os.environ["P5REC_CACHE"] = tempfile.mkdtemp(prefix="p5rec-test-cache-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
