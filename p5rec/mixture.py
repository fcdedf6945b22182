"""Families -> one tokenized training mixture, cached on disk by content hash.

The cache key covers everything that changes the tokens: the prepared dataset's fingerprint, the template files,
the render config and the tokenizer settings. A hit loads Arrow files (memory-mapped) and skips rendering,
tokenizer training and tokenization; a miss does all three once and saves them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import datasets
from datasets import Dataset, concatenate_datasets

from p5rec.tokenizer import build_tokenizer, load_tokenizer, train_sentencepiece

logger = logging.getLogger(__name__)

FAMILIES = ("sequential", "direct", "rating", "explanation", "review")


def default_cache_dir() -> Path:
    return Path(os.environ.get("P5REC_CACHE", Path.home() / ".cache" / "p5rec"))


@dataclass
class MixtureSpec:
    """What the mixture is made of; every field enters the cache key."""

    families: tuple[str, ...] = FAMILIES
    vocab_size: int = 4000
    max_source_length: int = 128
    max_target_length: int = 32
    valid_rows_per_family: int = 200


def id_tokens(index, form: str) -> list[str]:
    if form != "token":
        return []
    return list(index.user_tokens()) + list(index.item_tokens(form))


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def render_family_splits(prepared, templates, render_config, families, split: str) -> Dataset:
    """Render the seen templates of ``families`` on ``split`` and concatenate."""
    from p5rec.templates import render_split

    parts = []
    for family in families:
        part = render_split(prepared, family, split, render_config, templates)
        logger.info("rendered %s/%s: %d rows", family, split, len(part))
        if len(part):
            parts.append(part)
    if not parts:
        raise ValueError(f"nothing rendered for families {families} on split {split!r}")
    return concatenate_datasets(parts)


def tokenize(ds: Dataset, tokenizer, spec: MixtureSpec, desc: str) -> Dataset:
    """Batched tokenization: ``input_ids``, ``attention_mask``, ``labels`` (unpadded; the collator pads)."""

    def fn(batch):
        enc = tokenizer(batch["source"], truncation=True, max_length=spec.max_source_length)
        lab = tokenizer(text_target=batch["target"], truncation=True, max_length=spec.max_target_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": lab["input_ids"]}

    return ds.map(fn, batched=True, batch_size=2000, desc=desc)


def build_mixture(prepared, templates, render_config, spec: MixtureSpec, cache_dir: Path | None = None):
    """Return ``(tokenizer, train, valid, info)``; ``train``/``valid`` hold text and token columns.

    ``valid`` is a small per-family sample of the validation split (``spec.valid_rows_per_family`` rows each),
    for the loss curve during training; metrics on the full splits are the evaluation's job.
    """
    import p5rec.templates as tmod

    template_files = sorted({str(t.file) for t in templates})
    key = _hash(
        {
            "fingerprint": prepared.manifest.get("fingerprint"),
            "templates": [_file_hash(f) for f in template_files],
            "render": asdict(render_config),
            "spec": asdict(spec),
            "templates_module": _file_hash(tmod.__file__),
            "mixture_module": _file_hash(__file__),
        }
    )
    cache = (cache_dir or default_cache_dir()) / "mixtures" / key
    info = {"cache_key": key, "cache_dir": str(cache)}
    if (cache / "done").exists():
        logger.info("tokenized mixture cache hit: %s", cache)
        tokenizer = load_tokenizer(cache / "tokenizer")
        train = datasets.load_from_disk(str(cache / "train"))
        valid = datasets.load_from_disk(str(cache / "valid"))
        info["cache_hit"] = True
        return tokenizer, train, valid, info
    info["cache_hit"] = False
    train = render_family_splits(prepared, templates, render_config, spec.families, "train")
    # Validation renders every template per record: render only as many records as the sample keeps.
    few = replace(render_config, max_records=spec.valid_rows_per_family)
    valid = render_family_splits(prepared, templates, few, spec.families, "valid")
    valid = _per_family_sample(valid, spec.valid_rows_per_family, render_config.seed)
    logger.info("training a %d-piece SentencePiece model on %d rendered rows", spec.vocab_size, len(train))
    corpus = _corpus(prepared, train)
    vocab = train_sentencepiece(corpus, vocab_size=spec.vocab_size, seed=render_config.seed)
    tokenizer = build_tokenizer(vocab, id_tokens(prepared.index, render_config.id_form))
    train = tokenize(train, tokenizer, spec, "tokenizing train")
    valid = tokenize(valid, tokenizer, spec, "tokenizing valid")
    tmp = cache.with_name(cache.name + ".tmp")
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    train.save_to_disk(str(tmp / "train"))
    valid.save_to_disk(str(tmp / "valid"))
    (tmp / "done").write_text(json.dumps(info))
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    tmp.rename(cache)
    # Reload from the cache so a first run and a cache hit train on identical, memory-mapped data.
    return (
        load_tokenizer(cache / "tokenizer"),
        datasets.load_from_disk(str(cache / "train")),
        datasets.load_from_disk(str(cache / "valid")),
        info,
    )


def _corpus(prepared, train: Dataset) -> list[str]:
    """Tokenizer corpus: unique rendered sources/targets (the prompt words) plus the raw review texts."""
    lines = list(dict.fromkeys(train["source"]))[:200_000] + list(dict.fromkeys(train["target"]))[:200_000]
    if "review" in prepared.interactions.column_names:
        lines += [t for t in prepared.interactions["review"][:100_000] if t]
    return lines


def _per_family_sample(ds: Dataset, n: int, seed: int) -> Dataset:
    import numpy as np

    fam = np.array(ds["family"])
    rng = np.random.default_rng(seed)
    keep = []
    for f in sorted(set(fam.tolist())):
        idx = np.flatnonzero(fam == f)
        keep.extend(sorted(rng.choice(idx, size=min(n, len(idx)), replace=False).tolist()))
    return ds.select(keep)


def _file_hash(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
