"""Benchmark SASRec on a prepared dataset's sequential split and write one JSON result.

    python bench/sasrec.py --prepared DIR --epochs N --out bench/results/sasrec-<name>.json

Reads ``DIR/sequential`` (a ``datasets.DatasetDict`` saved with ``save_to_disk``, design.md section 2)
directly, so it does not depend on the rest of the preparation code. Protocol: :func:`p5rec.eval.sasrec.evaluate_sasrec`
(train on ``seq[:-2]``, early-stop on valid NDCG@10, score ``seq[:-1] -> seq[-1]``). The JSON holds the
metrics (with and without history exclusion), the full config, wall-clock seconds, torch version, thread
count and device, so a number can be traced back to how it was produced.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import time
from pathlib import Path

import datasets
import torch

from p5rec import __version__
from p5rec.eval import sasrec as S

logger = logging.getLogger("bench.sasrec")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = S.SASRecConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", required=True, help="prepared dataset directory (has sequential/)")
    p.add_argument("--out", required=True, help="JSON file to write, e.g. bench/results/sasrec-beauty.json")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--loss", choices=["ce", "bce"], default=defaults.loss)
    p.add_argument("--hidden", type=int, default=defaults.hidden)
    p.add_argument("--blocks", type=int, default=defaults.blocks)
    p.add_argument("--heads", type=int, default=defaults.heads)
    p.add_argument("--dropout", type=float, default=defaults.dropout)
    p.add_argument("--max-len", type=int, default=defaults.max_len)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--patience", type=int, default=defaults.patience)
    p.add_argument("--max-seconds", type=float, default=None, help="training time budget (validation excluded)")
    p.add_argument("--select-on", choices=["exclude_history", "all_items"], default="exclude_history",
                   help="validation NDCG@10 that picks the best epoch: history items excluded, or allowed")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--k", type=int, default=20, help="length of the ranked lists (only MRR depends on it)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = reproducible, shares nicely)")
    p.add_argument("--max-users", type=int, default=None,
                   help="smoke runs: keep only the first N users (sorted ids) of valid/test")
    p.add_argument("--save", default=None, help="also save the model (safetensors + JSON) to this directory")
    return p.parse_args(argv)


def _first_users(dd: datasets.DatasetDict, n: int) -> datasets.DatasetDict:
    keep = set(sorted(set(dd["valid"]["user"]))[:n])
    return datasets.DatasetDict({name: split.select([i for i, u in enumerate(split["user"]) if u in keep])
                                 for name, split in dd.items() if name in ("valid", "test")})


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    config = S.SASRecConfig(hidden=args.hidden, blocks=args.blocks, heads=args.heads, dropout=args.dropout,
                            max_len=args.max_len, lr=args.lr, batch=args.batch, epochs=args.epochs,
                            seed=args.seed, loss=args.loss, device=args.device, patience=args.patience,
                            max_seconds=args.max_seconds, select_exclude_history=args.select_on == "exclude_history")
    dd = datasets.load_from_disk(str(Path(args.prepared) / "sequential"))
    if args.max_users:
        dd = _first_users(dd, args.max_users)

    t0 = time.perf_counter()
    train, valid = S.sequential_training_data(dd)
    model, vocab = S.fit(train, config, valid=valid)
    t_fit = time.perf_counter() - t0
    metrics = S.evaluate_sasrec(dd, config, split=args.split, k=args.k, model_and_vocab=(model, vocab))
    t_total = time.perf_counter() - t0
    if args.save:
        S.save(model, vocab, config, args.save)

    result = {
        "model": "sasrec",
        "prepared": str(Path(args.prepared).resolve()),
        "split": args.split,
        "protocol": "train seq[:-2], early stop on valid NDCG@10, score split; full ranking over training items",
        "metrics": metrics,
        "n_users": len(train),
        "n_items": len(vocab),
        "epochs_run": model.epochs_run,
        "best_epoch": model.best_epoch,
        "best_valid_ndcg10": model.best_valid_ndcg10,
        "curve": model.curve,
        "config": dataclasses.asdict(config),
        "max_users": args.max_users,
        "wall_seconds": {"fit": round(t_fit, 2), "total": round(t_total, 2)},
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(next(model.parameters()).device),
        "python": platform.python_version(),
        "p5rec_version": __version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s: %s HR@10 %.4f NDCG@10 %.4f (%.1f s)", out, args.split,
                metrics["exclude_history"]["HR@10"], metrics["exclude_history"]["NDCG@10"], t_total)
    return result


if __name__ == "__main__":
    main()
