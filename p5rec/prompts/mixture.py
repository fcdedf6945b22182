"""Families -> one tokenized training mixture, cached on disk by content hash.

The cache key covers everything that changes the tokens: the prepared dataset's fingerprint, the template files,
the render config and the tokenizer settings. A hit loads Arrow files (memory-mapped) and skips rendering,
tokenizer training and tokenization; a miss does all three once and saves them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import datasets
from datasets import Dataset, concatenate_datasets

from p5rec.prompts.families import main_families
from p5rec.prompts.tokenizer import add_id_tokens, build_tokenizer, load_tokenizer, train_sentencepiece

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("P5REC_CACHE", Path.home() / ".cache" / "p5rec"))


@dataclass
class MixtureSpec:
    """What the mixture is made of; every field enters the cache key."""

    families: tuple[str, ...] = field(default_factory=main_families)  # the main job's: `train: true` in the specs
    vocab_size: int = 4000
    max_source_length: int = 128
    max_target_length: int = 32
    valid_rows_per_family: int = 200
    # ``sequence`` templates: end the item sequence with EOS? Without it the last position learns nothing, as in
    # SASRec; with it, the position that continuation decoding reads is taught to say "end" instead of an item.
    sequence_eos: bool = False


def id_tokens(index, form: str, users: bool = True) -> list[str]:
    """The added tokens of the id surfaces: one per user (unless ``users`` is False) and per item (level)."""
    if form != "token":
        return []
    return (list(index.user_tokens()) if users else []) + list(index.item_tokens(form))


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def render_family_splits(prepared, templates, render_config, families, split: str) -> Dataset:
    """Render the seen templates of ``families`` on ``split`` and concatenate."""
    from p5rec.prompts.templates import render_split

    parts = []
    for family in families:
        part = render_split(prepared, family, split, render_config, templates)
        logger.info("rendered %s/%s: %d rows", family, split, len(part))
        if len(part):
            parts.append(part)
    if not parts:
        raise ValueError(f"nothing rendered for families {families} on split {split!r}")
    return concatenate_datasets(parts)


def tokenize(ds: Dataset, tokenizer, spec: MixtureSpec, desc: str, sequence_templates=frozenset()) -> Dataset:
    """Batched tokenization: ``input_ids``, ``attention_mask``, ``labels`` (unpadded; the collator pads).

    Rows of ``sequence_templates`` (template ids) keep their whole item sequence (its length is bounded in items
    by the render config's ``max_sequence``, not cut at ``max_target_length``) and end with EOS only if
    ``spec.sequence_eos``.
    """

    cut = {"source": 0, "target": 0}
    eos = tokenizer.eos_token_id

    def fn(batch):
        # tokenized in full, then cut, so that every cut row is counted: a prompt cut at the end loses its most
        # recent history items and the question, which must never happen silently
        enc = tokenizer(batch["source"])
        lab = tokenizer(text_target=batch["target"])
        is_seq = [t in sequence_templates for t in batch.get("template", [""] * len(batch["source"]))]
        labels = []
        for ids, seq in zip(lab["input_ids"], is_seq):
            if seq:
                labels.append(ids if spec.sequence_eos or ids[-1:] != [eos] else ids[:-1])
            else:
                cut["target"] += len(ids) > spec.max_target_length
                labels.append(_cut(ids, spec.max_target_length))
        cut["source"] += sum(len(x) > spec.max_source_length for x in enc["input_ids"])
        return {
            "input_ids": [_cut(x, spec.max_source_length) for x in enc["input_ids"]],
            "attention_mask": [x[: spec.max_source_length] for x in enc["attention_mask"]],
            "labels": labels,
        }

    out = ds.map(fn, batched=True, batch_size=2000, desc=desc)
    for side, limit in (("source", spec.max_source_length), ("target", spec.max_target_length)):
        if cut[side]:
            logger.warning(
                "%s: %d of %d %ss were longer than %d tokens and were cut; raise --max_%s_length%s",
                desc, cut[side], len(ds), side, limit, side, " or lower --max_history" if side == "source" else "",
            )
    return out


def row_lengths(ds: Dataset):
    """Prompt plus target tokens of every row (numpy), read from Arrow without decoding the rows: what a
    training step's cost grows with, for length-grouped batches."""
    import numpy as np
    import pyarrow.compute as pc

    src = pc.list_value_length(ds.data.column("input_ids")).to_numpy(zero_copy_only=False)
    tgt = pc.list_value_length(ds.data.column("labels")).to_numpy(zero_copy_only=False)
    if ds._indices is not None:  # a selection or shuffle of the table
        idx = ds._indices.column(0).to_numpy()
        src, tgt = src[idx], tgt[idx]
    return (src + tgt).astype(np.int64)


def _cut(ids: list[int], limit: int) -> list[int]:
    """Keep at most ``limit`` tokens, the last one being EOS as the tokenizer's own truncation does."""
    return ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]


