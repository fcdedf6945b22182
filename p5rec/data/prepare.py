"""Raw dataset -> prepared directory (design.md §2), and loading it back.

``prepare`` is the data pipeline, one function per step, each returning its table(s) and counts and logging one line:

    _read (resolve, read, checksum the sources) -> _clean (deduplicate, k-core, time order)
    -> _split (leave-one-out for sequential + direct; for reviews + explanation the same leave-one-out over the
       rows, or P5's 8:1:1 ratio split)
    -> _fit_index (on the training part) -> _sequential_table, _direct_table (negatives + shuffled candidates, saved),
       _review_table (rating + review), _explanation_table
    -> _manifest + _write (tables, index.json, manifest.json into a hidden sibling, renamed into place at the end)

Every count along the way goes into ``manifest.json``, with a ``fingerprint`` (sha256 over the parameters, the
source checksums, the counts and the content of every table), so two preparations can be compared by one string.
Wall-clock timings sit under ``timings`` and are the only part that changes between identical runs.

Families whose source data is missing are skipped and ``manifest["skipped"]`` says why (P5's sequence files have
no ratings or review text, so Beauty gets sequential + direct only).

An output directory is never deleted or mixed: ``prepare`` writes only into a path that does not exist or an empty
directory, and replaces an earlier output of its own (``"kind": "p5rec-prepared"`` in its manifest, nothing else
beside it) only when told to (``overwrite``, ``--overwrite``). See :func:`check_out`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

import p5rec
from p5rec import atomic
from p5rec.data import explain, preprocess, readers, splits
from p5rec.argtypes import int_at_least
from p5rec.data.indexing import STRATEGIES, Index, fit_index
from p5rec.data.preprocess import PreprocessError

logger = logging.getLogger(__name__)

# prepared table -> its directory (design.md §2): the tables `prepare` writes, which a family's `data:` names
FAMILY_DIRS = {
    "sequential": "sequential",
    "direct": "direct",
    "rating": "reviews",
    "review": "reviews",
    "explanation": "explanation",
}
RATIOS = (0.8, 0.1, 0.1)
# how the rows of the rating, review and explanation tables are split: "leave-one-out" as the sequences are (a
# user's last review is test, so no family trains on another's test pair), or "ratio", P5's random 8:1:1 split
# (most sequential test targets are then training reviews: a cross-family leak, kept to reproduce P5)
REVIEW_SPLITS = ("leave-one-out", "ratio")

_S = datasets.Value("string")
_LS = datasets.List(datasets.Value("string"))
SEQUENTIAL_FEATURES = datasets.Features({"user": _S, "history": _LS, "target": _S})
DIRECT_TRAIN_FEATURES = datasets.Features({"user": _S, "target": _S})
DIRECT_EVAL_FEATURES = datasets.Features({"user": _S, "target": _S, "candidates": _LS})
REVIEW_FEATURES = datasets.Features({
    "user": _S, "item": _S, "rating": datasets.Value("float32"), "review": _S, "summary": _S, "user_name": _S,
    "timestamp": datasets.Value("int64"),
})
EXPLANATION_FEATURES = datasets.Features({
    "user": _S, "item": _S, "rating": datasets.Value("float32"), "feature": _S, "explanation": _S, "user_name": _S,
})
INTERACTION_FEATURES = datasets.Features({
    "user": _S, "item": _S, "rating": datasets.Value("float32"), "timestamp": datasets.Value("int64"),
    "review": _S, "summary": _S, "user_name": _S,
})


# ------------------------------------------------------------------------------------------------ helpers
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _table_sha256(ds: datasets.Dataset) -> str:
    """sha256 of a table's content (Arrow IPC of its one-chunk columns, schema metadata dropped), so it does not
    depend on how ``datasets`` chunked or fingerprinted it."""
    table = ds.data.table.combine_chunks().replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1 << 30)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _from_pandas(df: pd.DataFrame, features: datasets.Features) -> datasets.Dataset:
    """A Dataset with exactly ``features``, built through Arrow directly (``Dataset.from_dict`` encodes row by
    row in Python, ~10x slower on Beauty's 131k histories)."""
    schema = features.arrow_schema
    data = {name: df[name].tolist() for name in features}
    return datasets.Dataset(pa.Table.from_pydict(data, schema=schema))


def _dataset_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt", ".dat", ".data", ".inter"):
        name = name.removesuffix(suffix)
    return name or path.resolve().name


def _resolve(dataset: str | Path, fmt: str | None) -> tuple[str, str, list[Path]]:
    """(name, reader format, paths) for a local path or a registered dataset name."""
    path = Path(dataset)
    if isinstance(dataset, Path) or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        fmt = fmt or readers.detect_format(path)
        if fmt is None:
            raise readers.DataFormatError(f"cannot tell the format of {path}; pass --format", path=path)
        return _dataset_name(path), fmt, [path]
    from p5rec.data import hub  # registered names (data/registry.yaml)

    resolved = hub.resolve(str(dataset))
    return resolved.name, fmt or resolved.format, [Path(p) for p in resolved.paths]


PREPARED_KIND = "p5rec-prepared"  # manifest["kind"]: marks a directory that `prepare` wrote and may replace
# manifest keys of preparations written before the "kind" marker existed
_LEGACY_MANIFEST_KEYS = ("p5rec_version", "fingerprint", "families", "tables", "counts", "index")


def _prepared_entries() -> set[str]:
    """Every name ``prepare`` can write at the top of its output directory."""
    return {"manifest.json", "index.json", "interactions", "items", *FAMILY_DIRS.values()}


def is_prepared_output(path: Path) -> bool:
    """Whether ``path`` is a directory that :func:`prepare` wrote and nothing else touched: its manifest carries
    the ``"kind": "p5rec-prepared"`` marker (or, for older outputs, the keys every manifest has) and it holds
    only names ``prepare`` writes. A run directory holds a copy of the manifest too, beside its model: that is not
    a prepared output, and neither is a folder where the user keeps other files."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict):
        return False
    marked = manifest.get("kind") == PREPARED_KIND
    legacy = "kind" not in manifest and all(key in manifest for key in _LEGACY_MANIFEST_KEYS)
    return (marked or legacy) and {p.name for p in path.iterdir()} <= _prepared_entries()


def check_out(out: Path, overwrite: bool = False) -> None:
    """Refuse an output directory that ``prepare`` must not replace; return if it may write there.

    Free: a path that does not exist, or an empty directory. Replaced only with ``overwrite``: an earlier output of
    ``prepare`` (:func:`is_prepared_output`). Never: a file, or a non-empty directory that is anything else (a run
    directory, a folder of the user's own files). Raises ``FileExistsError`` with a one-line message; nothing is
    changed on disk.
    """
    out = Path(out)
    if not out.exists():
        if out.is_symlink():
            raise FileExistsError(f"{out} is a dangling symbolic link; choose another --out")
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    if not is_prepared_output(out):
        shown = ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
        raise FileExistsError(f"{out} is not empty and is not a dataset prepared by p5rec (it holds {shown}); "
                              "nothing was changed; choose another --out")
    if not overwrite:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        raise FileExistsError(f"{out} already holds a prepared dataset ({manifest.get('dataset', '?')}, fingerprint "
                              f"{str(manifest.get('fingerprint'))[:12]}); pass --overwrite to replace it, or choose "
                              "another --out")


class _Clock:
    """Step timings for ``manifest["timings"]`` plus one progress log line per step."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()
        self._t0 = self._t

    def step(self, name: str, message: str, *args) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._t, 3)
        self._t = now
        logger.info("%s: " + message + " (%.1fs)", name, *args, self.timings[name])

    def total(self) -> float:
        return round(time.perf_counter() - self._t0, 3)


# ------------------------------------------------------------------------------------------------ prepare
def prepare(
    dataset: str | Path,
    out: Path,
    *,
    fmt: str | None = None,
    k: int = 5,
    index: str = "random",
    seed: int = 42,
    n_negatives: int = 99,
    on_error: str = "raise",
    columns: dict[str, str] | None = None,
    explainer: str = "feature-opinion",
    overwrite: bool = False,
    delimiter: str | None = None,
    review_split: str = "leave-one-out",
) -> Path:
    """Prepare ``dataset`` (a registered name, or a file/directory path) into ``out`` (design.md §2).

    ``out`` must not exist, be empty, or (only with ``overwrite``) hold an earlier output of this function
    (:func:`check_out`); that is checked before any work and again before the end. Everything is written into a
    hidden sibling directory that is renamed to ``out`` once complete, and only then is an earlier output deleted:
    an error or a kill at any point leaves ``out`` as it was (at worst a ``.<out>.<hex>.tmp`` sibling remains).

    ``fmt``: reader name (guessed from file names if None). ``k``: k-core threshold. ``index``: id strategy
    (``random``, ``sequential``, ``collaborative``). ``review_split``: how the review rows are split
    (:data:`REVIEW_SPLITS`). ``seed`` drives the index, the ratio split, the negatives and the candidate shuffles.
    Raises ``DataFormatError`` (bad input), ``PreprocessError`` (nothing left after a step), ``FileNotFoundError``.
    Returns ``out``.
    """
    if index not in STRATEGIES:
        raise ValueError(f"unknown index strategy {index!r}; expected one of {STRATEGIES}")
    if review_split not in REVIEW_SPLITS:
        raise ValueError(f"unknown review split {review_split!r}; expected one of {REVIEW_SPLITS}")
    explain.EXTRACTORS.get(explainer)  # fail before reading, not after
    out = Path(out)
    check_out(out, overwrite)  # before minutes of work, not after
    for stale in atomic.stale_siblings(out):
        logger.warning("%s was left by an interrupted preparation of %s; delete it to reclaim the space", stale, out)
    clock = _Clock()
    raw = _read(dataset, fmt, on_error=on_error, columns=columns, delimiter=delimiter, clock=clock)
    cleaned = _clean(raw.result.interactions, k, clock)
    df = cleaned.df
    split = _split(df, cleaned.skipped, review_split, seed, clock)
    idx = _fit_index(df, split.loo, index, seed, clock)
    tables = {"sequential": _sequential_table(split.loo, clock),
              "direct": _direct_table(df, split.loo, n_negatives, seed, clock)}
    if split.reviews is not None:
        tables["reviews"] = _review_table(df, split.reviews, clock)
    explanation = None
    if "explanation" not in cleaned.skipped:
        tables["explanation"], explanation = _explanation_table(df, split.reviews, explainer, clock)
    params = {"k": k, "index": index, "seed": seed, "n_negatives": n_negatives, "on_error": on_error,
              "columns": columns, "delimiter": delimiter, "explainer": explainer, "review_split": review_split}
    if review_split == "ratio":
        params["ratios"] = list(RATIOS)
    manifest = _write(out, _manifest(raw, params, cleaned, split, idx, tables, explanation), df, raw.result.items,
                      tables, idx, overwrite=overwrite, clock=clock)
    logger.info("prepared %s in %.1fs: %s", raw.name, manifest["timings"]["total"],
                ", ".join(f"{f} {sum(v['splits'].values())}" for f, v in manifest["families"].items()))
    return out


@dataclass
class _Raw:
    """What :func:`_read` returns."""

    name: str
    fmt: str
    result: readers.ReadResult
    source: list[dict]  # manifest["source"]: every file read, with its sha256


def _read(dataset: str | Path, fmt: str | None, *, on_error: str, columns: dict[str, str] | None,
          delimiter: str | None, clock: _Clock) -> _Raw:
    """Step 1, read the raw files: resolve ``dataset`` to a reader and its files, read them, checksum each."""
    name, fmt, paths = _resolve(dataset, fmt)
    result = readers.read(fmt, paths, on_error=on_error, columns=columns, delimiter=delimiter)
    source = [{"path": str(p), "sha256": _sha256_file(Path(p))} for p in result.source]
    clock.step("read", "%d interactions from %s (%s), %d malformed", len(result.interactions), name, fmt,
               result.counts.get("malformed", 0))
    return _Raw(name, fmt, result, source)


@dataclass
class _Cleaned:
    """What :func:`_clean` returns."""

    df: pd.DataFrame  # the interactions table: deduplicated, k-core filtered, sorted by (user, timestamp, item)
    counts: dict  # manifest["counts"], from interactions_read to avg_sequence_length
    skipped: dict[str, str]  # family -> why the cleaned data cannot feed it
    notes: list[str]


def _clean(interactions: datasets.Dataset, k: int, clock: _Clock) -> _Cleaned:
    """Step 2, clean: drop duplicates, keep the k-core, order each user's interactions in time; say which
    families the data can feed (ratings for rating, review text for review and explanation)."""
    df = interactions.to_pandas()
    n_read = len(df)
    before = {"users": int(df["user"].nunique()), "items": int(df["item"].nunique()), "interactions": n_read}
    df, dup_counts = preprocess.deduplicate(df)
    df, rounds = preprocess.kcore(df, k)
    df = preprocess.time_order(df)
    kcore_removed = {key: sum(r[f"{key}_removed"] for r in rounds) for key in ("users", "items", "rows")}
    n_users, n_items, n_rows = df["user"].nunique(), df["item"].nunique(), len(df)
    clock.step("clean", "removed %d exact duplicates, %d repeats; k-core(k=%d) removed %d rows in %d round(s); "
               "%d users, %d items, %d interactions", dup_counts["exact_duplicates"],
               dup_counts["repeat_interactions"], k, kcore_removed["rows"], len(rounds), n_users, n_items, n_rows)
    counts = {
        "interactions_read": n_read,
        "before": before,  # distinct users and items as read, before deduplication and the k-core filter
        "duplicates": dup_counts,
        "kcore_rounds": rounds,
        "kcore_removed": kcore_removed,
        "after": {"users": int(n_users), "items": int(n_items), "interactions": int(n_rows)},
        "sparsity": round(1 - n_rows / (n_users * n_items), 6),
        "avg_sequence_length": round(n_rows / n_users, 4),
    }
    notes: list[str] = []
    if bool((df["timestamp"] == 0).all()):
        notes.append("every timestamp is 0 (missing): sequences follow item-id order, not time")
        logger.warning(notes[-1])
    skipped: dict[str, str] = {}
    has_rating = bool(df["rating"].notna().any())
    if not has_rating:
        skipped["rating"] = "no ratings in the source (implicit feedback)"
    if not (df["review"].str.len() > 0).any():
        skipped["review"] = skipped["explanation"] = "no review text in the source"
    n_partial = int(df["rating"].isna().sum())
    if has_rating and n_partial:
        notes.append(f"{n_partial} reviews have no rating (NaN in the rating column)")
    return _Cleaned(df, counts, skipped, notes)


@dataclass
class _Splits:
    """What :func:`_split` returns."""

    loo: splits.LeaveOneOut  # leave-one-out over each user's sequence: sequential and direct
    reviews: np.ndarray | None  # the split of each cleaned row (rating, review, explanation); None: all skipped
    moved: int  # rows the ratio split moved to train so every user and item is in train (0 for leave-one-out)


def _split(df: pd.DataFrame, skipped: dict[str, str], review_split: str, seed: int, clock: _Clock) -> _Splits:
    """Step 3, split: leave-one-out over the sequences; one split of the reviews, which the rating, review and
    explanation tables share (none when the data has neither ratings nor review text): the same leave-one-out over
    the rows (``review_split="leave-one-out"``), or P5's random 8:1:1 (``"ratio"``)."""
    loo = splits.leave_one_out(df)
    clock.step("leave_one_out", "%d/%d/%d sequential rows, %d users with < 3 interactions", len(loo.train),
               len(loo.valid), len(loo.test), loo.short_users)
    if "rating" in skipped and "review" in skipped:
        return _Splits(loo, None, 0)
    if review_split == "leave-one-out":
        split_of = splits.leave_one_out_rows(df)
        clock.step("review_split", "reviews %s by leave-one-out, as the sequences",
                   {s: int((split_of == s).sum()) for s in splits.SPLITS})
        return _Splits(loo, split_of, 0)
    split_of, moved = splits.ratio_split(df, RATIOS, seed=seed)
    clock.step("review_split", "reviews %s by ratio, %d rows moved to train so every user/item is in train",
               {s: int((split_of == s).sum()) for s in splits.SPLITS}, moved)
    return _Splits(loo, split_of, moved)


def _fit_index(df: pd.DataFrame, loo: splits.LeaveOneOut, strategy: str, seed: int, clock: _Clock) -> Index:
    """Step 4, the index: fitted on the training part of the sequences only, over every item and user."""
    idx = fit_index(loo.training_sequences(), strategy=strategy, seed=seed, items=df["item"].unique().tolist(),
                    users=list(loo.sequences))
    clock.step("index", "%s index over %d users, %d items (levels %s)", strategy, len(idx.users), len(idx.items),
               idx.levels)
    return idx


def _rows(dd: datasets.DatasetDict) -> dict[str, int]:
    """split -> row count (``manifest["families"][...]["splits"]`` and the step log)."""
    return {s: len(ds) for s, ds in dd.items()}


def _sequential_table(loo: splits.LeaveOneOut, clock: _Clock) -> datasets.DatasetDict:
    """Step 5a, the sequential table: the leave-one-out rows (user, history, target)."""
    table = datasets.DatasetDict({s: _from_pandas(getattr(loo, s), SEQUENTIAL_FEATURES) for s in splits.SPLITS})
    clock.step("sequential", "rows %s", _rows(table))
    return table


def _direct_table(df: pd.DataFrame, loo: splits.LeaveOneOut, n_negatives: int, seed: int,
                  clock: _Clock) -> datasets.DatasetDict:
    """Step 5b, the direct table: the training positives; for valid and test, the target with ``n_negatives``
    items the user never touched, shuffled and saved, so every evaluation ranks the same candidates."""
    train_seqs = loo.training_sequences()
    eval_users = loo.test["user"].tolist()
    user_items = {u: set(s) for u, s in loo.sequences.items()}
    catalogue = np.array(sorted(df["item"].unique()), dtype=object)
    negatives = splits.sample_negatives(user_items, catalogue, n=n_negatives, seed=seed + 1, users=eval_users)
    train_pairs = [(u, it) for u in sorted(train_seqs) for it in train_seqs[u]]
    direct = {"train": _from_pandas(pd.DataFrame(train_pairs, columns=["user", "target"]), DIRECT_TRAIN_FEATURES)}
    for offset, split in ((2, "valid"), (3, "test")):
        frame = getattr(loo, split)
        targets = dict(zip(frame["user"], frame["target"]))
        cands = splits.make_candidates(targets, negatives, seed=seed + offset)
        direct[split] = _from_pandas(
            pd.DataFrame({"user": frame["user"], "target": frame["target"],
                          "candidates": [cands[u] for u in frame["user"]]}), DIRECT_EVAL_FEATURES)
    clock.step("direct", "%d negatives for each of %d users", n_negatives, len(eval_users))
    return datasets.DatasetDict(direct)


def _review_table(df: pd.DataFrame, split_of: np.ndarray, clock: _Clock) -> datasets.DatasetDict:
    """Step 5c, the reviews table (rating and review families): each cleaned row in its split."""
    reviews = df[["user", "item", "rating", "review", "summary", "user_name", "timestamp"]]
    table = datasets.DatasetDict({s: _from_pandas(reviews[split_of == s], REVIEW_FEATURES) for s in splits.SPLITS})
    clock.step("reviews", "rows %s", _rows(table))
    return table


def _explanation_table(df: pd.DataFrame, split_of: np.ndarray, explainer: str,
                       clock: _Clock) -> tuple[datasets.DatasetDict, dict]:
    """Step 5d, the explanation table: a (feature, explanation) pair extracted from each review that has one, in
    the review's split; and ``manifest["explanation"]`` (extractor, features, rows explained, coverage)."""
    texts = df["review"].tolist()
    extractor = explain.EXTRACTORS.get(explainer)().fit(texts)
    pairs = [extractor.extract_one(t) for t in tqdm(texts, desc="explanations", disable=None, mininterval=2)]
    ok = np.array([p is not None for p in pairs], dtype=bool)
    expl = df.loc[ok, ["user", "item", "rating", "user_name"]].copy()
    expl["feature"] = [p[0] for p in pairs if p is not None]
    expl["explanation"] = [p[1] for p in pairs if p is not None]
    table = datasets.DatasetDict({
        s: _from_pandas(expl[split_of[ok] == s], EXPLANATION_FEATURES) for s in splits.SPLITS})
    stats = {"extractor": explainer, "features": len(getattr(extractor, "features", {})),
             "explained": int(ok.sum()), "coverage": round(explain.coverage(pairs), 6)}
    clock.step("explanation", "%d of %d reviews explained (coverage %.3f), %d features", int(ok.sum()),
               len(texts), stats["coverage"], stats["features"])
    return table, stats


def _manifest(raw: _Raw, params: dict, cleaned: _Cleaned, split: _Splits, idx: Index, tables: dict,
              explanation: dict | None) -> dict:
    """Step 6a, the manifest: every step's counts; the table hashes, fingerprint and timings are added by
    :func:`_write`."""
    return {
        "kind": PREPARED_KIND,
        "p5rec_version": p5rec.__version__,
        "dataset": raw.name,
        "format": raw.fmt,
        "source": raw.source,
        "params": params,
        "seed": params["seed"],
        "k": params["k"],
        "counts": {
            "read": {key: int(v) for key, v in raw.result.counts.items()},
            **cleaned.counts,
            "short_users": split.loo.short_users,
            "moved_to_train": int(split.moved),
        },
        "families": {family: {"dir": sub, "splits": _rows(tables[sub])}
                     for family, sub in FAMILY_DIRS.items() if family not in cleaned.skipped},
        "skipped": cleaned.skipped,
        "notes": cleaned.notes,
        "explanation": explanation,
        "index": {"strategy": idx.strategy, "levels": idx.levels, "users": len(idx.users),
                  "items": len(idx.items), "file": "index.json"},
    }


def _write(out: Path, manifest: dict, df: pd.DataFrame, items: datasets.Dataset | None, tables: dict, idx: Index,
           *, overwrite: bool, clock: _Clock) -> dict:
    """Step 6b, write: the tables, index.json and ``manifest`` (completed with the table hashes, the fingerprint
    and the timings, and returned) into a temporary sibling, then renamed to ``out`` (the module docstring of
    p5rec.atomic)."""
    work = atomic.make_temporary_dir(out)
    try:
        manifest["tables"] = _write_tables(work, df, items, tables, idx)
        manifest["fingerprint"] = fingerprint(manifest)
        clock.step("write", "wrote %s (fingerprint %s)", out, manifest["fingerprint"][:12])
        manifest["timings"] = {**clock.timings, "total": clock.total()}
        atomic.write_text(work / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        check_out(out, overwrite)  # the target may have changed while we worked
        atomic.replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _write_tables(work: Path, df: pd.DataFrame, items: datasets.Dataset | None, tables: dict,
                  idx: Index) -> dict[str, str]:
    """Save the cleaned interactions, the items, every family table and index.json into ``work``; return the
    content hashes for ``manifest["tables"]``."""
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # datasets' per-table "Saving the dataset" bars would drown the step log
    try:
        interactions = _from_pandas(df, INTERACTION_FEATURES)
        interactions.save_to_disk(str(work / "interactions"))
        table_hashes = {"interactions": _table_sha256(interactions)}
        if items is not None:
            items.save_to_disk(str(work / "items"))
            table_hashes["items"] = _table_sha256(items)
        for sub, dd in tables.items():
            dd.save_to_disk(str(work / sub))
            for s, ds in dd.items():
                table_hashes[f"{sub}/{s}"] = _table_sha256(ds)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    idx.to_json(work / "index.json")
    table_hashes["index.json"] = _sha256_file(work / "index.json")
    return table_hashes


def fingerprint(manifest: dict) -> str:
    """sha256 over the canonical content of a manifest: everything except ``timings``, ``fingerprint``, the
    dataset's name, the source *paths* (the source checksums stay) and the ``kind`` marker, so the same file
    prepared by name or by path, from any directory, by this version or one before the marker, compares equal.
    Entries added later that change nothing prepared stay out too, so earlier preparations keep their fingerprint:
    ``counts.before`` (derived from the source, whose checksums are in), ``params.delimiter`` when unset and
    ``params.review_split`` when it is ``"ratio"`` (the only split before it)."""
    content = {key: v for key, v in manifest.items()
               if key not in ("timings", "fingerprint", "source", "dataset", "kind")}
    if "before" in content.get("counts", {}):
        content["counts"] = {k: v for k, v in content["counts"].items() if k != "before"}
    if "params" in content:
        params = content["params"]
        content["params"] = {k: v for k, v in params.items()
                             if not (k == "delimiter" and v is None) and not (k == "review_split" and v == "ratio")}
    content["source_sha256"] = [s["sha256"] for s in manifest.get("source", [])]
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def review_split_of(manifest: dict) -> str:
    """How a preparation split its reviews (:data:`REVIEW_SPLITS`); ``"ratio"`` for one written before the choice."""
    return manifest.get("params", {}).get("review_split", "ratio")


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class PreparedDataset:
    """A prepared directory opened for reading (tables memory-mapped by ``datasets``)."""

    path: Path
    manifest: dict
    index: Index
    interactions: datasets.Dataset
    items: datasets.Dataset | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def family(self, name: str) -> datasets.DatasetDict:
        """The DatasetDict a family reads (rating/review -> ``reviews``). KeyError if the family was skipped."""
        if name not in FAMILY_DIRS:
            raise KeyError(f"unknown family {name!r}; expected one of {sorted(FAMILY_DIRS)}")
        if name in self.manifest.get("skipped", {}):
            raise KeyError(f"family {name!r} was not prepared for {self.path}: {self.manifest['skipped'][name]}")
        sub = self.manifest["families"][name]["dir"]
        if sub not in self._cache:
            self._cache[sub] = _load_table(self.path / sub)
        return self._cache[sub]

    def has_family(self, name: str) -> bool:
        return name in self.manifest.get("families", {})

    def user_items(self) -> dict[str, set[str]]:
        """user -> every item the user interacted with (all splits)."""
        if "user_items" not in self._cache:
            cols = self.interactions.select_columns(["user", "item"]).to_pandas()
            self._cache["user_items"] = {u: set(g) for u, g in cols.groupby("user", sort=True)["item"]}
        return self._cache["user_items"]

    @property
    def catalogue(self) -> list[str]:
        """All items of the cleaned data, sorted raw ids."""
        if "catalogue" not in self._cache:
            self._cache["catalogue"] = sorted(set(self.interactions["item"]))
        return self._cache["catalogue"]

    def training_sequences(self) -> dict[str, list[str]]:
        """user -> the training part of their sequence, oldest first. By design.md §2 a user's validation case has
        ``history = seq[:-2]``, exactly that part (the validation target itself is not training data)."""
        if "training_sequences" not in self._cache:
            valid = self.family("sequential")["valid"]
            self._cache["training_sequences"] = dict(zip(valid["user"], valid["history"]))
        return self._cache["training_sequences"]

    def training_ratings(self) -> tuple[list[str], list[str], list[float]] | None:
        """(users, items, stars) of the training reviews; None where the data has no stars (P5's Beauty)."""
        if not self.has_family("rating"):
            return None
        train = self.family("rating")["train"].select_columns(["user", "item", "rating"])
        stars = np.asarray(train["rating"], dtype=np.float64)
        return (list(train["user"]), list(train["item"]), stars.tolist()) if np.isfinite(stars).any() else None

    def saved_candidates(self, split: str) -> dict[str, list[str]]:
        """user -> the 100 candidates saved for their ``split`` case (1 positive + 99 never-touched items), which
        every candidate protocol of every family ranks, so that all of them are scored on the same lists."""
        key = f"candidates-{split}"
        if key not in self._cache:
            table = self.family("direct")[split].select_columns(["user", "candidates"])
            self._cache[key] = dict(zip(table["user"], table["candidates"]))
        return self._cache[key]

    def train_item_counts(self) -> dict[str, int]:
        """item -> number of training interactions (training part of the sequences; popularity baselines)."""
        targets = pd.Series(self.family("direct")["train"]["target"], dtype=object)
        counts = targets.value_counts()
        return {it: int(counts.get(it, 0)) for it in self.catalogue}


class PreparedError(ValueError):
    """A prepared directory that is damaged or incomplete; the message names the file and what is wrong."""


# what every manifest written by :func:`prepare` holds, and the type it must have
_MANIFEST_KEYS = {"families": dict, "skipped": dict, "fingerprint": str}


def read_manifest(path: str | Path) -> dict:
    """``DIR/manifest.json`` checked: JSON, an object, with the keys :func:`prepare` writes (``families`` naming a
    ``dir`` each). :class:`PreparedError` naming the file otherwise (a half-written or hand-edited manifest would
    fail later with a bare KeyError); FileNotFoundError if it is missing."""
    file = Path(path) / "manifest.json"
    if not file.is_file():
        raise FileNotFoundError(f"{Path(path)} is not a prepared dataset (no manifest.json); run `p5rec data prepare`")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise PreparedError(f"{file}: not UTF-8 text ({exc.reason}); prepare the dataset again") from None
    except json.JSONDecodeError as exc:
        raise PreparedError(f"{file} line {exc.lineno}: not valid JSON ({exc.msg}), truncated or corrupt; "
                            "prepare the dataset again") from None
    if not isinstance(manifest, dict):
        raise PreparedError(f"{file}: expected a JSON object, found {type(manifest).__name__}")
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise PreparedError(f"{file}: field {key!r} is missing or not a {kind.__name__} (a partial manifest?); "
                                "prepare the dataset again")
    for family, info in manifest["families"].items():
        if not isinstance(info, dict) or not isinstance(info.get("dir"), str):
            raise PreparedError(f"{file}: families.{family} has no 'dir'; prepare the dataset again")
    return manifest


def load_prepared(path: str | Path) -> PreparedDataset:
    """Open a directory written by :func:`prepare`. FileNotFoundError if it has no manifest; :class:`PreparedError`
    naming the file if the manifest, ``index.json`` or a table cannot be read."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        index = Index.from_json(path / "index.json")
    except FileNotFoundError:
        raise PreparedError(f"{path / 'index.json'} is missing; prepare the dataset again") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise PreparedError(f"{path / 'index.json'}: not an index written by `p5rec data prepare` ({exc})") from None
    items = _load_table(path / "items") if (path / "items").is_dir() else None
    return PreparedDataset(path, manifest, index, _load_table(path / "interactions"), items)


def _load_table(path: Path) -> datasets.Dataset | datasets.DatasetDict:
    """``datasets.load_from_disk`` with its errors turned into one line naming the table's directory."""
    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise PreparedError(f"{path} is missing or is not a saved table; prepare the dataset again") from None
    except Exception as exc:  # noqa: BLE001 - Arrow and datasets raise many kinds for a damaged table
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PreparedError(f"{path}: cannot read the table ({first}); prepare the dataset again") from None


# ------------------------------------------------------------------------------------------------ CLI
def _parse_columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"--columns expects canonical=source pairs like user=uid, got {part!r}")
        out[key.strip()] = value.strip()
    return out


def _parse_delimiter(text: str) -> str:
    """``--delimiter``: one character; ``\\t`` (as typed in a shell: ``--delimiter '\\t'``) and ``tab`` mean a tab."""
    value = {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(text, text)
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"expected one character (or '\\t' for a tab), got {text!r}")
    return value


def _errors():
    """What the CLI reports in one line (exit status 2) instead of a traceback."""
    from p5rec.data.hub import ChecksumError

    return (readers.DataFormatError, PreprocessError, FileNotFoundError, FileExistsError, ChecksumError, KeyError,
            ValueError)


def _fail(exc: Exception) -> int:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    print(f"p5rec data: error: {msg}", file=sys.stderr)
    return 2


def _cmd_prepare(args: argparse.Namespace) -> int:
    dataset = Path(args.path) if args.path else args.dataset
    name = _dataset_name(Path(args.path)) if args.path else args.dataset
    out = Path(args.out) if args.out else Path("prepared") / name
    try:
        prepare(dataset, out, fmt=args.format, k=args.k, index=args.index, seed=args.seed,
                n_negatives=args.n_negatives, on_error=args.on_error, columns=args.columns,
                explainer=args.explainer, overwrite=args.overwrite, delimiter=args.delimiter,
                review_split=args.review_split)
    except _errors() as exc:
        return _fail(exc)
    print(out)
    return 0


def summary(manifest: dict) -> str:
    """A readable summary of a manifest (what ``p5rec data stats`` prints)."""
    c = manifest["counts"]
    after = c["after"]
    lines = [
        f"dataset      {manifest['dataset']} ({manifest['format']}), p5rec {manifest['p5rec_version']}",
        "source       " + ", ".join(f"{s['path']} (sha256 {s['sha256'][:12]})" for s in manifest["source"]),
        f"read         {c['interactions_read']} interactions, {c['read'].get('malformed', 0)} malformed lines"
        + (f"; {c['before']['users']} users, {c['before']['items']} items" if "before" in c else ""),
        f"cleaning     {c['duplicates']['exact_duplicates']} exact duplicates, "
        f"{c['duplicates']['repeat_interactions']} repeats removed; k-core k={manifest['k']}: "
        f"{c['kcore_removed']['rows']} rows in {len(c['kcore_rounds'])} round(s)",
        f"after        {after['users']} users, {after['items']} items, {after['interactions']} interactions",
        f"sparsity     {c['sparsity']:.4%}   avg sequence length {c['avg_sequence_length']:.2f}",
        f"index        {manifest['index']['strategy']} (levels {manifest['index']['levels']}), seed {manifest['seed']}",
        "families     " + "split rows (train / valid / test)",
    ]
    for fam, info in manifest["families"].items():
        sp_ = info["splits"]
        lines.append(f"  {fam:<12} {sp_.get('train', 0):>9} / {sp_.get('valid', 0):>7} / {sp_.get('test', 0):>7}"
                     f"   ({info['dir']}/)")
    for fam, why in manifest.get("skipped", {}).items():
        lines.append(f"  {fam:<12} skipped: {why}")
    if "reviews" in {v["dir"] for v in manifest["families"].values()}:
        if review_split_of(manifest) == "ratio":
            lines.append(f"reviews      split 8:1:1 at random (P5's); {c['moved_to_train']} moved to train (every "
                         "user/item in train)")
        else:
            lines.append("reviews      split by leave-one-out, as the sequences (a user's last review is test)")
    if manifest.get("explanation"):
        e = manifest["explanation"]
        lines.append(f"explanation  {e['extractor']}: coverage {e['coverage']:.1%}, {e['features']} features")
    for note in manifest.get("notes", []):
        lines.append(f"note         {note}")
    lines.append(f"fingerprint  {manifest['fingerprint']}")
    return "\n".join(lines)


def _cmd_stats(args: argparse.Namespace) -> int:
    try:
        manifest = read_manifest(args.dir)
        text = summary(manifest)
    except (FileNotFoundError, PreparedError) as exc:
        return _fail(exc)
    except (KeyError, TypeError, IndexError) as exc:
        return _fail(PreparedError(f"{Path(args.dir) / 'manifest.json'}: incomplete, no {exc} where a manifest "
                                   "written by `p5rec data prepare` has one; prepare the dataset again"))
    print(text)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from p5rec.data import hub

    for e in hub.list_datasets():
        where = "embedded" if e.embedded else ("manual download" if e.manual else "download")
        print(f"{e.name:<36} {e.format:<16} {where:<16} {' '.join(e.description.split())}")
    print("\nformats (--format; `p5rec data prepare --path FILE_OR_DIR` guesses one from file names):")
    for name in readers.READERS.names():
        print(f"  {name:<18} {readers.FORMAT_FILES.get(name, '')}")
    return 0


def add_cli(subparsers) -> None:
    """``p5rec data {prepare,stats,list}``."""
    data = subparsers.add_parser("data", help="prepare datasets (read, clean, split, index)")
    sub = data.add_subparsers(dest="data_command", metavar="{prepare,stats,list}")
    sub.required = True

    p = sub.add_parser("prepare", help="raw files or a registered dataset -> prepared directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="registered dataset name (p5rec data list)")
    src.add_argument("--path", help="a data file or directory")
    p.add_argument("--format", default=None, help="reader name (default: guessed from file names)")
    p.add_argument("--out", default=None, help="output directory (default: prepared/<name>); must not exist or be "
                   "empty, unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier `p5rec data prepare` output at --out (never any other directory)")
    p.add_argument("--k", type=int_at_least(0), default=5, help="k-core threshold (default 5; 0 or 1: no filter)")
    p.add_argument("--index", choices=STRATEGIES, default="random", help="item/user id strategy")
    p.add_argument("--review-split", choices=REVIEW_SPLITS, default="leave-one-out",
                   help="how rating, review and explanation rows are split: leave-one-out as the sequences (a "
                        "user's last review is test; no family trains on another's test pair), or ratio, P5's "
                        "random 8:1:1 (most sequential test targets are then training reviews)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--n-negatives", type=int_at_least(1), default=99,
                   help="negatives per user for the direct family")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="malformed input lines")
    p.add_argument("--columns", type=_parse_columns, default=None,
                   help="generic formats and recbole: canonical=source column pairs, e.g. user=uid,item=iid,rating=score")
    p.add_argument("--delimiter", type=_parse_delimiter, default=None,
                   help="csv and recbole: the field separator, one character ('\\t' for a tab; default: csv detects "
                   "comma, tab, semicolon or pipe from the header, recbole reads tabs)")
    p.add_argument("--explainer", choices=explain.EXTRACTORS.names(), default="feature-opinion")
    p.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("stats", help="summary of a prepared directory's manifest")
    s.add_argument("dir")
    s.set_defaults(func=_cmd_stats)

    ls = sub.add_parser("list", help="registered datasets")
    ls.set_defaults(func=_cmd_list)
