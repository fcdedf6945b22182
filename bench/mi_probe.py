"""Probes of a run (or a checkpoint) that say *why* a family sits at its marginal, in a minute on one thread.

    python bench/mi_probe.py rating runs/mi-main            # the expected star on training and validation reviews
    python bench/mi_probe.py yesno runs/mi-main --users 300  # does the yes/no score follow item popularity?
    python bench/mi_probe.py series runs/x                   # `rating` at every checkpoint-* of a run, in step order
    python bench/mi_probe.py ensemble runs/mi-main --split valid  # sequential ranking averaged over its templates

``rating`` scores template 1-1's expected star (the rating protocol's ``RMSE_expected``) on seeded samples of the
training and validation reviews and prints, for each split, its mean and spread across reviews, its correlation
with the true star and its RMSE beside the constant that predicts the split's mean. A model that answers with its
marginal has a spread near 0 on *both* splits (it does not even fit the training reviews: underfitting, not
overfitting); one that reads its ids has a spread of tenths of a star, and a correlation on training reviews above
the one on validation when it memorises.

``yesno`` scores template 5-1 on each sampled validation user's 100 saved candidates and prints the rank
correlation of the model's score (log P(yes) - log P(no)) with the item's training count, and NDCG@10 of the model
beside popularity on the same users. With uniform negatives, popularity is what a yes/no model learns first.

``series`` needs a run trained with checkpoints (``--save_steps N --save_total_limit 0``): each checkpoint gets the
run's ``run_config.json``, ``index.json`` and ``manifest.json`` copied in (so that it opens as a run) and is probed.
``ensemble`` ranks the whole catalogue for every user of the split by the item log-probability averaged over the
sequential full-ranking templates its training mixture held (prompt ensembling, as the rating family's mean over templates), and
prints NDCG@10 / HR@10 of each template, their mean, and the ensemble (log-probabilities or probabilities
averaged). Single-token item ids only: their whole ranking is one decoder step.

Numbers are written to standard output as one JSON object per line.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
from pathlib import Path

import numpy as np

RUN_FILES = ("run_config.json", "index.json", "manifest.json")


def _open(path: Path):
    import torch

    from p5rec.run import Run

    torch.set_num_threads(1)
    return Run.open(path)


def rating(run, n: int = 1000, template: str = "1-1", seed: int = 0) -> dict:
    from p5rec.eval import decoding
    from p5rec.eval.evaluation import _records, _render
    from p5rec.train.routing import family_route

    prepared, t = run.prepared(), run.templates.get(template)
    out = {"probe": "rating", "run": str(run.path), "template": template}
    for split in ("train", "valid"):
        recs = _records(prepared, "rating", split, n, seed)
        sources = [s for s, _ in _render(t, recs, prepared, run.render_config)]
        with family_route(run.model, "rating"):
            lp = decoding.choice_logprobs(run.model, run.tokenizer, sources, list("12345"), batch_size=256,
                                          max_source_length=run.max_source_length)
        p = np.exp(lp - lp.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        star = p @ np.arange(1, 6)
        y = np.array([float(r["rating"]) for r in recs])
        out[split] = {"n": len(y), "mean": round(float(star.mean()), 4), "spread": round(float(star.std()), 4),
                      "corr": round(float(np.corrcoef(star, y)[0, 1]), 4),
                      "RMSE_expected": round(float(np.sqrt(((star - y) ** 2).mean())), 4),
                      "RMSE_split_mean": round(float(np.sqrt(((y.mean() - y) ** 2).mean())), 4)}
    return out


def yesno(run, users: int = 300, template: str = "5-1", seed: int = 42) -> dict:
    from scipy.stats import spearmanr

    from p5rec.eval import decoding, metrics
    from p5rec.eval.evaluation import _attach_candidates, _records, _render
    from p5rec.train.routing import family_route

    prepared, t = run.prepared(), run.templates.get(template)
    count = collections.Counter(i for s in prepared.training_sequences().values() for i in s)
    recs = _attach_candidates(prepared, "valid", _records(prepared, "direct", "valid", users, seed))
    flat = [dict(r, item=c, candidate=c) for r in recs for c in r["candidates"]]
    sources = [s for s, _ in _render(t, flat, prepared, run.render_config)]
    yes, no = t.answer_choices[0], t.answer_choices[1]
    with family_route(run.model, t.family):
        lp = decoding.choice_logprobs(run.model, run.tokenizer, sources, [yes, no], batch_size=256,
                                      max_source_length=run.max_source_length)
    width = len(recs[0]["candidates"])
    score = (lp[:, 0] - lp[:, 1]).reshape(len(recs), width)
    pop = np.array([np.log1p(count[f["item"]]) for f in flat]).reshape(len(recs), width)
    jitter = np.random.default_rng(seed).random(pop.shape) * 1e-6  # popularity's ties, broken at random

    def ndcg(s):
        ranked = [[r["candidates"][j] for j in np.argsort(-s[i], kind="stable")] for i, r in enumerate(recs)]
        return round(metrics.ranking_metrics(ranked, [r["target"] for r in recs])["NDCG@10"], 4)

    within = [spearmanr(score[i], pop[i])[0] for i in range(len(recs))]
    return {"probe": "yesno", "run": str(run.path), "template": template, "users": len(recs),
            "spearman_with_popularity": round(float(np.nanmean(within)), 4),
            "NDCG@10": ndcg(score), "popularity NDCG@10": ndcg(pop + jitter)}


def ensemble(run, split: str = "valid", family: str = "sequential", seed: int = 42) -> dict:
    import torch

    from p5rec.eval import decoding, metrics
    from p5rec.eval.evaluation import _records, _render, build_catalogue_trie, protocol_of
    from p5rec.train.routing import family_route

    prepared = run.prepared()
    trie = build_catalogue_trie(prepared, run.tokenizer, run.render_config.id_form)
    if not trie.single_token:
        sys.exit(f"{run.path}: item ids of several tokens; the ensemble probe ranks single-token ids only")
    ids, items, _ = trie.token_table()
    trained = run.trained_templates  # the templates the run's mixture held (None: an older run, the YAML's seen)
    chosen = [t for t in run.templates.by_family(family) if (t.id in trained if trained is not None else t.seen)
              and protocol_of(t, run.templates) == "full ranking"]
    recs = _records(prepared, family, split, 0, seed)
    targets = [r["target"] for r in recs]
    per: dict[str, np.ndarray] = {}
    for t in chosen:
        sources = [s for s, _ in _render(t, recs, prepared, run.render_config)]
        logp = np.zeros((len(sources), len(items)), dtype=np.float32)
        with family_route(run.model, family), torch.no_grad():
            for idx, texts in decoding._batches(sources, 128, None):
                enc = decoding._encode(run.tokenizer, texts, run.max_source_length, run.model.device)
                logits = decoding.first_step_logits(run.model, enc)
                logp[idx] = decoding.token_logprobs(run.model, logits, ids.expand(len(idx), -1)).cpu().numpy()
        per[t.id] = logp

    def scores(s: np.ndarray) -> list[float]:
        top = np.argsort(-s, axis=1, kind="stable")[:, :10]
        r = metrics.ranking_metrics([[items[j] for j in row] for row in top], targets)
        return [round(r["NDCG@10"], 4), round(r["HR@10"], 4)]

    out = {t: scores(s) for t, s in per.items()}
    return {"probe": "ensemble", "run": str(run.path), "split": split, "users": len(recs), "NDCG@10, HR@10": out,
            "mean of templates": [round(float(v), 4) for v in np.mean(list(out.values()), axis=0)],
            "ensemble of log-probabilities": scores(np.mean(list(per.values()), axis=0)),
            "ensemble of probabilities": scores(np.log(np.mean([np.exp(s) for s in per.values()], axis=0)))}


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints in step order, each made openable as a run (the run's files copied in)."""
    found = sorted((p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    for c in found:
        for name in RUN_FILES:
            if not (c / name).exists():
                shutil.copy(run_dir / name, c / name)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=["rating", "yesno", "series", "ensemble"])
    p.add_argument("run", type=Path)
    p.add_argument("--cases", type=int, default=1000, help="reviews per split (rating, series)")
    p.add_argument("--users", type=int, default=300, help="validation users (yesno)")
    p.add_argument("--split", default="valid", choices=["valid", "test"], help="the split (ensemble)")
    a = p.parse_args(argv)
    if not (a.run / "run_config.json").is_file():
        sys.exit(f"{a.run}: no run_config.json (not a run directory written by train.py)")
    if a.probe == "series":
        found = checkpoints(a.run)
        if not found:
            sys.exit(f"{a.run}: no checkpoint-* directories (train with --save_steps N --save_total_limit 0)")
        for c in found:
            print(json.dumps({"step": int(c.name.split("-")[-1]), **rating(_open(c), a.cases)}), flush=True)
        return 0
    run = _open(a.run)
    if a.probe == "ensemble":
        print(json.dumps(ensemble(run, a.split)))
    else:
        print(json.dumps(rating(run, a.cases) if a.probe == "rating" else yesno(run, a.users)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
