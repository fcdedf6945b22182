"""Sequential recommendation on P5's Beauty sequences: p5rec's rows beside SASRec and popularity, one invocation.

    python bench/beauty.py --budget cpu                         # every CPU row, then the table and the plot
    python bench/beauty.py --budget cpu --rows seq-random,sasrec  # some rows
    python bench/beauty.py --data path/to/p5/data/sports --name sports   # any P5-format folder
    python bench/beauty.py --table-only                         # rebuild table and plots from the JSON files
    python bench/beauty.py --budget gpu --rows seq-random       # on a GPU: 10-minute steps, see --chunk-minutes

Same leave-one-out split for every row (last item test, second-last validation), full-catalogue ranking over every
item, every test user, HR@5/10 and NDCG@5/10 with the history's items allowed (P5's and SASRec's protocol).
Each row writes ``bench/results/<name>-<budget>/<row>.json`` and is skipped when that file exists (delete it to
re-run), so an interrupted invocation resumes where it stopped; a row's training resumes from its last
checkpoint. Rows of earlier invocations stay in the table, marked with their date: rows that lose stay.

Rows:
* ``seq-*``: the sequence-level objective (templates 2-S1/2-S2: the target is the user's item sequence, the
  decoder learns every position; scored by continuing the decoder from the history). History-only prompts
  (every user "a user", as SASRec sees them), single-token random ids or collaborative ids.
* ``seq+2-1-random``: the same, trained jointly with P5's history-in-the-prompt template 2-1; both scored.
* ``p5-*``, ``history-random``: P5's prompt objective (earlier invocations; their JSON files are kept).
* ``sasrec``: p5rec's SASRec (full-softmax CE), early-stopped on validation within the same training budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench.beauty")
KEYS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10")

# The sequence objective's recipe, each setting kept on a validation learning curve beside SASRec (the
# ablations and their numbers: bench/README.md, "What makes the sequence objective learn").
SEQUENCE_RECIPE = [
    "--families", "sequential", "--renders", "sequential=0", "--sequence_renders", "1",
    "--anonymous_users", "true", "--item_softmax", "true", "--embedding_init_std", "0.1",
    "--max_sequence", "50", "--learning_rate", "3e-3", "--lr_scheduler_type", "cosine", "--warmup_steps", "100",
    "--weight_decay", "0", "--max_grad_norm", "0", "--adam_beta2", "0.98",
    "--metric_for_best_model", "eval_sequential/continuation_NDCG@10", "--greater_is_better", "true",
    "--load_best_model_at_end", "true", "--save_total_limit", "2",
    # the rows below were measured with random id rows; the main job's typed start (--id_embedding_init auto)
    # is not measured on Beauty yet
    "--id_embedding_init", "random",
]
ROWS = {
    # name: index strategy, id form, extra train.py arguments, templates scored on test
    "seq-random": dict(index="random", form="token", templates="2-S1,2-S2", score="2-S1,2-S3",
                       args=SEQUENCE_RECIPE),
    # the same with a user token in the prompt (personalised sequences; each user's token is trained once per epoch)
    "seq-users-random": dict(index="random", form="token", templates="2-S1,2-S2", score="2-S1,2-S3",
                             args=SEQUENCE_RECIPE + ["--anonymous_users", "false"]),
    # random batches as SASRec draws them (length-grouped batches are ~2.2x faster per epoch but learn less per
    # epoch, see bench/README.md): 0.6 of the epochs, about the same training time
    "seq-random-batches": dict(index="random", form="token", templates="2-S1,2-S2", score="2-S1,2-S3",
                               args=SEQUENCE_RECIPE + ["--train_sampling_strategy", "random"], epochs_scale=0.6),
    # the same filling more of the 40-minute budget: 30 epochs (the cosine schedule ends at the real budget)
    "seq-random-batches-30": dict(index="random", form="token", templates="2-S1,2-S2", score="2-S1,2-S3",
                                  args=SEQUENCE_RECIPE + ["--train_sampling_strategy", "random"], epochs_scale=0.75),
    "seq-collaborative": dict(index="collaborative", form="token", templates="2-S1,2-S2", score="2-S1",
                              args=SEQUENCE_RECIPE),
    # 2-1 on every training position (131k rows a pass) beside 4 sequence rows per user (89k): a pass costs
    # about 10 sequence-only epochs, so this row gets 1.5 times the steps (its steps are cheaper: short targets)
    "seq+2-1-random": dict(index="random", form="token", templates="2-S1,2-S2,2-1", score="2-S1,2-1,2-13",
                           args=SEQUENCE_RECIPE + ["--renders", "sequential=1", "--sequence_renders", "4"],
                           epochs_scale=1.5),
}
# Training budgets: the model shape, the steps that fill the time (measured per row), the SASRec cap.
BUDGETS = {
    "cpu": {"model": ["--preset", "tiny", "--num_decoder_layers", "2", "--dropout_rate", "0.2",
                      "--embedding_lr_multiplier", "8"], "batch": 256, "epochs": 40,
            "sasrec_epochs": 200, "sasrec_seconds": 40 * 60, "extra": []},
    "gpu": {"model": ["--preset", "mini", "--dropout_rate", "0.3", "--embedding_lr_multiplier", "11.3"],
            "batch": 256, "epochs": 200,
            "sasrec_epochs": 400, "sasrec_seconds": 4 * 3600, "extra": ["--bf16", "true"]},
}
PUBLISHED = {  # HR@5, NDCG@5, HR@10, NDCG@10 on these sequences
    "SASRec (tuned, later work)": (.0469, .0305, .0688, .0375),
    "SASRec (best tuned, 'SASRec is still strong', 2025)": (None, None, .0921, .0531),
    "TIGER": (.0454, .0321, .0648, .0384),
    "P5 + collaborative ids (Hua et al. 2023)": (.0512, .0356, .0732, .0427),
    "P5-base as published (leaky sequential ids)": (.0508, .0379, .0664, .0429),
}
# rows of earlier invocations, by file stem: how the table names them
LEGACY = {"p5rec-random": "p5rec, P5 prompts, random ids (2-1)",
          "p5rec-collaborative": "p5rec, P5 prompts, collaborative ids (2-1)",
          "p5rec-p5-sequential": "p5rec, P5 prompts, P5's sequential ids as digit text (2-1)",
          "p5rec-random-history": "p5rec, history-only P5 prompts, random ids (2-1)"}


def run(cmd: list[str]) -> None:
    logger.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)


def steps_per_epoch(prepared: Path, batch: int) -> int:
    """Training rows of the sequence recipe are one per user with a training sequence of 2+ items."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    users = manifest["families"]["sequential"]["splits"]["valid"]
    return math.ceil(users / batch)