def build_mixture(prepared, templates, render_config, spec: MixtureSpec, cache_dir: Path | None = None,
                  tokenizer=None):
    """Return ``(tokenizer, train, valid, info)``; ``train``/``valid`` hold text and token columns.

    ``valid`` is a small per-family sample of the validation split (``spec.valid_rows_per_family`` rows each),
    for the loss curve during training; metrics on the full splits are the evaluation's job.

    ``tokenizer`` is a checkpoint's own (``--model_name_or_path``): the mixture is tokenized with it, id tokens
    added, instead of with a SentencePiece model trained on this mixture, whose ids would not be the ones the
    checkpoint's embedding rows were trained for.
    """
    import p5rec.prompts.templates as tmod

    template_files = sorted({str(t.file) for t in templates})
    key = _hash(
        {
            "fingerprint": prepared.manifest.get("fingerprint"),
            "templates": [_file_hash(f) for f in template_files],
            "render": asdict(render_config),
            "spec": asdict(spec),
            "templates_module": _file_hash(tmod.__file__),
            "mixture_module": _file_hash(__file__),
            "tokenizer_module": _file_hash(Path(__file__).with_name("tokenizer.py")),
            "given_tokenizer": None if tokenizer is None else _tokenizer_hash(tokenizer),
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
    ids = id_tokens(prepared.index, render_config.id_form, users=not render_config.anonymous_users)
    if tokenizer is None:
        logger.info("training a %d-piece SentencePiece model on %d rendered rows", spec.vocab_size, len(train))
        corpus = _corpus(prepared, train)
        vocab = train_sentencepiece(corpus, vocab_size=spec.vocab_size, seed=render_config.seed)
        tokenizer = build_tokenizer(vocab, ids)
    else:
        tokenizer = copy.deepcopy(tokenizer)  # the caller's object stays as it was
        added = add_id_tokens(tokenizer, ids)
        logger.info("tokenizing with the checkpoint's tokenizer (%d pieces, %d id tokens added)", len(tokenizer), added)
    seq_ids = frozenset(t.id for t in templates if t.scoring == "sequence")
    train = tokenize(train, tokenizer, spec, "tokenizing train", seq_ids)
    valid = tokenize(valid, tokenizer, spec, "tokenizing valid", seq_ids)
    # A temporary name of this process's own: processes that share the cache (several machines on one file
    # system) build the same content; the first rename wins and the others use it.
    import shutil
    import socket

    tmp = cache.with_name(f"{cache.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    train.save_to_disk(str(tmp / "train"))
    valid.save_to_disk(str(tmp / "valid"))
    (tmp / "done").write_text(json.dumps(info))
    if cache.exists() and not (cache / "done").exists():
        shutil.rmtree(cache, ignore_errors=True)  # an interrupted build: no "done" marker
    try:
        tmp.rename(cache)
    except OSError:
        if not (cache / "done").exists():
            raise
        logger.info("another process cached this mixture meanwhile; using it")
        shutil.rmtree(tmp, ignore_errors=True)
    # Reload from the cache so a first run and a cache hit train on identical, memory-mapped data.
    return (
        load_tokenizer(cache / "tokenizer"),
        datasets.load_from_disk(str(cache / "train")),
        datasets.load_from_disk(str(cache / "valid")),
        info,
    )


def _tokenizer_hash(tokenizer) -> str:
    """What a tokenizer maps text to: its vocabulary, pieces and ids, and its class."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return _hash({"class": type(tokenizer).__name__, "vocab": vocab})


def _corpus(prepared, train: Dataset) -> list[str]:
    """Tokenizer corpus: unique rendered sources/targets (the prompt words) plus the raw review texts."""
    lines = (list(dict.fromkeys(column(train, "source")))[:200_000]
             + list(dict.fromkeys(column(train, "target")))[:200_000])
    if "review" in prepared.interactions.column_names:
        lines += [t for t in prepared.interactions["review"][:100_000] if t]
    return lines


def column(ds: Dataset, name: str) -> list:
    """A column as a list, read in one query (``ds[name]`` reads it row by row: 1.2 s for the main job's
    105k training rows, against 0.02 s)."""
    return ds.select_columns([name])[:][name]


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
