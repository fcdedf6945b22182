"""The run's model card: ``README.md`` with Hugging Face model-card metadata, so that a plain copy of the run
directory or ``push_to_hub`` gives a complete page.

Written at the end of training and refreshed whenever ``p5rec evaluate`` rewrites the run's ``results.json``.
Everything in it is read from the run's own files (run_config.json, manifest.json, index.json, results.json,
train_results.json, versions.json), so writing it again gives the same card. The YAML header carries
``library_name``, ``tags``, ``datasets``, ``metrics`` and a ``model-index`` with the test metrics (the mean over
seen and over unseen templates per family and protocol); the body has the results beside the baselines, the
training configuration, the id scheme, how to load the model, and its limitations.

A README.md that p5rec did not write (no :data:`MARKER` line) is never replaced: the card is then not written,
and a warning says so.
"""

from __future__ import annotations

import json
import functools
import logging
from pathlib import Path
from typing import Any

import yaml

from p5rec import atomic

logger = logging.getLogger(__name__)

CARD = "README.md"
MARKER = ("<!-- p5rec model card: written by train.py, rewritten by `p5rec evaluate` with the results. "
          "Delete this line to keep your own edits: p5rec then leaves the file alone. -->")
_MARKER_PREFIX = "<!-- p5rec model card:"

# the metrics the card's metadata reports, in this order, where a family and protocol has them
CARD_METRICS = ("HR@10", "NDCG@10", "accuracy", "RMSE", "MAE", "BLEU-4", "BLEU-2", "ROUGE-L")
METRIC_IDS = {"HR": "hit_rate", "NDCG": "ndcg", "accuracy": "accuracy", "RMSE": "rmse", "MAE": "mae", "BLEU": "bleu",
              "ROUGE": "rouge"}  # the metadata's metrics list