def source(data: Path | None) -> list[str]:
    """`p5rec data prepare` arguments naming the sequences: the --data folder, else the registered p5-beauty
    (its files in $P5REC_DATA/p5-beauty/, see `p5rec data list`)."""
    return ["--path", str(data)] if data else ["--dataset", "p5-beauty"]


def train_and_score(name: str, spec: dict, budget: dict, data: Path | None, work: Path, out: Path, py: str,
                    chunk_minutes: float | None) -> None:
    prepared = work / f"prepared-{spec['index']}"
    if not (prepared / "manifest.json").exists():
        run([py, "-m", "p5rec.cli", "data", "prepare", *source(data), "--format", "p5seq",
             "--index", spec["index"], "--out", str(prepared)])
    run_dir = work / name
    per_epoch = steps_per_epoch(prepared, budget["batch"])
    steps = int(per_epoch * budget["epochs"] * spec.get("epochs_scale", 1.0))
    every = per_epoch * 2
    if not (run_dir / "train_results.json").exists():
        args = [py, "train.py", "--prepared_dir", str(prepared), *spec["args"], "--templates", spec["templates"],
                *budget["model"], "--id_form", spec["form"], "--per_device_train_batch_size", str(budget["batch"]),
                "--per_device_eval_batch_size", "512", "--max_steps", str(steps), "--eval_steps", str(every),
                "--save_steps", str(every), "--logging_steps", str(per_epoch), "--eval_users", "100000",
                "--skip_test", "true", "--output_dir", str(run_dir), "--disable_tqdm", "true", *budget["extra"]]
        from p5rec.train.training import last_checkpoint

        checkpoint = last_checkpoint(run_dir) if run_dir.is_dir() else None
        if checkpoint:
            args += ["--resume_from_checkpoint", str(checkpoint)]
        elif run_dir.is_dir():  # stopped before its first checkpoint: nothing to keep
            args += ["--overwrite_output_dir", "true"]
        if chunk_minutes:  # a GPU lease runs at most 10 minutes a command: stop, checkpoint, come back
            args = ["timeout", "--signal=INT", f"{int(chunk_minutes * 60)}"] + args
        run(args)
    t0 = time.time()
    report = score(run_dir, spec["score"], py)
    report["exclude_history"] = score(run_dir, spec["score"], py, exclude_history=True)["templates"]
    config = json.loads((run_dir / "run_config.json").read_text())
    trained = json.loads((run_dir / "train_results.json").read_text())
    report.update(
        row=name, budget=budget, spec=spec, invocation=INVOCATION,
        train_seconds=trained.get("train_runtime"), test_seconds=round(time.time() - t0, 1),
        learning_curve=json.loads((run_dir / "learning_curve.json").read_text()),
        run_config=config,
    )
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))


