"""Beauty sequential benchmark: p5rec (random / collaborative / P5's sequential ids) vs SASRec vs popularity.

    python bench/beauty.py --budget cpu      # the 2-core CPU configuration (< 2 h in all)
    python bench/beauty.py --budget gpu      # the full configuration, for a GPU

Same leave-one-out split for every model (P5's own Beauty sequences, last item test, second-last validation),
full-catalogue ranking over all 12,101 items, all 22,363 test users, HR@5/10 and NDCG@5/10. Each step writes
its JSON under ``bench/results/beauty-<budget>/`` and is skipped when that file exists, so an interrupted run
resumes where it stopped. The table is rebuilt from the JSON files at the end (``--table-only`` rebuilds it alone).

What the CPU budget gives up: the ``mini`` preset, about 25 minutes of training per id strategy (3,000 steps of
64 at about 2 steps/s: the 34.5k-token vocabulary of user and item tokens makes the softmax the main cost; well under one
pass over P5's prompt mixture), SASRec with a capped number of epochs, and only the sequential + direct families.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEAUTY = ROOT.parent / "shared" / "data" / "p5-sequential" / "beauty"
logger = logging.getLogger("bench.beauty")

# id strategy name -> (prepare --index, train --id_form, prompt tokens kept). Digit-string ids take ~6 tokens
# per history item (20 items: ~140 tokens), so the text form keeps 256 prompt tokens instead of 128.
STRATEGIES = {"random": ("random", "token", 128), "collaborative": ("collaborative", "token", 128),
              "p5-sequential": ("sequential", "text", 256)}
BUDGETS = {
    "cpu": {"preset": "mini", "max_steps": 3000, "batch": 64, "sasrec_epochs": 20, "extra": []},
    "gpu": {"preset": "small", "max_steps": 60000, "batch": 128, "sasrec_epochs": 200, "extra": ["--bf16", "true"]},
}
# How the prompts are made. "p5": P5's setting (a token per user, sequential + direct families, every template
# kind). "history": SASRec's information (no user ids: every user is "a user"), the sequential family without the
# 100-candidate templates, larger batches; its own steps and batch per budget.
RECIPES = {
    "p5": {"families": "sequential,direct", "renders": "sequential=2,direct=1", "extra": []},
    "history": {
        "families": "sequential", "renders": "sequential=4",
        "extra": ["--anonymous_users", "true", "--candidate_template_weight", "0"],
        "cpu": {"batch": 256, "max_steps": 1000}, "gpu": {"batch": 256, "max_steps": 30000},
    },
}
PUBLISHED = {  # HR@5, NDCG@5, HR@10, NDCG@10 on these sequences
    "SASRec (tuned, later work)": (.0469, .0305, .0688, .0375),
    "TIGER": (.0454, .0321, .0648, .0384),
    "P5 + collaborative ids (Hua et al. 2023)": (.0512, .0356, .0732, .0427),
    "P5-base as published (leaky sequential ids)": (.0508, .0379, .0664, .0429),
}
KEYS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10")


def run(cmd: list[str]) -> None:
    logger.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="p5")
    ap.add_argument("--data", type=Path, default=BEAUTY)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    recipe = RECIPES[args.recipe]
    b = {**BUDGETS[args.budget], **recipe.get(args.budget, {})}
    suffix = "" if args.recipe == "p5" else f"-{args.recipe}"
    out = ROOT / "bench" / "results" / f"beauty-{args.budget}"
    out.mkdir(parents=True, exist_ok=True)
    work = ROOT / "runs" / f"beauty-{args.budget}"
    py = sys.executable
    if not args.table_only:
        for name in args.strategies.split(","):
            index, form, source_len = STRATEGIES[name]
            prepared = work / f"prepared-{index}"
            if not (prepared / "manifest.json").exists():
                run([py, "-m", "p5rec.cli", "data", "prepare", "--path", str(args.data), "--format", "p5seq",
                     "--index", index, "--out", str(prepared)])
            result = out / f"p5rec-{name}{suffix}.json"
            if result.exists():
                continue
            run_dir = work / f"p5rec-{name}{suffix}"
            if not (run_dir / "train_results.json").exists():  # else trained already: only evaluate again
                run([py, "train.py", "--prepared_dir", str(prepared), "--families", recipe["families"],
                     "--renders", recipe["renders"], *recipe["extra"], "--preset", b["preset"], "--id_form", form,
                     "--max_source_length", str(source_len),
                     "--max_steps", str(b["max_steps"]), "--per_device_train_batch_size", str(b["batch"]),
                     "--eval_steps", str(b["max_steps"] // 5), "--save_steps", str(b["max_steps"] // 5),
                     "--skip_test", "true", "--output_dir", str(run_dir), "--disable_tqdm", "true", *b["extra"]])
            t0 = time.time()
            run([py, "-m", "p5rec.cli", "evaluate", "--run", str(run_dir), "--families", "sequential",
                 "--templates", "2-1,2-13", "--max-users", "0"])
            report = json.loads((run_dir / "results.json").read_text())
            train_wall = json.loads((run_dir / "run_config.json").read_text())["wall_clock_seconds"]
            report["wall_clock_seconds"] = round(train_wall + time.time() - t0, 1)  # train.py + evaluation
            report["recipe"] = {"name": args.recipe, **recipe, "budget": args.budget, **b}
            result.write_text(json.dumps(report, indent=2))
        prepared = work / "prepared-random"
        if not (out / "sasrec.json").exists():
            run([py, "bench/sasrec.py", "--prepared", str(prepared), "--epochs", str(b["sasrec_epochs"]),
                 "--threads", "2", "--out", str(out / "sasrec.json")])
    (out / "README.md").write_text(table(out))
    print((out / "README.md").read_text())


def table(out: Path) -> str:
    rows, pop = [], None
    for f in sorted(out.glob("p5rec-*.json")):
        r = json.loads(f.read_text())
        m = r["templates"]["2-1"]["metrics"]
        name = f.stem[len("p5rec-"):]
        label = f"p5rec {name.removesuffix('-history')} ids" + (", history recipe" if name.endswith("-history") else "")
        rows.append((f"{label} (2-1)", [m[k] for k in KEYS], r.get("wall_clock_seconds")))
        pop = pop or r["baselines"].get("sequential", {}).get("popularity")
    if pop:
        rows.append(("popularity", [pop[k] for k in KEYS], None))
    if (out / "sasrec.json").exists():
        s = json.loads((out / "sasrec.json").read_text())
        m = s["metrics"]["no_exclusion"] if "metrics" in s else s["no_exclusion"]
        rows.append(("SASRec (CE, p5rec implementation)", [m[k] for k in KEYS], s.get("wall_seconds", {}).get("total")))
    lines = ["| model | HR@5 | NDCG@5 | HR@10 | NDCG@10 | seconds |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {s or ''} |" for n, vals, s in rows]
    lines += [f"| {n} (published) | " + " | ".join(f"{v:.4f}" for v in vals) + " | |" for n, vals in PUBLISHED.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