def is_generated(path: str | Path) -> bool:
    """Whether ``path`` is a model card p5rec wrote (its marker line is in the first lines)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            head = handle.read(8192)
    except OSError:
        return False
    return _MARKER_PREFIX in head


def write_model_card(run_dir: str | Path) -> Path | None:
    """Write (or rewrite) ``run_dir/README.md``; None, with a warning, when a README.md of someone else's is there
    or the run's files do not make a card (no run_config.json)."""
    run_dir = Path(run_dir)
    path = run_dir / CARD
    if path.exists() and not is_generated(path):
        logger.warning("%s is not a p5rec model card (it has no p5rec marker line): left as it is, no card written",
                       path)
        return None
    try:
        text = model_card(run_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("no model card for %s: %s: %s", run_dir, type(exc).__name__, exc)
        return None
    atomic.write_text(path, text)
    logger.info("wrote %s", path)
    return path


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _num(value: float) -> float:
    return round(float(value), 4)


def _cell(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if abs(value) < 1.5 else f"{value:.2f}"


@functools.lru_cache(maxsize=8)
def _specs(template_files: str | None) -> dict:
    from p5rec.run import run_templates

    try:
        templates = run_templates({"data": {"template_files": template_files}})
    except (ValueError, OSError):  # the run's template files are gone: the shipped families still describe it
        templates = run_templates({})
    return {f: templates.family_info(f) for f in templates.families}


def _spec(config: dict, family: str):
    """The family's spec as the run knew it (its own --template_files included); a bare one if it is unknown."""
    from p5rec.prompts.families import FamilySpec

    return _specs(config.get("data", {}).get("template_files")).get(family) or FamilySpec(
        family, family, {}, "", task=family)


def _roles(config: dict) -> set[str]:
    """The P5Rec roles (p5rec.prompts.families.ROLES) some trained family of the run fills."""
    return {role for f in config["data"]["families"].split(",") if f.strip() for role in _spec(config, f.strip()).inference}


def metadata(run_dir: Path, config: dict, manifest: dict | None, results: dict | None) -> dict:
    """The YAML header (Hugging Face model-card metadata)."""
    dataset = (manifest or {}).get("dataset") or Path(config["data"]["dataset"]).name
    families = [f.strip() for f in config["data"]["families"].split(",") if f.strip()]
    meta: dict[str, Any] = {
        "library_name": "p5rec",
        "pipeline_tag": "text2text-generation",
        "tags": ["p5rec", "recommendation", "recommender-system", "p5", "t5", "text2text-generation",
                 *[_spec(config, f).task for f in families]],
        "datasets": [dataset],
    }
    if not results:
        return meta
    names, entries = [], []
    for fam, protos in results["families"].items():
        for proto, groups in protos.items():
            metrics = []
            for group in ("seen", "unseen"):
                for key in CARD_METRICS:
                    if key in groups.get(group, {}):
                        names.append(METRIC_IDS[key.split("@")[0].split("-")[0]])
                        metrics.append({"type": key.lower(), "value": _num(groups[group][key]),
                                        "name": f"{key} ({group} templates, mean)"})
            if metrics:
                entries.append({"task": {"type": _spec(config, fam).task, "name": f"{fam}: {proto}"},
                                "dataset": {"type": dataset, "name": dataset, "split": results["split"]},
                                "metrics": metrics})
    meta["metrics"] = sorted(set(names))
    meta["model-index"] = [{"name": run_dir.name, "results": entries}]
    return meta


def model_card(run_dir: str | Path) -> str:
    """The card's text, from the run's files."""
    run_dir = Path(run_dir)
    config = _json(run_dir / "run_config.json")
    if not isinstance(config, dict):
        raise ValueError(f"{run_dir / 'run_config.json'} missing or not a JSON object")
    manifest = _json(run_dir / "manifest.json")
    results = _json(run_dir / "results.json")
    trained = _json(run_dir / "train_results.json") or {}
    versions = _json(run_dir / "versions.json") or {}
    index = _json(run_dir / "index.json") or {}
    header = yaml.safe_dump(metadata(run_dir, config, manifest, results), sort_keys=False, allow_unicode=True)
    dataset = (manifest or {}).get("dataset") or config["data"]["dataset"]
    model, data, training = config["model"], config["data"], config["training"]
    render = config.get("render", {})
    templates = config.get("mixture", {}).get("trained_templates") or []
    parts = ["---", header.rstrip(), "---", MARKER, "", f"# {run_dir.name}", ""]
    parts.append(
        f"A T5 trained from scratch with p5rec on **{dataset}**, one model for every task "
        f"family it was given ({data['families'].replace(',', ', ')}), each task a text-to-text prompt in the "
        f"manner of P5 (Geng et al., RecSys 2022). {config.get('parameters', 0) / 1e6:.2f} M parameters "
        f"(preset `{model['preset']}`), {len(templates)} prompt templates trained.")

    parts += ["", "## Results", ""]
    if results:
        capped = results.get("eval_config", {}).get("max_cases")
        parts.append(f"{results['split'].capitalize()} split, mean over templates (seen in training, and unseen: "
                     "zero-shot prompts), beside the baselines scored on the same cases"
                     + (f"; at most {capped} cases per template." if capped else "; every case."))
        parts += ["", "| family | protocol | metric | seen | unseen | baseline |", "|---|---|---|---|---|---|"]
        for row in results.get("headline", []):
            base = f"{_cell(row['baseline_value'])} ({row['baseline']})" if row.get("baseline") else "–"
            parts.append(f"| {row['family']} | {row['protocol']} | {row['metric']} | {_cell(row['seen'])} | "
                         f"{_cell(row['unseen'])} | {base} |")
        parts += ["", "Per template, and every baseline: `results.md` and `results.json`."]
    else:
        parts.append("Not evaluated yet: `p5rec evaluate --run <this folder>` scores it and rewrites this card.")
    for caption, name in (("Test results beside the baselines", "results.png"),
                          ("Learning curve (validation)", "learning_curve.png")):
        if (run_dir / name).is_file():
            parts += ["", f"![{caption}]({name})"]

    users, items = index.get("users", {}), index.get("items", {})
    some_items = list(items)[:2]
    some_user = next(iter(users), "USER")
    parts += ["", "## How to use", "",
              "Install p5rec (the repository's package: `pip install -e .` in a clone), then load this folder "
              "(a run directory; from the Hub, download it first with `huggingface_hub.snapshot_download`):", "",
              "```python", "from p5rec.serve.inference import P5Rec", "",
              'rec = P5Rec.from_pretrained("path/to/this/folder")',
              f"rec.recommend(history={some_items!r}, user={some_user!r}, k=5)   # [Prediction(item, score)]"]
    roles = _roles(config)
    if "rank_direct" in roles:
        parts.append(f"rec.rank({list(items)[2:5]!r}, user={some_user!r})")
    if "rating" in roles and some_items:
        parts.append(f"rec.predict_rating({some_user!r}, {some_items[0]!r})")
    parts += ["```", "", "Or from the command line: `p5rec predict --run path/to/this/folder --task sequential "
              f"--history {','.join(some_items)} -k 5`. Recommendations are always items of this model's catalogue "
              "(trie-restricted decoding)."]

    parts += ["", "## Training", "", "| setting | value |", "|---|---|"]
    from p5rec.data.prepare import review_split_of

    prepared = (manifest or {}).get("counts", {}).get("after", {})
    reviews = {"leave-one-out": "leave-one-out over the reviews too (rating, text)",
               "ratio": "8:1:1 at random (rating, text; P5's)"}.get(review_split_of(manifest) if manifest else "",
                                                                  "reviews split as the preparation did (rating, text)")
    rows = [
        ("data", f"{dataset} ({(manifest or {}).get('format', data.get('data_format') or '?')}), "
                 f"{data['k_core']}-core: {prepared.get('users', '?')} users, {prepared.get('items', '?')} items, "
                 f"{prepared.get('interactions', '?')} interactions; leave-one-out (sequential, direct), {reviews}"),
        ("families and renders", f"{data['families']}; {data['renders']}"),
        ("templates trained", ", ".join(templates) or "–"),
        ("model", f"T5 `{model['preset']}`" + "".join(f", {k} {model[k]}" for k in (
            "d_model", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "dropout_rate") if model.get(k)
        ) + f", SentencePiece vocabulary {model['vocab_size']} + one token per id"),
        ("steps", f"{training.get('max_steps')} × batch {training.get('per_device_train_batch_size')}"
                  + (f" × {trained['processes']} processes" if trained.get("processes", 1) > 1 else "")
                  + (f" ({trained['epoch']:.2f} epochs)" if isinstance(trained.get("epoch"), (int, float)) else "")),
        ("optimiser", f"AdamW, learning rate {training.get('learning_rate')}, {training.get('lr_scheduler_type')} "
                      f"schedule, {training.get('warmup_steps')} warm-up steps, weight decay "
                      f"{training.get('weight_decay')}"),
        ("seed", str(config.get("seed"))),
        ("training time", f"{trained['train_runtime']:.0f} s" if "train_runtime" in trained else "–"),
        ("software", ", ".join(f"{k} {versions[k]}" for k in ("p5rec", "torch", "transformers") if k in versions)
                     + (f"; {versions['cuda']}" if versions.get("cuda") else "; CPU")),
    ]
    parts += [f"| {k} | {v} |" for k, v in rows]
    parts += ["", "Every argument: `run_config.json`; the log: `train_log.txt`; loss and validation metrics over "
              "steps: `learning_curve.json`."]

    strategy = index.get("strategy", data.get("index"))
    form = render.get("id_form", model.get("id_form"))
    how = {"token": "one added vocabulary token per id (`<u17>`, `<i532>`; collaborative ids one token per level, "
                    "`<a3><b0><c12>`)",
           "text": "P5's text form (`user_17`, `item_532`), split into sub-word pieces"}.get(form, form)
    parts += ["", "## Ids", "",
              f"{len(users)} users and {len(items)} items, numbered by the `{strategy}` strategy from the training "
              f"part of each sequence only (held-out interactions never change an id), written as {how}. "
              "`index.json` maps the raw ids to these."
              + (" History-only prompts: users are not named (anonymous)." if data.get("anonymous_users") else "")]

    parts += ["", "## Limitations", ""]
    limits = [
        f"Trained from scratch on one dataset ({dataset}): it recommends only the {len(items)} items of its "
        "catalogue; new items need a new model. An unknown user gets a history-only prompt; the rating and "
        "explanation tasks need a known user.",
        "A small model on a small budget: see the results above before relying on any family.",
    ]
    for row in (results or {}).get("headline", []):
        seen, base = row["seen"], row.get("baseline_value")
        if seen is None or base is None:
            continue
        if (seen < base) if row["higher_is_better"] else (seen > base):
            limits.append(f"{row['family']} ({row['protocol']}): worse than the {row['baseline']} baseline on "
                          f"{row['metric']} ({_cell(seen)} against {_cell(base)}, seen templates).")
    from p5rec.eval.evaluation import PROMPT_READ_FLOOR, unread_families

    for fam, gain in unread_families(results or {}):
        limits.append(f"{fam}: its answers do not depend on the case (the prompt-reliance control: the case's own "
                      f"prompt is worth {gain:.4f} nats per answer token, under {PROMPT_READ_FLOOR:g}); its "
                      "scores measure the answers' marginal distribution, not personalization.")
    limits.append(f"It learnt what the data holds, popularity biases included; the terms of {dataset}'s data "
                  "apply to anything derived from it.")
    parts += [f"- {line}" for line in limits]
    return "\n".join(parts) + "\n"
