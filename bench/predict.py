"""Inference throughput of a trained run: next-item requests per second at batch sizes 1 and 64 (CPU or GPU).

    python bench/predict.py --run runs/<time>-amazon2014-musical-instruments-mini-random --out bench/results/predict-cpu.json

Requests are the run's real test histories (with their users), answered by ``P5Rec.recommend_batch`` with the
same trie-restricted decoding as evaluation; both batch sizes answer the same requests in one process.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from p5rec.serve.inference import P5Rec
from p5rec.data.prepare import load_prepared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("bench/results/predict.json"))
    args = ap.parse_args()
    rec = P5Rec.from_pretrained(args.run)
    prepared = load_prepared(json.loads((args.run / "run_config.json").read_text())["prepared_dir"])
    test = prepared.family("sequential")["test"].select(range(args.requests))
    requests = [{"user": u, "history": h} for u, h in zip(test["user"], test["history"])]
    report = {"run": str(args.run), "threads": torch.get_num_threads(), "device": str(rec.model.device), "rows": []}
    rec.recommend_batch(requests[:8], k=args.k)  # warm-up
    for batch in (1, 64):
        t0 = time.perf_counter()
        for i in range(0, len(requests), batch):
            rec.recommend_batch(requests[i : i + batch], k=args.k)
        secs = time.perf_counter() - t0
        report["rows"].append({"batch": batch, "requests_per_s": round(len(requests) / secs, 1),
                               "ms_per_request": round(1000 * secs / len(requests), 2)})
        print(report["rows"][-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