def score(run_dir: Path, templates: str, py: str, exclude_history: bool = False) -> dict:
    """Test scores of ``templates`` on every test user: P5's protocol (history items may be recommended), or
    SASRec's (``exclude_history``). Returns the partial-results report ``p5rec evaluate`` writes."""
    t0 = time.time()
    run([py, "-m", "p5rec.cli", "evaluate", "--run", str(run_dir), "--families", "sequential", "--templates",
         templates, "--max-users", "0", "--batch-size", "256", "--no-sasrec",
         *(["--exclude-history"] if exclude_history else [])])
    # a partial evaluation writes results-test-<selection hash>.json beside the run's results.json
    written = [p for p in run_dir.glob("results-test-*.json") if p.stat().st_mtime >= t0]
    return json.loads(max(written, key=lambda p: p.stat().st_mtime).read_text())


def add_excluded(name: str, work: Path, out: Path, py: str) -> None:
    """Score a row of an earlier invocation under SASRec's protocol too, if it was not (no retraining)."""
    report = json.loads((out / f"{name}.json").read_text())
    if "exclude_history" in report or not (work / name / "train_results.json").exists():
        return
    report["exclude_history"] = score(work / name, ROWS[name]["score"], py, exclude_history=True)["templates"]
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))


def sasrec(budget: dict, work: Path, out: Path, py: str) -> None:
    prepared = work / "prepared-random"
    run([py, "bench/sasrec.py", "--prepared", str(prepared), "--epochs", str(budget["sasrec_epochs"]),
         "--max-seconds", str(budget["sasrec_seconds"]), "--threads", "2", "--select-on", "all_items",
         "--out", str(out / "sasrec.json")])
    s = json.loads((out / "sasrec.json").read_text())
    s["invocation"] = INVOCATION
    (out / "sasrec.json").write_text(json.dumps(s, indent=2))


