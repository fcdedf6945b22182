"""Validation comparisons of MI main-job variants: the numbers a default is chosen on.

Each variant is trained with ``python train.py --skip_test true …`` and scored with ``p5rec evaluate --run <run>
--split valid …``; this script keeps those scores beside the run's configuration and rebuilds the table.

    python bench/mi_valid.py collect text-x2 runs/mi-text-x2   # every results-valid-*.json of the run, merged
                                                               # (--overwrite replaces a variant kept before)
    python bench/mi_valid.py table                             # bench/results/mi-valid/table.md
    python bench/mi_valid.py seeds main=main,main-seed1,main-seed2 seq1=seq1,seq1-seed1,seq1-seed2
                                                               # bench/results/mi-valid/seeds.md: each variant
                                                               # over its seeds, against its own split's baselines

A run evaluated in parts (say ranking families, then text) has one ``results-valid-*.json`` per part; ``collect``
merges them, the later file winning where both scored a template. A variant trained with another ``--seed`` has
another split of the reviews and other candidates, so every row carries its own baselines.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "mi-valid"


def merge(files: list[Path]) -> dict:
    merged: dict = {}
    for f in sorted(files, key=lambda p: p.stat().st_mtime):
        r = json.loads(f.read_text())
        for key in ("templates", "baselines"):
            merged.setdefault(key, {}).update(r.get(key, {}))
        for fam, protos in r.get("families", {}).items():
            merged.setdefault("families", {}).setdefault(fam, {}).update(protos)
        for fam, v in r.get("prompt_reliance", {}).get("families", {}).items():
            merged.setdefault("prompt_reliance", {}).setdefault("families", {})[fam] = v
        merged.setdefault("parts", []).append({"file": f.name, "eval_config": r.get("eval_config")})
    _family_means(merged)
    return merged


def _family_means(merged: dict) -> None:
    """Each family's seen / unseen means again, over the merged templates (the evaluation's own ``aggregate``):
    one family scored in two parts (5-1 and 5-3 in one, 5-2 and 5-4 in another) would otherwise keep the mean of
    its last part only."""
    from dataclasses import fields

    from p5rec.eval.evaluation import TemplateResult, aggregate

    names = {f.name for f in fields(TemplateResult)}
    results = [TemplateResult(**{"template": tid, "scoring": "", "kind": "", "n": 0,
                                 **{k: v for k, v in t.items() if k in names}})
               for tid, t in merged.get("templates", {}).items() if t.get("protocol")]
    for fam, protos in aggregate(results).items():
        for proto, parts in protos.items():
            merged.setdefault("families", {}).setdefault(fam, {}).setdefault(proto, {}).update(
                {part: means for part, means in parts.items() if means})


def collect(name: str, run_dir: Path, overwrite: bool = False) -> None:
    files = sorted(run_dir.glob("results-valid-*.json"))
    if not files:
        sys.exit(f"{run_dir}: no results-valid-*.json (run `p5rec evaluate --run {run_dir} --split valid` first)")
    if not (run_dir / "run_config.json").is_file():
        sys.exit(f"{run_dir}: no run_config.json (not a run directory written by train.py)")
    if (OUT / f"{name}.json").exists() and not overwrite:
        sys.exit(f"{OUT / (name + '.json')} exists: pick another name, or pass --overwrite to replace it")
    OUT.mkdir(parents=True, exist_ok=True)
    results = merge(files)
    config = json.loads((run_dir / "run_config.json").read_text())
    results["run"] = str(run_dir)
    results["seed"] = config.get("seed")
    trained = (config.get("data", {}).get("families") or "").split(",")
    results["renders"] = {f: n for f, n in (config.get("render", {}).get("renders") or {}).items()
                          if f in trained or trained == [""]}
    results["template_weights"] = config.get("render", {}).get("template_weights")
    (OUT / f"{name}.json").write_text(json.dumps(results, indent=2))
    (OUT / f"{name}-run-config.json").write_text(json.dumps(config, indent=2))
    print(f"wrote {OUT / (name + '.json')} from {len(files)} file(s)")


def _get(r: dict, *path):
    for p in path:
        if not isinstance(r, dict) or p not in r:
            return None
        r = r[p]
    return r


def _f(v, digits=4):
    if v is None:
        return "–"
    return f"{v:.{digits}f}".replace("0.", ".", 1) if digits > 2 else f"{v:.{digits}f}"


COLUMNS = [  # header, (family, protocol, metric) or a baseline, digits
    ("yes/no NDCG@10", ("direct", "yes/no over candidates", "NDCG@10"), 4),
    ("candidates NDCG@10", ("direct", "candidates", "NDCG@10"), 4),
    ("sequential HR@10", ("sequential", "full ranking", "HR@10"), 4),
    ("sequential NDCG@10", ("sequential", "full ranking", "NDCG@10"), 4),
    ("rating RMSE_expected", ("rating", "rating", "RMSE_expected"), 4),
    ("rating RMSE_calibrated", ("rating", "rating", "RMSE_calibrated"), 4),
    ("explanation ROUGE-L", ("explanation", "text", "ROUGE-L"), 2),
    ("review ROUGE-L", ("review", "text", "ROUGE-L"), 2),
]
BASELINES = [("direct", "popularity", "NDCG@10", 4), ("sequential", "popularity", "NDCG@10", 4),
             ("rating", "global mean", "RMSE", 4), ("explanation", "nearest training explanation", "ROUGE-L", 2),
             ("explanation", "best constant training explanation", "ROUGE-L", 2)]
# the seen explanation templates that name the feature word ("..., mentioning price."): what copying it is worth
HINT_TEMPLATES = ("3-9", "3-10", "3-11")
_HINT_AT = [c[0] for c in COLUMNS].index("explanation ROUGE-L") + 1  # their column follows explanation's


def _hint_rouge(r: dict):
    scores = [_get(r, "templates", t, "metrics", "ROUGE-L") for t in HINT_TEMPLATES]
    return None if None in scores else sum(scores) / len(scores)


def _weights(r: dict) -> str:
    """Template weights other than the candidate-list default (0.3), e.g. ``3-9=30``."""
    w = {t: v for t, v in (r.get("template_weights") or {}).items() if v != 0.3}
    return ", ".join(f"{t}={v:g}" for t, v in w.items()) or "–"


def table() -> str:
    rows = []
    for f in sorted(OUT.glob("*.json")):
        if f.name.endswith("-run-config.json"):
            continue
        r = json.loads(f.read_text())
        renders = r.get("renders") or {}
        mix = "/".join(str(renders.get(k, "–")) for k in ("sequential", "direct", "rating", "explanation", "review"))
        cells = [_f(_get(r, "families", fam, proto, "seen", m), d) for _, (fam, proto, m), d in COLUMNS]
        cells.insert(_HINT_AT, _f(_hint_rouge(r), 2))
        base = [_f(_get(r, "baselines", fam, b, m), d) for fam, b, m, d in BASELINES]
        gains = _get(r, "prompt_reliance", "families") or {}
        gain = ", ".join(f"{fam} {_f(_get(v, 'seen', 'gain'))}" for fam, v in gains.items())
        rows.append(f"| {f.stem} | {r.get('seed')} | {mix} | {_weights(r)} | " + " | ".join(cells) + f" | {' / '.join(base)} | {gain} |")
    cols = [c[0] for c in COLUMNS]
    cols.insert(_HINT_AT, "explanation ROUGE-L, hint templates " + ", ".join(HINT_TEMPLATES))
    head = ["variant", "seed", "renders s/d/r/e/v", "template weights", *cols,
            "baselines: popularity (direct / seq) / global mean / nearest explanation / best constant explanation", "prompt gain (seen)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows]
    return "\n".join(lines) + "\n"


# what a seed comparison scores: (header, family, protocol, metric, the baseline of that family, 1 if higher is
# better else -1); each seed's value is set against its own split's baseline, as the seed re-draws the split
SEED_COLUMNS = [
    # the yes/no rows' popularity on the users they scored (results before 2026-12-07 have only "popularity", which
    # is the same where every user was scored, as these validation runs do)
    ("yes/no NDCG@10", "direct", "yes/no over candidates", "NDCG@10", "popularity on the yes/no users|popularity", 1),
    ("candidates NDCG@10", "direct", "candidates", "NDCG@10", "popularity", 1),
    ("sequential NDCG@10", "sequential", "full ranking", "NDCG@10", "popularity", 1),
    ("rating RMSE_expected", "rating", "rating", "RMSE_expected", "global mean", -1),
    ("rating RMSE_calibrated", "rating", "rating", "RMSE_calibrated", "global mean", -1),
    ("explanation ROUGE-L", "explanation", "text", "ROUGE-L", "nearest training explanation", 1),
    ("review ROUGE-L", "review", "text", "ROUGE-L", "summary of nearest training review", 1),
]
_BASELINE_METRIC = {"RMSE_expected": "RMSE", "RMSE_calibrated": "RMSE"}


def seed_table(groups: dict[str, list[str]]) -> str:
    """Each variant's seeds side by side: per column the value minus its split's baseline (the sign set so that
    positive is better), each seed's margin, and their mean. A missing score is a dash and stays out of the mean."""
    head = ["variant", "seeds", *[f"{h} (vs {b.split('|')[-1]})" for h, _, _, _, b, _ in SEED_COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, names in groups.items():
        runs = []
        for n in names:
            f = OUT / f"{n}.json"
            if not f.exists():
                sys.exit(f"{f}: no such variant (`python bench/mi_valid.py collect {n} runs/<run>` first)")
            runs.append(json.loads(f.read_text()))
        cells = []
        for _, fam, proto, metric, base, sign in SEED_COLUMNS:
            margins = []
            for r in runs:
                v = _get(r, "families", fam, proto, "seen", metric)
                b = next((x for name in base.split("|")
                          if (x := _get(r, "baselines", fam, name, _BASELINE_METRIC.get(metric, metric))) is not None),
                         None)
                margins.append(None if v is None or b is None else sign * (v - b))
            got = [m for m in margins if m is not None]
            digits = 2 if proto == "text" else 4
            each = " / ".join("–" if m is None else f"{m:+.{digits}f}" for m in margins)
            mean = f"**{sum(got) / len(got):+.{digits}f}**" if got else "–"
            cells.append(f"{mean} ({each})")
        seeds = ", ".join(str(r.get("seed")) for r in runs)
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _groups(specs: list[str]) -> dict[str, list[str]]:
    out = {}
    for spec in specs:
        label, sep, names = spec.partition("=")
        if not sep or not names:
            sys.exit(f"seeds: {spec!r} is not LABEL=variant,variant,...")
        out[label] = names.split(",")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="keep a run's validation results under a variant name")
    c.add_argument("name")
    c.add_argument("run", type=Path)
    c.add_argument("--overwrite", action="store_true", help="replace a variant already kept under this name")
    sub.add_parser("table", help="write bench/results/mi-valid/table.md from the collected variants")
    s = sub.add_parser("seeds", help="write bench/results/mi-valid/seeds.md: variants over their seeds, each seed "
                                     "against its own split's baselines")
    s.add_argument("groups", nargs="+", metavar="LABEL=variant,variant,...")
    args = ap.parse_args(argv)
    if args.cmd == "collect":
        collect(args.name, args.run, args.overwrite)
    elif args.cmd == "seeds":
        text = seed_table(_groups(args.groups))
        (OUT / "seeds.md").write_text(text)
        print(text)
    else:
        text = table()
        (OUT / "table.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
