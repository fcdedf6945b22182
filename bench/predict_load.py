"""Bounded load test of ``p5rec predict --input``: N requests from a run's real users and items, some malformed.

    python bench/predict_load.py --run runs/<run> --out bench/results/predict-load.json

Builds a JSONL file of ``--requests`` lines (default 10,000): next-item, candidate-ranking and rating requests on
the run's own users and items, with ``--malformed`` of them (default 5 %) broken in the ways a client breaks them
(a line that is not JSON, a JSON array, ``"k": "three"``, ``"k": -1``, ``"k": 0``, ``"candidates": 5``,
``"user": [...]``, ``"history": "abc"``, a rating request without its item, an unknown task). Runs the real CLI,
``p5rec predict --run RUN --input FILE --output FILE``, in a subprocess, then checks the answers line by line:
every good line is answered (no error) and every bad one is an error object naming its line and what is wrong,
all in input order. Reports requests/s (wall clock of the whole command, model loading included, and the CLI's
own answering rate) as JSON to ``--out``; exits 1 if any line is answered wrongly.

The same functions run on a tiny run in tests/test_hostile_inputs.py (a few hundred requests, in-process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

# kind -> (builder of the bad line from a good user/item pool, text its error must contain)
Bad = Callable[[random.Random, list[str], list[str]], str]


def _seq(rng: random.Random, users: list[str], items: list[str], **extra) -> dict:
    return {"task": "sequential", "user": rng.choice(users), "history": rng.sample(items, min(len(items), 4)),
            "k": 10, **extra}


def _rating(rng: random.Random, users: list[str], items: list[str], **extra) -> dict:
    return {"task": "rating", "user": rng.choice(users), "item": rng.choice(items), **extra}


MALFORMED: dict[str, tuple[Bad, str]] = {
    "not_json": (lambda rng, u, i: json.dumps(_seq(rng, u, i))[:-7], "not JSON"),
    "not_object": (lambda rng, u, i: "[1, 2, 3]", "not a JSON object"),
    "k_text": (lambda rng, u, i: json.dumps(_seq(rng, u, i, k="three")), "field 'k'"),
    "k_negative": (lambda rng, u, i: json.dumps(_seq(rng, u, i, k=-1)), "field 'k'"),
    "k_zero": (lambda rng, u, i: json.dumps(_seq(rng, u, i, k=0)), "field 'k'"),
    "candidates_number": (lambda rng, u, i: json.dumps({"task": "direct", "user": rng.choice(u), "candidates": 5}),
                          "field 'candidates'"),
    "user_list": (lambda rng, u, i: json.dumps(_rating(rng, u, i, user=u[:2])), "field 'user'"),
    "history_text": (lambda rng, u, i: json.dumps(_seq(rng, u, i, history="abc")), "field 'history'"),
    "missing_item": (lambda rng, u, i: json.dumps({"task": "rating", "user": rng.choice(u)}),
                     "field 'item' is required for task 'rating'"),
    "unknown_task": (lambda rng, u, i: json.dumps({"task": "dance", "user": rng.choice(u)}), "unknown task 'dance'"),
}


def build_requests(users: list[str], items: list[str], n: int, malformed: float = 0.05,
                   seed: int = 0) -> tuple[list[str], dict[int, str]]:
    """``n`` JSONL lines and {1-based line: malformed kind} for the broken ones (kinds in turn, lines at random).

    Good lines: 80 % next-item (a random 4-item history), 10 % ranking of 10 candidates, 10 % rating; every id is
    one of ``users``/``items``, so a good line has no reason to fail.
    """
    if not users or len(items) < 10:
        raise ValueError(f"need users and at least 10 items, got {len(users)} users and {len(items)} items")
    rng = random.Random(seed)
    n_bad = round(n * malformed)
    bad_lines = sorted(rng.sample(range(1, n + 1), n_bad))
    kinds = list(MALFORMED)
    bad = {line: kinds[j % len(kinds)] for j, line in enumerate(bad_lines)}
    lines = []
    for line in range(1, n + 1):
        if line in bad:
            lines.append(MALFORMED[bad[line]][0](rng, users, items))
            continue
        roll = rng.random()
        if roll < 0.8:
            req = _seq(rng, users, items)
        elif roll < 0.9:
            req = {"task": "direct", "user": rng.choice(users), "candidates": rng.sample(items, 10)}
        else:
            req = _rating(rng, users, items)
        lines.append(json.dumps(req))
    return lines, bad


def check_answers(answers: list[dict], n: int, bad: dict[int, str]) -> list[str]:
    """What is wrong with the answers to ``n`` lines whose broken ones are ``bad`` (empty: all is well).

    Each line must have exactly one answer, in input order; a good line an answer without ``error``; a bad line an
    ``error`` that starts with ``line N:`` and contains its kind's expected text.
    """
    problems = []
    got = [a.get("line") for a in answers]
    if got != list(range(1, n + 1)):
        problems.append(f"answers are for lines {got[:5]}... ({len(got)} answers), expected 1..{n} in order")
    for a in answers:
        line = a.get("line")
        if line in bad:
            want = MALFORMED[bad[line]][1]
            err = a.get("error", "")
            if not err.startswith(f"line {line}: ") or want not in err:
                problems.append(f"line {line} ({bad[line]}): expected an error with {want!r}, got {a}")
        elif "error" in a:
            problems.append(f"line {line}: a good request failed: {a['error']}")
    return problems


def run_predict(run: Path, requests: Path, answers: Path, in_process: bool = False) -> tuple[float, str]:
    """Run ``p5rec predict --input`` (a subprocess, or in this process for tests); (seconds, its stderr)."""
    argv = ["predict", "--run", str(run), "--input", str(requests), "--output", str(answers)]
    t0 = time.perf_counter()
    if in_process:
        import contextlib
        import io

        from p5rec.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(argv)
        stderr = err.getvalue()
    else:
        proc = subprocess.run([sys.executable, "-m", "p5rec.cli", *argv], capture_output=True, text=True)
        rc, stderr = proc.returncode, proc.stderr
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"p5rec predict exited with {rc}: {stderr.strip()[-2000:]}")
    return seconds, stderr


def load_test(run: Path, work: Path, n: int = 10_000, malformed: float = 0.05, seed: int = 0,
              in_process: bool = False) -> dict:
    """Build the requests in ``work``, answer them with the CLI, check every line; the report as a dict."""
    index = json.loads((run / "index.json").read_text(encoding="utf-8"))
    users, items = sorted(index["users"]), sorted(index["items"])
    lines, bad = build_requests(users, items, n, malformed, seed)
    work.mkdir(parents=True, exist_ok=True)
    requests, answers_path = work / "requests.jsonl", work / "answers.jsonl"
    requests.write_text("\n".join(lines) + "\n", encoding="utf-8")
    seconds, stderr = run_predict(run, requests, answers_path, in_process)
    answers = [json.loads(x) for x in answers_path.read_text(encoding="utf-8").splitlines()]
    problems = check_answers(answers, n, bad)
    rate = re.search(r"\(([\d.]+) requests/s\)", stderr)
    kinds: dict[str, int] = {}
    for kind in bad.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "run": str(run),
        "requests": n,
        "malformed": len(bad),
        "malformed_kinds": kinds,
        "answered": sum("error" not in a for a in answers),
        "errors": sum("error" in a for a in answers),
        "ok": not problems,
        "problems": problems[:20],
        "wall_seconds": round(seconds, 2),
        "requests_per_s": round(n / seconds, 1),  # whole command: start-up and model loading included
        "cli_requests_per_s": float(rate.group(1)) if rate else None,  # the CLI's own: answering only
        "in_process": in_process,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "omp_threads": os.environ.get("OMP_NUM_THREADS")},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path, help="run directory written by train.py")
    ap.add_argument("--requests", type=int, default=10_000, help="lines in the request file")
    ap.add_argument("--malformed", type=float, default=0.05, help="share of malformed lines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="keep the request/answer files here (default: a "
                    "temporary directory, removed afterwards)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/predict-load.json"))
    args = ap.parse_args()
    if args.work is not None:
        report = load_test(args.run, args.work, args.requests, args.malformed, args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="predict-load-") as tmp:
            report = load_test(args.run, Path(tmp), args.requests, args.malformed, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: report[k] for k in ("requests", "malformed", "answered", "errors", "ok",
                                             "requests_per_s", "cli_requests_per_s")}))
    for p in report["problems"]:
        print(p, file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