def table(out: Path) -> str:
    """The tables from every JSON file in ``out``: p5rec rows (each scored template), popularity, SASRec; first
    under P5's protocol (history items may be recommended), then under SASRec's (history items excluded)."""
    parts = []
    for excluded in (False, True):
        rows, pop = [], None
        for f in sorted(out.glob("*.json")):
            r = json.loads(f.read_text())
            if f.stem.startswith("sasrec"):
                m = r["metrics"]["exclude_history" if excluded else "no_exclusion"]
                when = r.get("invocation", f.stem.removeprefix("sasrec-") or "earlier invocation")
                label = f"SASRec (p5rec's, full-softmax CE, {r.get('epochs_run')} epochs, best {r.get('best_epoch')})"
                rows.append((label, [m[k] for k in KEYS], r.get("wall_seconds", {}).get("fit"), when))
                continue
            if "templates" not in r or (excluded and "exclude_history" not in r):
                continue
            when = r.get("invocation", "earlier invocation")
            label = LEGACY.get(f.stem, f"p5rec {r.get('row', f.stem)}")
            train_s = r.get("train_seconds") or r.get("wall_clock_seconds")
            for tid, t in (r["exclude_history"] if excluded else r["templates"]).items():
                proto = t.get("protocol") or ("full ranking" if t["kind"] == "item" else t["kind"])
                seen = "" if t.get("seen", True) else ", unseen"
                rows.append((f"{label}: {tid} ({proto}{seen})", [t["metrics"][k] for k in KEYS], train_s, when))
            base = r["baselines"].get("sequential", {})
            pop = pop or base.get("popularity (history excluded)" if excluded else "popularity")
        if pop:
            rows.append(("popularity", [pop[k] for k in KEYS], None, ""))
        title = ("History items excluded from the answers (SASRec's protocol)" if excluded
                 else "History items may be recommended (P5's protocol)")
        lines = [f"### {title}", "", "| model | HR@5 | NDCG@5 | HR@10 | NDCG@10 | training s | run |",
                 "|---|---|---|---|---|---|---|"]
        for n, vals, secs, when in rows:
            cells = " | ".join(f"{v:.4f}" for v in vals)
            lines.append(f"| {n} | {cells} | {'' if secs is None else round(secs)} | {when} |")
        if not excluded:
            for n, vals in PUBLISHED.items():
                cells = " | ".join("–" if v is None else f"{v:.4f}" for v in vals)
                lines.append(f"| {n} (published) | {cells} | | |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def plot(out: Path) -> Path | None:
    """Validation NDCG@10 against training seconds, for every p5rec row of this kind and SASRec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for f in sorted(out.glob("*.json")):
        r = json.loads(f.read_text())
        if f.stem.startswith("sasrec") and r.get("curve"):
            pts = r["curve"]
            ax.plot([p["train_seconds"] for p in pts], [p["valid_NDCG@10"] for p in pts], "k-", label="SASRec")
            drawn += 1
        for key, style in (("sequential/continuation", "-"), ("sequential", "--")):
            pts = [p for p in r.get("learning_curve", []) if key in p and p.get("train_seconds") is not None]
            if pts:
                tid = pts[0][key]["template"]
                ax.plot([p["train_seconds"] for p in pts], [p[key]["NDCG@10"] for p in pts], style,
                        label=f"p5rec {r.get('row', f.stem)}: {tid}")
                drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training seconds (validation excluded)")
    ax.set_ylabel("validation NDCG@10 (all validation users)")
    ax.set_title(f"{out.name}: next-item ranking over the whole catalogue")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "validation-ndcg10.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def comparison_plot(out: Path) -> Path | None:
    """Test HR@5/NDCG@5/HR@10/NDCG@10 of every p5rec row (its seen templates) beside SASRec and popularity, under
    P5's protocol (history items allowed): the run directories' results.png, for the benchmark's JSON files."""
    sys.path.insert(0, str(ROOT))
    from p5rec.eval.plots import Bar, Panel, bar_panels

    rows, pop = [], None
    for f in sorted(out.glob("*.json")):
        r = json.loads(f.read_text())
        if f.stem.startswith("sasrec"):
            when = r.get("invocation", f.stem.removeprefix("sasrec-") or "earlier")
            rows.append((f"SASRec ({when})", r["metrics"]["no_exclusion"], "other"))
            continue
        if "templates" not in r:
            continue
        label = LEGACY.get(f.stem, f"p5rec {r.get('row', f.stem)}")
        for tid, t in r["templates"].items():
            if t.get("seen", True):
                rows.append((f"{label}: {tid}", t["metrics"], "seen"))
        pop = pop or r["baselines"].get("sequential", {}).get("popularity")
    if pop:
        rows.append(("popularity", pop, "baseline"))
    panels = [Panel("all test users, whole catalogue", key, [Bar(n, m[key], role) for n, m, role in rows if key in m])
              for key in KEYS]
    return bar_panels(panels, out / "test-comparison.png", f"{out.name}: test split, p5rec beside SASRec and "
                      "popularity (history items allowed)", cols=2)


INVOCATION = time.strftime("%Y-%m-%d")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--rows", default=",".join([*ROWS, "sasrec"]), help=f"of {', '.join([*ROWS, 'sasrec'])}")
    ap.add_argument("--data", type=Path, default=None,
                    help="a P5-format folder (sequential_data.txt); default: the registered p5-beauty")
    ap.add_argument("--name", default="beauty", help="names the results folder: bench/results/<name>-<budget>")
    ap.add_argument("--chunk-minutes", type=float, default=None,
                    help="stop training after this many minutes (checkpointed); run again to continue")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    budget = BUDGETS[args.budget]
    out = ROOT / "bench" / "results" / f"{args.name}-{args.budget}"
    out.mkdir(parents=True, exist_ok=True)
    work = ROOT / "runs" / f"{args.name}-{args.budget}"
    if not args.table_only:
        for name in args.rows.split(","):
            if (out / f"{name}.json").exists():
                logger.info("%s: done already (%s); delete it to run again", name, out / f"{name}.json")
                if name in ROWS:
                    add_excluded(name, work, out, sys.executable)
                continue
            if name == "sasrec":
                if not (work / "prepared-random" / "manifest.json").exists():
                    run([sys.executable, "-m", "p5rec.cli", "data", "prepare", *source(args.data), "--format",
                         "p5seq", "--index", "random", "--out", str(work / "prepared-random")])
                sasrec(budget, work, out, sys.executable)
            elif name in ROWS:
                train_and_score(name, ROWS[name], budget, args.data, work, out, sys.executable, args.chunk_minutes)
            else:
                raise SystemExit(f"unknown row {name!r}; choose from {', '.join([*ROWS, 'sasrec'])}")
    (out / "README.md").write_text(table(out))
    print((out / "README.md").read_text())
    for png in (plot(out), comparison_plot(out)):
        if png:
            print(f"plot: {png}")


if __name__ == "__main__":
    main()
