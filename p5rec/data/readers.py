"""Raw dataset files -> the canonical interaction table (design.md section 1).

One reader per source format, each registered by one ``@READERS.register(name)`` line. A reader finds its files
(a directory is searched for the format's known file names; explicit files are classified by name), parses them
line by line into Python lists, and the table is built once with an explicit ``datasets.Features``, so every
format yields exactly the same columns and dtypes:

    user: string, item: string, rating: float32 (NaN = implicit), timestamp: int64 (epoch seconds; P5 sequence
    files: position in the user's sequence), review: string, summary: string, user_name: string

A line that cannot be read (bad JSON, a missing user/item, a missing or non-numeric rating in a rated format)
raises ``DataFormatError`` naming the file and the 1-based line; with ``on_error="skip"`` it is counted in
``counts["malformed"]`` and a warning gives the count. Item metadata, where a format has it, becomes a second
table (item, title, brand, categories). Nothing here evaluates code from the data: Python-literal metadata lines
go through ``ast.literal_eval``.
"""

from __future__ import annotations

import ast
import csv
import fnmatch
import gzip
import io
import json
import logging
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import datasets
import pyarrow as pa
from tqdm.auto import tqdm

from p5rec.registry import Registry

logger = logging.getLogger(__name__)

T = TypeVar("T")

INTERACTION_FEATURES = datasets.Features(
    {
        "user": datasets.Value("string"),
        "item": datasets.Value("string"),
        "rating": datasets.Value("float32"),
        "timestamp": datasets.Value("int64"),
        "review": datasets.Value("string"),
        "summary": datasets.Value("string"),
        "user_name": datasets.Value("string"),
    }
)
INTERACTION_COLUMNS: tuple[str, ...] = tuple(INTERACTION_FEATURES)

ITEM_FEATURES = datasets.Features(
    {
        "item": datasets.Value("string"),
        "title": datasets.Value("string"),
        "brand": datasets.Value("string"),
        "categories": datasets.List(datasets.Value("string")),
    }
)

# Files at least this big get a progress bar (when stderr is a terminal: tqdm's disable=None).
_PROGRESS_MIN_BYTES = 8 * 1024 * 1024
# How many malformed-line messages a warning quotes.
_EXAMPLES_KEPT = 3
# Star ratings of every supported source lie in [0, 10] (Amazon, Yelp 1-5, MovieLens 0.5-5); a value outside is a
# corrupt line or a column that holds something else (timestamps, counts), never a rating.
RATING_RANGE = (0.0, 10.0)


@dataclass
class ReadResult:
    """What every reader returns (design.md section 1)."""

    interactions: datasets.Dataset  # canonical columns, one row per interaction, file order
    items: datasets.Dataset | None  # item metadata: item, title, brand, categories; None if none
    source: list[str]  # files read
    counts: dict[str, int]  # {"read": n_lines_seen, "malformed": n_skipped, "interactions": rows, ...}


class DataFormatError(ValueError):
    """A data file does not hold what its format promises. The message names the file and, for a line-level
    problem, the 1-based line (or row) and what was expected or found."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.line = line


class _Bad(Exception):
    """Raised by a line parser; the line loop turns it into a DataFormatError or a skip."""


class _BadRating(_Bad):
    """A rating that is not a finite number in ``RATING_RANGE``; ``column`` is the source column it came from,
    so a whole column of non-ratings (a mapping slip such as ``rating=<timestamp column>``) can be named."""

    def __init__(self, message: str, column: str) -> None:
        super().__init__(message)
        self.column = column


# ----------------------------------------------------------------------------------------------------------------
# Reading context: error policy, counts, files touched


@dataclass
class _Ctx:
    on_error: str
    columns: Mapping[str, str] | None = None
    delimiter: str | None = None  # generic tables and RecBole files: the field separator (None: the format's own)
    counts: dict[str, int] = field(default_factory=lambda: {"read": 0, "malformed": 0})
    sources: list[Path] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    # source column -> lines whose rating it gave was rejected, and the first such message
    rating_rejects: dict[str, int] = field(default_factory=dict)
    rating_examples: dict[str, str] = field(default_factory=dict)

    def bad(self, path: Path, line: int, what: str | _Bad, *, unit: str = "line", meta: bool = False) -> None:
        message = f"{path} {unit} {line}: {what}"
        if isinstance(what, _BadRating):
            self.rating_rejects[what.column] = self.rating_rejects.get(what.column, 0) + 1
            self.rating_examples.setdefault(what.column, message)
        if self.on_error == "raise":
            raise DataFormatError(message, path=path, line=line)
        key = "meta_malformed" if meta else "malformed"
        self.counts[key] = self.counts.get(key, 0) + 1
        if len(self.examples) < _EXAMPLES_KEPT:
            self.examples.append(message)

    def count_read(self, meta: bool = False) -> None:
        key = "meta_read" if meta else "read"
        self.counts[key] = self.counts.get(key, 0) + 1

    def lines(
        self,
        path: Path,
        parse: Callable[[str], T],
        *,
        encoding: str = "utf-8",
        meta: bool = False,
    ) -> Iterator[T]:
        """Yield ``parse(line)`` for each non-blank line of ``path`` (gzip if it ends in .gz); a line whose parse
        raises ``_Bad`` is reported (raise or count) and left out."""
        for _, value in self.numbered_lines(path, parse, encoding=encoding, meta=meta):
            yield value

    def numbered_lines(
        self,
        path: Path,
        parse: Callable[[str], T],
        *,
        encoding: str = "utf-8",
        meta: bool = False,
    ) -> Iterator[tuple[int, T]]:
        """Like ``lines``, with each value's 1-based line number (for checks that span lines)."""
        self.sources.append(path)
        for lineno, raw in _raw_lines(path):
            try:
                line = raw.decode(encoding).rstrip("\r\n")
            except UnicodeDecodeError as exc:
                self.count_read(meta)
                self.bad(path, lineno, f"not valid {encoding} text ({exc.reason} at byte {exc.start})", meta=meta)
                continue
            if not line.strip():
                continue
            self.count_read(meta)
            try:
                value = parse(line)
            except _Bad as exc:
                self.bad(path, lineno, exc, meta=meta)
                continue
            yield lineno, value

    def records(self, path: Path, rows: Iterable[tuple[int, Any]], parse: Callable[[Any], T], *,
                unit: str = "line", meta: bool = False) -> Iterator[T]:
        """Like ``lines`` for sources already split into numbered records (csv rows, parquet rows)."""
        for number, raw in rows:
            self.count_read(meta)
            try:
                yield parse(raw)
            except _Bad as exc:
                self.bad(path, number, exc, unit=unit, meta=meta)


def _open_text(path: Path, encoding: str) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) for each line of ``path``, gunzipped if it ends in .gz. Lines are decoded by
    the caller, one at a time, so an undecodable byte is reported at its own line (a text stream would decode
    8 KiB blocks ahead). A corrupt or truncated gzip stream is a DataFormatError at the line where it breaks."""
    lineno = 0
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            for lineno, raw in enumerate(_progress(handle, path), start=1):
                yield lineno, raw
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataFormatError(f"{path} line {lineno + 1}: corrupt or truncated gzip data ({exc})",
                              path=path, line=lineno + 1) from None


def _decoded_lines(path: Path, encoding: str) -> Iterator[str]:
    """Text lines (newline kept, for the csv module); an undecodable line is a DataFormatError naming it."""
    for lineno, raw in _raw_lines(path):
        try:
            yield raw.decode(encoding)
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"{path} line {lineno}: not valid {encoding} text ({exc.reason} at byte "
                                  f"{exc.start})", path=path, line=lineno) from None


def _progress(iterable: Iterable[T], path: Path) -> Iterable[T]:
    if path.stat().st_size < _PROGRESS_MIN_BYTES:
        return iterable
    return tqdm(iterable, desc=f"reading {path.name}", unit=" lines", disable=None, leave=False)


# ----------------------------------------------------------------------------------------------------------------
# Column builders: Python lists, one Dataset at the end


class _Table:
    """The canonical interaction columns as Python lists."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {name: [] for name in INTERACTION_COLUMNS}
        self._appenders = [self.columns[name].append for name in INTERACTION_COLUMNS]

    def add(
        self,
        user: str,
        item: str,
        rating: float = math.nan,
        timestamp: int = 0,
        review: str = "",
        summary: str = "",
        user_name: str = "",
    ) -> None:
        for append, value in zip(self._appenders, (user, item, rating, timestamp, review, summary, user_name)):
            append(value)

    def __len__(self) -> int:
        return len(self.columns["user"])

    def dataset(self) -> datasets.Dataset:
        return _from_columns(self.columns, INTERACTION_FEATURES)


class _Items:
    """Item metadata keyed by item id; the first record of an item wins."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, str, list[str]]] = {}
        self.duplicates = 0

    def add(self, item: str, title: str = "", brand: str = "", categories: Sequence[str] = ()) -> None:
        if item in self.rows:
            self.duplicates += 1
            return
        self.rows[item] = (title, brand, list(categories))

    def dataset(self) -> datasets.Dataset:
        return _from_columns(
            {
                "item": list(self.rows),
                "title": [row[0] for row in self.rows.values()],
                "brand": [row[1] for row in self.rows.values()],
                "categories": [row[2] for row in self.rows.values()],
            },
            ITEM_FEATURES,
        )


def _from_columns(columns: dict[str, list], features: datasets.Features) -> datasets.Dataset:
    """One Dataset from Python column lists, typed by ``features``. Going through a pyarrow table with the
    features' schema is ~20x faster than ``Dataset.from_dict(..., features=)``, which encodes value by value
    (10 s instead of 0.4 s for P5 Beauty's 200k rows)."""
    table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


# ----------------------------------------------------------------------------------------------------------------
# Field helpers (raise _Bad with a message saying what was expected)


def _id_str(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _req_id(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None or value == "":
        raise _Bad(f"missing field {key!r}")
    return _id_str(value)


def _opt_str(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    return "" if value is None else str(value)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise _Bad(f"field {key!r} is not a number: {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _Bad(f"field {key!r} is not a number: {value!r}") from None


def _rating(value: Any, key: str, canonical: bool = True) -> float:
    """A present rating: a finite number in ``RATING_RANGE`` (NaN, "NaN", inf, 42 are refused). ``canonical``
    False means ``key`` is a source column mapped to ``rating``, which the message then says."""
    label = f"{key!r}" if canonical else f"{key!r} (for 'rating')"
    number = _number(value, key)
    if not math.isfinite(number):
        raise _BadRating(f"field {label} is not a finite number: {value!r}", key)
    low, high = RATING_RANGE
    if not low <= number <= high:
        raise _BadRating(f"field {label} is {value!r}, outside the rating range [{low:g}, {high:g}]", key)
    return number


def _req_rating(record: Mapping[str, Any], key: str) -> float:
    if record.get(key) is None:
        raise _Bad(f"missing field {key!r}")
    return _rating(record[key], key)


def _opt_rating(value: Any, key: str, canonical: bool = True) -> float:
    """A rating that may be missing (implicit data): None, a blank string, or a float NaN (a table's missing
    marker, e.g. a Parquet float column) give NaN; anything else must be a valid rating (``_rating``)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    if isinstance(value, float) and math.isnan(value):
        return math.nan
    return _rating(value, key, canonical)


def _int_field(value: Any, key: str) -> int:
    """An integer epoch field; a float is truncated, anything else is malformed. Missing -> 0."""
    if value is None or value == "":
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        number = int(value)
    else:
        as_float = _number(value, key)
        if math.isnan(as_float) or math.isinf(as_float):
            raise _Bad(f"field {key!r} is not a finite number: {value!r}")
        number = int(as_float)
    if not -(2**63) <= number < 2**63:
        raise _Bad(f"field {key!r} does not fit in 64 bits: {value!r}")
    return number


def _epoch(value: Any, key: str) -> int:
    """Epoch seconds from a number, a numeric string, an ISO-8601 date/time string or a datetime; naive times are
    taken as UTC. Missing -> 0."""
    if value is None:
        return 0
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return int(moment.timestamp())
    if isinstance(value, date):
        return int(datetime(value.year, value.month, value.day, tzinfo=timezone.utc).timestamp())
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return 0
        try:
            return _int_field(float(text), key)
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise _Bad(f"field {key!r} is neither a number nor an ISO date: {value!r}") from None
        return _epoch(moment, key)
    return _int_field(value, key)


def _json_object(line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _Bad(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _Bad(f"expected a JSON object, found {type(record).__name__}")
    return record


def _literal_object(line: str) -> dict[str, Any]:
    """A metadata line of the 2014 Amazon release: a Python dict literal (single quotes), sometimes JSON."""
    try:
        record = ast.literal_eval(line)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _json_object(line)
    if not isinstance(record, dict):
        raise _Bad(f"expected a dict literal, found {type(record).__name__}")
    return record


def _unique(values: Iterable[Any]) -> list[str]:
    """Strings in first-seen order without repeats (nested category paths share their roots)."""
    seen: dict[str, None] = {}
    for value in values:
        if value is not None and str(value).strip():
            seen.setdefault(str(value).strip(), None)
    return list(seen)


def _flatten_categories(value: Any) -> list[str]:
    """``[["Beauty", "Makeup"], ["Beauty", "Skin"]]`` -> ``["Beauty", "Makeup", "Skin"]``; a flat list or a
    comma-separated string also works."""
    if value is None:
        return []
    if isinstance(value, str):
        return _unique(value.split(","))
    flat: list[Any] = []
    for entry in value:
        if isinstance(entry, (list, tuple)):
            flat.extend(entry)
        else:
            flat.append(entry)
    return _unique(flat)


# ----------------------------------------------------------------------------------------------------------------
# Finding files


@dataclass(frozen=True)
class _Layout:
    """Which file names play which role for a format. ``roles`` maps a role to glob patterns; the first role is the
    interaction file(s) and is required. An explicit file matching no other role is taken as an interaction file."""

    roles: dict[str, tuple[str, ...]]

    @property
    def main(self) -> str:
        return next(iter(self.roles))


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _locate(paths: Sequence[Path], layout: _Layout) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {role: [] for role in layout.roles}
    other_roles = list(layout.roles)[1:]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        if path.is_dir():
            names = sorted(child.name for child in path.iterdir() if child.is_file())
            claimed: set[str] = set()
            for role in other_roles:
                for name in names:
                    if _matches(name, layout.roles[role]):
                        found[role].append(path / name)
                        claimed.add(name)
            for name in names:
                if name not in claimed and _matches(name, layout.roles[layout.main]):
                    found[layout.main].append(path / name)
        else:
            role = next((r for r in other_roles if _matches(path.name, layout.roles[r])), layout.main)
            found[role].append(path)
    if not found[layout.main]:
        wanted = " or ".join(layout.roles[layout.main])
        listings = []
        for path in paths:
            names = sorted(c.name for c in path.iterdir()) if path.is_dir() else [path.name]
            listings.append(f"{path} ({', '.join(names[:20]) + (' ...' if len(names) > 20 else '') or 'empty'})")
        raise FileNotFoundError(f"no interaction file ({wanted}) in: {'; '.join(listings)}")
    return found


def _one(found: dict[str, list[Path]], role: str) -> Path | None:
    """The single file of an optional role (e.g. metadata); more than one is ambiguous."""
    files = found.get(role, [])
    if len(files) > 1:
        raise ValueError(f"more than one {role} file: {', '.join(str(f) for f in files)}; pass the one to use")
    return files[0] if files else None


# ----------------------------------------------------------------------------------------------------------------
# The registry and the entry point

Reader = Callable[[list[Path], _Ctx], tuple[_Table, "_Items | None"]]
READERS: Registry[Reader] = Registry("reader")
GENERIC_FORMATS = ("csv", "jsonl", "parquet")
# What each format reads, one line for `p5rec data list` (a test checks every registered reader has one).
FORMAT_FILES = {
    "amazon2014": "reviews_<Category>[_5].json[.gz], optional meta_<Category>.json[.gz]",
    "amazon2018": "<Category>[_5].json[.gz], optional meta_<Category>.json[.gz]",
    "amazon2023": "<Category>.jsonl[.gz], optional meta_<Category>.jsonl[.gz]",
    "movielens100k": "u.data, optional u.item and u.genre",
    "movielens1m": "ratings.dat, optional movies.dat",
    "movielens-latest": "ratings.csv, optional movies.csv",
    "yelp": "review.json (or yelp_academic_dataset_review.json), optional business.json",
    "p5seq": "P5's sequential_data.txt, optional datamaps.json",
    "recbole": "RecBole atomic files: <name>.inter, optional <name>.item (tab-separated, name:type header)",
    "csv": "delimited text with a header, any extension (--delimiter, else comma/tab/;/| detected); --columns",
    "jsonl": "one JSON object per line; --columns",
    "parquet": "Parquet files or a folder of shards; --columns",
}
COLUMN_FORMATS = (*GENERIC_FORMATS, "recbole")  # the formats that take columns=
DELIMITED_FORMATS = ("csv", "recbole")  # the formats that take delimiter=


def read(
    fmt: str,
    paths: Sequence[str | Path] | str | Path,
    *,
    on_error: str = "raise",
    columns: Mapping[str, str] | None = None,
    delimiter: str | None = None,
) -> ReadResult:
    """Read ``paths`` (files and/or directories) with the reader registered as ``fmt``.

    ``on_error``: ``"raise"`` stops at the first malformed line with a ``DataFormatError``; ``"skip"`` leaves such
    lines out, counts them in ``counts["malformed"]`` (metadata lines in ``counts["meta_malformed"]``) and logs a
    warning. ``columns`` (generic formats only) maps canonical names to source column names, e.g.
    ``{"user": "uid", "item": "iid", "rating": "score", "timestamp": "ts"}`` (``recbole`` too: field names for
    files that do not use RecBole's standard ones). ``delimiter`` (``csv``, ``recbole``): one character that
    separates fields (default: detected for ``csv``, a tab for ``recbole``).
    Raises ``FileNotFoundError`` for a missing file, ``DataFormatError`` when nothing could be read.
    """
    reader = READERS.get(fmt)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if columns is not None and fmt not in COLUMN_FORMATS:
        raise ValueError(f"columns= applies to the generic formats and recbole "
                         f"({', '.join(COLUMN_FORMATS)}), not {fmt!r}")
    if delimiter is not None:
        if fmt not in DELIMITED_FORMATS:
            raise ValueError(f"a delimiter applies to the formats {', '.join(DELIMITED_FORMATS)}, not {fmt!r}")
        if len(delimiter) != 1 or delimiter in "\r\n\"":
            raise ValueError(f"a delimiter is one character other than a quote or line break, got {delimiter!r}")
    path_list = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not path_list:
        raise ValueError("no paths given")
    ctx = _Ctx(on_error=on_error, columns=columns, delimiter=delimiter)
    table, items = reader(path_list, ctx)
    sources = [str(p) for p in ctx.sources]
    if fmt in COLUMN_FORMATS:  # the formats where a column mapping (or a column's name) decides the rating
        _check_rating_column(ctx, sources)
    if ctx.counts.get("malformed") or ctx.counts.get("meta_malformed"):
        logger.warning(
            "skipped %d malformed interaction line(s) and %d malformed metadata line(s) in %s; first: %s",
            ctx.counts.get("malformed", 0),
            ctx.counts.get("meta_malformed", 0),
            ", ".join(sources),
            "; ".join(ctx.examples),
        )
    if len(table) == 0:
        raise DataFormatError(
            f"{', '.join(sources)} held no interactions ({ctx.counts['read']} lines read, "
            f"{ctx.counts['malformed']} malformed)",
            path=sources[0] if sources else None,
        )
    interactions = table.dataset()
    ctx.counts["interactions"] = len(interactions)
    items_ds = None
    if items is not None:
        items_ds = items.dataset()
        ctx.counts["items"] = len(items_ds)
        if items.duplicates:
            ctx.counts["meta_duplicates"] = items.duplicates
    logger.info("read %d interactions (%s) from %s", len(interactions), fmt, ", ".join(sources))
    return ReadResult(interactions=interactions, items=items_ds, source=sources, counts=dict(ctx.counts))


def _check_rating_column(ctx: _Ctx, sources: Sequence[str]) -> None:
    """Refuse a source column most of whose values are not ratings (with ``on_error="skip"`` they would all be
    skipped one by one): that is a column mapping that points ``rating`` at the wrong column, and the message
    names it. Scattered bad ratings stay per-line problems."""
    read_lines = ctx.counts.get("read", 0)
    for column, n in ctx.rating_rejects.items():
        if n * 2 > read_lines:
            mapped = ctx.columns is not None and ctx.columns.get("rating") == column
            how = f"column {column!r}, mapped to 'rating' by columns=," if mapped else f"column {column!r}"
            low, high = RATING_RANGE
            raise DataFormatError(
                f"{', '.join(sources)}: {how} does not hold ratings: {n} of {read_lines} lines have a value that is not "
                f"a finite number in [{low:g}, {high:g}] (first: {ctx.rating_examples[column]}); map 'rating' to "
                "the star-rating column, or leave it out for implicit feedback",
                path=sources[0] if sources else None,
            )


# ----------------------------------------------------------------------------------------------------------------
# Amazon review data (McAuley et al.): 2014, 2018 and 2023 releases


def _amazon_reviews_v1(ctx: _Ctx, path: Path, table: _Table) -> None:
    """2014 and 2018 review lines: reviewerID, asin, reviewerName, reviewText, overall, summary, unixReviewTime."""

    def parse(line: str) -> tuple:
        record = _json_object(line)
        return (
            _req_id(record, "reviewerID"),
            _req_id(record, "asin"),
            _req_rating(record, "overall"),
            _int_field(record.get("unixReviewTime"), "unixReviewTime"),
            _opt_str(record, "reviewText"),
            _opt_str(record, "summary"),
            _opt_str(record, "reviewerName"),
        )

    for row in ctx.lines(path, parse):
        table.add(*row)


def _amazon_meta(ctx: _Ctx, path: Path, items: _Items, *, literal: bool, item_key: str, brand_key: str,
                 categories_key: str) -> None:
    def parse(line: str) -> tuple:
        record = _literal_object(line) if literal else _json_object(line)
        return (
            _req_id(record, item_key),
            _opt_str(record, "title"),
            _opt_str(record, brand_key),
            _flatten_categories(record.get(categories_key)),
        )

    for row in ctx.lines(path, parse, meta=True):
        items.add(*row)


@READERS.register("amazon2014")
def _read_amazon2014(paths: list[Path], ctx: _Ctx) -> tuple[_Table, _Items | None]:
    """``reviews_<Category>[_5].json[.gz]`` plus optional ``meta_<Category>.json[.gz]`` (Python-literal lines)."""
    found = _locate(paths, _Layout({"reviews": ("reviews_*.json", "reviews_*.json.gz"),
                                    "meta": ("meta_*.json", "meta_*.json.gz")}))
    table = _Table()
    for path in found["reviews"]:
        _amazon_reviews_v1(ctx, path, table)
    meta = _one(found, "meta")
    if meta is None:
        return table, None
    items = _Items()
    _amazon_meta(ctx, meta, items, literal=True, item_key="asin", brand_key="brand", categories_key="categories")
    return table, items


@READERS.register("amazon2018")
def _read_amazon2018(paths: list[Path], ctx: _Ctx) -> tuple[_Table, _Items | None]:
    """``<Category>[_5].json[.gz]`` (vote/style/image ignored) plus optional ``meta_<Category>.json[.gz]``
    (JSON lines: asin, title, brand, category)."""
    found = _locate(paths, _Layout({"reviews": ("*.json", "*.json.gz"),
                                    "meta": ("meta_*.json", "meta_*.json.gz")}))
    table = _Table()
    for path in found["reviews"]:
        _amazon_reviews_v1(ctx, path, table)
    meta = _one(found, "meta")
    if meta is None:
        return table, None
    items = _Items()
    _amazon_meta(ctx, meta, items, literal=False, item_key="asin", brand_key="brand", categories_key="category")
    return table, items


@READERS.register("amazon2023")
def _read_amazon2023(paths: list[Path], ctx: _Ctx) -> tuple[_Table, _Items | None]:
    """``<Category>.jsonl[.gz]``: user_id, parent_asin (item; else asin), rating, title (-> summary), text
    (-> review), timestamp in milliseconds (-> seconds). Optional ``meta_<Category>.jsonl[.gz]``: parent_asin,
    title, store (-> brand), categories."""
    found = _locate(paths, _Layout({"reviews": ("*.jsonl", "*.jsonl.gz", "*.json", "*.json.gz"),
                                    "meta": ("meta_*.jsonl", "meta_*.jsonl.gz", "meta_*.json", "meta_*.json.gz")}))

    def parse(line: str) -> tuple:
        record = _json_object(line)
        item_key = "parent_asin" if record.get("parent_asin") not in (None, "") else "asin"
        if record.get(item_key) in (None, ""):
            raise _Bad("missing field 'parent_asin' (and no 'asin')")
        return (
            _req_id(record, "user_id"),
            _req_id(record, item_key),
            _req_rating(record, "rating"),
            _int_field(record.get("timestamp"), "timestamp") // 1000,
            _opt_str(record, "text"),
            _opt_str(record, "title"),
            "",
        )

    table = _Table()
    for path in found["reviews"]:
        for row in ctx.lines(path, parse):
            table.add(*row)
    meta = _one(found, "meta")
    if meta is None:
        return table, None
    items = _Items()
    _amazon_meta(ctx, meta, items, literal=False, item_key="parent_asin", brand_key="store",
                 categories_key="categories")
    return table, items


# ----------------------------------------------------------------------------------------------------------------
# MovieLens (GroupLens)

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


def _split_fields(line: str, sep: str, n: int, names: str) -> list[str]:
    fields = line.split(sep)
    if len(fields) != n:
        raise _Bad(f"expected {n} {sep!r}-separated fields ({names}), found {len(fields)}")
    return fields


def _rated_row(fields: Sequence[str]) -> tuple:
    user, item, rating, timestamp = (f.strip() for f in fields)
    if not user or not item:
        raise _Bad("missing field 'user'" if not user else "missing field 'item'")
    if not rating:
        raise _Bad("missing field 'rating'")
    return user, item, _rating(rating, "rating"), _int_field(timestamp, "timestamp")


@READERS.register("movielens100k")
def _read_movielens100k(paths: list[Path], ctx: _Ctx) -> tuple[_Table, _Items | None]:
    """``u.data`` (tab: user item rating timestamp); optional ``u.item`` (pipe-separated, latin-1: id, title, dates,
    url, 19 genre flags) and ``u.genre`` (genre names; else the fixed ML-100K list)."""
    found = _locate(paths, _Layout({"ratings": ("u.data",), "movies": ("u.item",), "genres": ("u.genre",)}))
    table = _Table()
    for path in found["ratings"]:
        for row in ctx.lines(path, lambda line: _rated_row(
                _split_fields(line, "\t", 4, "user item rating timestamp"))):
            table.add(*row)
    movies = _one(found, "movies")
    if movies is None:
        return table, None
    genres = list(ML100K_GENRES)
    genre_file = _one(found, "genres")
    if genre_file is not None:
        named = []
        with open(genre_file, encoding="latin-1") as handle:
            for line in handle:
                if line.strip():
                    named.append(line.strip().rsplit("|", 1)[0])
        genres = named
        ctx.sources.append(genre_file)

    def parse(line: str) -> tuple:
        fields = line.split("|")
        if len(fields) < 5 + len(genres):
            raise _Bad(f"expected {5 + len(genres)} '|'-separated fields (id, title, dates, url, "
                       f"{len(genres)} genre flags), found {len(fields)}")
        if not fields[0].strip():
            raise _Bad("missing field 'movie id'")
        flags = fields[5:5 + len(genres)]
        return fields[0].strip(), fields[1], "", [g for g, flag in zip(genres, flags) if flag.strip() == "1"]

    items = _Items()
    for row in ctx.lines(movies, parse, encoding="latin-1", meta=True):
        items.add(*row)
    return table, items


def _movies_dat_row(line: str) -> tuple:
    fields = _split_fields(line, "::", 3, "id title genres")
    if not fields[0].strip():
        raise _Bad("missing field 'movie id'")
    return fields[0].strip(), fields[1], "", _unique(fields[2].split("|"))


@READERS.register("movielens1m")
def _read_movielens1m(paths: list[Path], ctx: _Ctx) -> tuple[_Table, _Items | None]:
    """``ratings.dat`` (``user::movie::rating::timestamp``); optional ``movies.dat`` (latin-1,
    ``id::title::genre|genre``)."""
    found = _locate(paths, _Layout({"ratings": ("ratings.dat",), "movies": ("movies.dat",)}))
    table = _Table()
    for path in found["ratings"]:
        for row in ctx.lines(path, lambda line: _rated_row(
                _split_fields(line, "::", 4, "user item rating timestamp"))):
            table.add(*row)
    movies = _one(found, "movies")
    if movies is None:
        return table, None
    items = _Items()
    for row in ctx.lines(movies, _movies_dat_row, encoding="latin-1", meta=True):
        items.add(*row)
    return table, items


def _csv_rows(path: Path, ctx: _Ctx, *, delimiter: str = ",") -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header of a CSV file and an iterator of (line number, row) for the rest; blank rows are dropped."""
    lines = _decoded_lines(path, "utf-8")
    reader = csv.reader(lines, delimiter=delimiter)
    ctx.sources.append(path)
    try:
        header = next(reader)
    except StopIteration:
        raise DataFormatError(f"{path} is empty (expected a header line)", path=path) from None

    def rows() -> Iterator[tuple[int, list[str]]]:
        try:
            for row in reader:
                if row and any(cell.strip() for cell in row):
                    yield reader.line_num, row
        except csv.Error as exc:
            raise DataFormatError(f"{path} line {reader.line_num}: unreadable CSV ({exc})", path=path,
                                  line=reader.line_num) from None
        finally:
            lines.close()

    return [h.strip() for h in header], rows()


def _header_index(path: Path, header: list[str], wanted: Sequence[str]) -> list[int]:
    missing = [name for name in wanted if name not in header]
    if missing:
        raise DataFormatError(
            f"{path} line 1: missing column(s) {', '.join(map(repr, missing))}; "
            f"available columns: {', '.join(header)}",
            path=path,
            line=1,
        )
    return [header.index(name) for name in wanted]


@READERS.register("movielens-latest")
def _read_movielens_latest(paths: list[Path], ctx: _Ctx) -> tuple[_Table, _Items | None]:
    """``ratings.csv`` (header userId,movieId,rating,timestamp); optional ``movies.csv`` (movieId,title,genres)."""
    found = _locate(paths, _Layout({"ratings": ("ratings.csv",), "movies": ("movies.csv",)}))
    table = _Table()
    for path in found["ratings"]:
        header, rows = _csv_rows(path, ctx)
        index = _header_index(path, header, ("userId", "movieId", "rating", "timestamp"))
        width = max(index) + 1

        def parse(row: list[str]) -> tuple:
            if len(row) < width:
                raise _Bad(f"expected {len(header)} comma-separated fields, found {len(row)}")
            return _rated_row([row[i] for i in index])

        for row in ctx.records(path, rows, parse):
            table.add(*row)
    movies = _one(found, "movies")
    if movies is None:
        return table, None
    header, rows = _csv_rows(movies, ctx)
    index = _header_index(movies, header, ("movieId", "title", "genres"))

    def parse_movie(row: list[str]) -> tuple:
        if len(row) <= max(index):
            raise _Bad(f"expected {len(header)} comma-separated fields, found {len(row)}")
        movie, title, genres = (row[i] for i in index)
        if not movie.strip():
            raise _Bad("missing field 'movieId'")
        names = [] if genres.strip() == "(no genres listed)" else _unique(genres.split("|"))
        return movie.strip(), title, "", names

    items = _Items()
    for row in ctx.records(movies, rows, parse_movie, meta=True):
        items.add(*row)
    return table, items


# ----------------------------------------------------------------------------------------------------------------
# Yelp Open Dataset


@READERS.register("yelp")
def _read_yelp(paths: list[Path], ctx: _Ctx) -> tuple[_Table, _Items | None]:
    """``review.json`` / ``yelp_academic_dataset_review.json`` (user_id, business_id, stars, text, date
    ``YYYY-MM-DD HH:MM:SS``, taken as UTC); optional ``business.json`` (business_id, name -> title, categories
    ``"A, B"`` -> list)."""
    found = _locate(paths, _Layout({
        "reviews": ("review.json", "review.json.gz", "*_review.json", "*_review.json.gz"),
        "business": ("business.json", "business.json.gz", "*_business.json", "*_business.json.gz"),
    }))

    def parse(line: str) -> tuple:
        record = _json_object(line)
        return (
            _req_id(record, "user_id"),
            _req_id(record, "business_id"),
            _req_rating(record, "stars"),
            _epoch(record.get("date"), "date"),
            _opt_str(record, "text"),
            "",
            "",
        )

    table = _Table()
    for path in found["reviews"]:
        for row in ctx.lines(path, parse):
            table.add(*row)
    business = _one(found, "business")
    if business is None:
        return table, None

    def parse_business(line: str) -> tuple:
        record = _json_object(line)
        return _req_id(record, "business_id"), _opt_str(record, "name"), "", _flatten_categories(
            record.get("categories"))

    items = _Items()
    for row in ctx.lines(business, parse_business, meta=True):
        items.add(*row)
    return table, items


# ----------------------------------------------------------------------------------------------------------------
# P5's own sequence files


@READERS.register("p5seq")
def _read_p5seq(paths: list[Path], ctx: _Ctx) -> tuple[_Table, _Items | None]:
    """P5's ``sequential_data.txt`` (``user item item ...`` per line, items in time order) and optional
    ``datamaps.json`` (``id2user``, ``id2item``) mapping the numbers back to raw ids. Timestamp = position in the
    user's line (0, 1, 2, ...); rating NaN (implicit). Without datamaps the numbers are kept as strings."""
    found = _locate(paths, _Layout({"sequences": ("sequential_data.txt",), "datamaps": ("datamaps.json",)}))
    id2user: dict[str, str] | None = None
    id2item: dict[str, str] | None = None
    maps = _one(found, "datamaps")
    if maps is not None:
        try:
            with open(maps, encoding="utf-8") as handle:
                datamaps = json.load(handle)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{maps} line {exc.lineno}: not valid JSON ({exc.msg})", path=maps,
                                  line=exc.lineno) from None
        if not isinstance(datamaps, dict) or not all(
                isinstance(datamaps.get(key), dict) for key in ("id2user", "id2item")):
            raise DataFormatError(f"{maps}: expected a JSON object with 'id2user' and 'id2item' maps", path=maps)
        id2user, id2item = datamaps["id2user"], datamaps["id2item"]
        ctx.sources.append(maps)

    def parse(line: str) -> tuple[str, list[str]]:
        numbers = line.split()
        if len(numbers) < 2:
            raise _Bad("expected a user id followed by at least one item id")
        user, items = numbers[0], numbers[1:]
        if id2user is not None:
            if user not in id2user:
                raise _Bad(f"user id {user!r} is not in datamaps.json id2user")
            user = id2user[user]
        if id2item is not None:
            try:
                items = [id2item[i] for i in items]
            except KeyError as exc:
                raise _Bad(f"item id {exc.args[0]!r} is not in datamaps.json id2item") from None
        return user, items

    table = _Table()
    columns = table.columns
    first_line: dict[str, tuple[Path, int]] = {}  # user -> where their sequence was listed
    for path in found["sequences"]:
        # Whole columns at once: 200k rows this way take a fraction of a second.
        for lineno, (user, items) in ctx.numbered_lines(path, parse):
            where = first_line.setdefault(user, (path, lineno))
            if where != (path, lineno):
                # A second line for a user would be interleaved with the first (timestamps restart at 0) into
                # one sequence that never happened; which line is right cannot be told, so the file is refused.
                lines = f"lines {where[1]} and {lineno}" if where[0] == path else \
                    f"{where[0]} line {where[1]} and {path} line {lineno}"
                ctx.bad(path, lineno, f"user {user!r} is listed twice ({lines}); a P5 sequence file has one line "
                        "per user")
                continue
            n = len(items)
            columns["user"].extend([user] * n)
            columns["item"].extend(items)
            columns["rating"].extend([math.nan] * n)
            columns["timestamp"].extend(range(n))
            for name in ("review", "summary", "user_name"):
                columns[name].extend([""] * n)
    return table, None


# ----------------------------------------------------------------------------------------------------------------
# Generic tables with a column mapping

_OPTIONAL_COLUMNS = ("rating", "timestamp", "review", "summary", "user_name")


def _mapping(columns: Mapping[str, str] | None, available: Sequence[str] | None, path: Path) -> dict[str, str]:
    """canonical -> source column. ``None`` means the source already uses canonical names (optional ones only if
    present). An explicitly mapped column that the source lacks is an error naming it."""
    if columns is None:
        if available is None:  # keyed records (jsonl): take whichever canonical keys a line has
            mapping = {c: c for c in INTERACTION_COLUMNS}
        else:
            mapping = {"user": "user", "item": "item"}
            mapping.update({c: c for c in _OPTIONAL_COLUMNS if c in available})
        explicit = {"user", "item"}
    else:
        unknown = [k for k in columns if k not in INTERACTION_COLUMNS]
        if unknown:
            raise ValueError(
                f"unknown canonical column(s) {unknown} in columns=; known: {', '.join(INTERACTION_COLUMNS)}")
        mapping = dict(columns)
        explicit = set(mapping)
    for required in ("user", "item"):
        if required not in mapping:
            raise ValueError(f"columns= must map {required!r} to a source column")
    if available is not None:
        missing = [f"{mapping[c]!r} (for {c!r})" for c in mapping if c in explicit and mapping[c] not in available]
        if missing:
            # a header that did not split shows as one column holding the separator: quote it so the tabs show
            shown = ", ".join(repr(str(a)) if any(d in str(a) for d in DELIMITERS[1:]) else str(a)
                              for a in available)
            hint = ""
            if len(available) == 1:
                inner = [d for d in DELIMITERS if d in str(available[0])]
                if inner:
                    hint = (f" (the header was read as one column; its fields look separated by {inner[0]!r}: "
                            f"pass --delimiter {inner[0]!r})")
            raise DataFormatError(f"{path}: column {', '.join(missing)} not found; available columns: {shown}{hint}",
                                  path=path)
    return mapping


def _generic_row(record: Mapping[str, Any], mapping: Mapping[str, str]) -> tuple:
    """One canonical row from a record keyed by source column names."""
    values = []
    for canonical in ("user", "item"):
        value = record.get(mapping[canonical])
        if value is None or (isinstance(value, str) and not value.strip()) or (
                isinstance(value, float) and math.isnan(value)):
            raise _Bad(f"missing field {mapping[canonical]!r} (for {canonical!r})")
        values.append(_id_str(value).strip() if isinstance(value, str) else _id_str(value))
    rating_key = mapping.get("rating")
    rating = math.nan if rating_key is None else _opt_rating(record.get(rating_key), rating_key,
                                                              canonical=rating_key == "rating")
    ts_key = mapping.get("timestamp")
    timestamp = 0 if ts_key is None else _epoch(record.get(ts_key), ts_key)
    texts = []
    for canonical in ("review", "summary", "user_name"):
        key = mapping.get(canonical)
        texts.append("" if key is None else _opt_str(record, key))
    return (*values, rating, timestamp, *texts)


# Field separators the generic table reader recognises in a header line, most likely first.
DELIMITERS = (",", "\t", ";", "|")


def _sniff_delimiter(path: Path) -> str:
    """The separator of a delimited file, from its header line: whichever of :data:`DELIMITERS` occurs most
    often in it (a comma when none does: a one-column file). A header is names, which rarely hold separators,
    so counting is enough; ``--delimiter`` settles any doubt."""
    header = ""
    for _, raw in _raw_lines(path):
        header = raw.decode("utf-8", errors="replace")
        if header.strip():
            break
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])  # ties go to the earlier (more common) separator
    return best if counts[best] else ","


@READERS.register("csv")
def _read_csv(paths: list[Path], ctx: _Ctx) -> tuple[_Table, _Items | None]:
    """Delimited text files with a header, any extension; ``columns`` maps canonical names to header names. The
    separator is ``delimiter=`` if given, a tab for ``.tsv``, else detected from the header line
    (:func:`_sniff_delimiter`: comma, tab, semicolon or pipe)."""
    found = _locate(paths, _Layout({"tables": ("*.csv", "*.csv.gz", "*.tsv", "*.tsv.gz")}))
    table = _Table()
    for path in found["tables"]:
        delimiter = ctx.delimiter or ("\t" if ".tsv" in path.suffixes else _sniff_delimiter(path))
        if ctx.delimiter is None and delimiter != ",":
            logger.info("%s: fields separated by %r (detected from the header; --delimiter to set it)", path,
                        delimiter)
        header, rows = _csv_rows(path, ctx, delimiter=delimiter)
        mapping = _mapping(ctx.columns, header, path)
        position = {name: i for i, name in reversed(list(enumerate(header)))}

        def parse(row: list[str], mapping: dict[str, str] = mapping) -> tuple:
            if len(row) != len(header):
                raise _Bad(f"expected {len(header)} fields (as in the header), found {len(row)}")
            return _generic_row({name: row[i] for name, i in position.items()}, mapping)

        for row in ctx.records(path, rows, parse):
            table.add(*row)
    return table, None


@READERS.register("jsonl")
def _read_jsonl(paths: list[Path], ctx: _Ctx) -> tuple[_Table, _Items | None]:
    """One JSON object per line; ``columns`` maps canonical names to keys. A line lacking the user or item key is
    malformed; an optional mapped key that no line has is an error listing the keys seen."""
    found = _locate(paths, _Layout({"tables": ("*.jsonl", "*.jsonl.gz", "*.json", "*.json.gz", "*.ndjson")}))
    mapping = _mapping(ctx.columns, None, found["tables"][0])
    seen_keys: dict[str, None] = {}

    def parse(line: str) -> tuple:
        record = _json_object(line)
        for key in record:
            seen_keys.setdefault(key, None)
        try:
            return _generic_row(record, mapping)
        except _Bad as exc:
            if str(exc).startswith("missing field"):
                raise _Bad(f"{exc}; fields present: {', '.join(record)}") from None
            raise

    table = _Table()
    for path in found["tables"]:
        for row in ctx.lines(path, parse):
            table.add(*row)
    if ctx.columns is not None and seen_keys:
        never = [f"{src!r} (for {c!r})" for c, src in mapping.items() if src not in seen_keys]
        if never:
            raise DataFormatError(
                f"{', '.join(str(p) for p in found['tables'])}: column {', '.join(never)} not found in any line; "
                f"available columns: {', '.join(seen_keys)}",
                path=found["tables"][0],
            )
    return table, None


@READERS.register("parquet")
def _read_parquet(paths: list[Path], ctx: _Ctx) -> tuple[_Table, _Items | None]:
    """Parquet files (a directory of shards is read in name order); ``columns`` maps canonical names to columns.
    Errors name the 1-based row."""
    import pyarrow.parquet as pq

    found = _locate(paths, _Layout({"tables": ("*.parquet", "*.parq")}))
    table = _Table()
    for path in found["tables"]:
        ctx.sources.append(path)
        try:
            names = pq.ParquetFile(path).schema_arrow.names
        except (pa.ArrowException, OSError) as exc:
            raise DataFormatError(f"{path}: not a readable Parquet file ({exc})", path=path) from None
        mapping = _mapping(ctx.columns, names, path)
        needed = list(dict.fromkeys(mapping.values()))
        try:
            arrow = pq.read_table(path, columns=needed)
        except (pa.ArrowException, OSError) as exc:
            raise DataFormatError(f"{path}: corrupt Parquet data ({exc})", path=path) from None
        data = {name: arrow.column(name).to_pylist() for name in needed}
        rows = ((i + 1, {name: data[name][i] for name in needed}) for i in range(arrow.num_rows))
        for row in ctx.records(path, rows, lambda record: _generic_row(record, mapping), unit="row"):
            table.add(*row)
    return table, None


# ----------------------------------------------------------------------------------------------------------------
# RecBole's atomic files

RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
# RecBole's standard field names (its dataset configs' USER_ID_FIELD, ITEM_ID_FIELD, RATING_FIELD, TIME_FIELD, and
# the fields of the atomic files it distributes), first present one wins; ``columns=`` names any other.
RECBOLE_FIELDS = {
    "user": ("user_id",),
    "item": ("item_id", "business_id"),
    "rating": ("rating", "stars"),
    "timestamp": ("timestamp", "date"),
    "review": ("review", "text", "review_text"),
    "summary": ("summary",),
}
RECBOLE_ITEM_FIELDS = {  # .item fields -> the item table: ML-100K, Amazon, Yelp conversions
    "title": ("title", "movie_title", "item_name", "business_name", "name"),
    "categories": ("categories", "class", "genre", "genres"),
    "brand": ("brand",),
}
_RECBOLE_SPLITS = (".train.inter", ".valid.inter", ".test.inter")


def _recbole_header(path: Path, line: str, delimiter: str) -> list[tuple[str, str]]:
    """``user_id:token\titem_id:token ...`` -> [(name, type)]; a field without a known type, or a name given twice,
    is a DataFormatError naming it."""
    fields = []
    for column, raw in enumerate(line.split(delimiter), start=1):
        name, sep, kind = raw.strip().rpartition(":")
        if not sep or not name or kind not in RECBOLE_TYPES:
            raise DataFormatError(
                f"{path} line 1, field {column}: {raw.strip()!r} is not name:type with type one of "
                f"{', '.join(RECBOLE_TYPES)} (a RecBole atomic file starts with such a header)", path=path, line=1)
        if name in (f[0] for f in fields):
            raise DataFormatError(f"{path} line 1: field {name!r} is named twice", path=path, line=1)
        fields.append((name, kind))
    return fields


def _recbole_records(path: Path, ctx: _Ctx, delimiter: str, *, meta: bool = False
                     ) -> tuple[list[tuple[str, str]], Iterator[tuple[int, list[str]]]]:
    """The header of an atomic file and an iterator of (line number, fields) for its records. A record with another
    number of fields than the header is reported by the caller's ``ctx.records``; blank lines are skipped."""
    lines = ctx.numbered_lines(path, str, meta=meta)
    first = next(lines, None)
    if first is None:
        raise DataFormatError(f"{path} is empty (expected a header line of name:type fields)", path=path)
    key = "meta_read" if meta else "read"
    ctx.counts[key] -= 1  # the header is not a record
    header = _recbole_header(path, first[1], delimiter)
    return header, ((lineno, line.split(delimiter)) for lineno, line in lines)


def _parsed(ctx: _Ctx, path: Path, records: Iterable[tuple[int, list[str]]], parse: Callable[[list[str]], T], *,
            meta: bool = False) -> Iterator[T]:
    """``parse`` over records already counted as read; a record whose parse raises ``_Bad`` is reported."""
    for lineno, fields in records:
        try:
            yield parse(fields)
        except _Bad as exc:
            ctx.bad(path, lineno, exc, meta=meta)


def _recbole_fields(path: Path, header: list[tuple[str, str]], columns: Mapping[str, str] | None) -> dict[str, str]:
    """canonical -> field name of an .inter file: ``columns`` (names with or without their ``:type``) or
    RecBole's standard names (:data:`RECBOLE_FIELDS`)."""
    names = [name for name, _ in header]
    if columns is not None:
        unknown = [k for k in columns if k not in INTERACTION_COLUMNS]
        if unknown:
            raise ValueError(
                f"unknown canonical column(s) {unknown} in columns=; known: {', '.join(INTERACTION_COLUMNS)}")
        mapping = {c: (v.rpartition(":")[0] if v not in names and ":" in v else v) for c, v in columns.items()}
        missing = [f"{v!r} (for {c!r})" for c, v in mapping.items() if v not in names]
        if missing:
            raise DataFormatError(f"{path} line 1: field {', '.join(missing)} not found; fields: "
                                  f"{', '.join(f'{n}:{t}' for n, t in header)}", path=path, line=1)
    else:
        mapping = {}
    for canonical, candidates in RECBOLE_FIELDS.items():
        if canonical not in mapping:
            found = next((name for name in candidates if name in names), None)
            if found is not None:
                mapping[canonical] = found
    for required in ("user", "item"):
        if required not in mapping:
            raise DataFormatError(
                f"{path} line 1: no {required} field (RecBole's standard name is "
                f"{RECBOLE_FIELDS[required][0]}:token); fields: {', '.join(f'{n}:{t}' for n, t in header)}; "
                f"name it with --columns {required}=<field>", path=path, line=1)
    return mapping


def _token_seq(value: str) -> list[str]:
    """A ``token_seq`` of categories: RecBole separates tokens by spaces (ML-100K's ``class``: ``Action Comedy``);
    its Amazon conversions write ``'Beauty', 'Skin Care'``, which is split at the commas, quotes dropped."""
    if "," in value:
        return _unique(part.strip().strip("[]").strip().strip("'\"") for part in value.split(","))
    return _unique(value.split())


def _recbole_sibling(inter: Path) -> Path | None:
    """``ml-100k.item`` beside ``ml-100k.inter`` (or beside the benchmark split ``ml-100k.train.inter``)."""
    stem = inter.name.removesuffix(".inter")
    for split in _RECBOLE_SPLITS:
        if inter.name.endswith(split):
            stem = inter.name.removesuffix(split)
    candidate = inter.with_name(stem + ".item")
    return candidate if candidate.is_file() else None


@READERS.register("recbole")
def _read_recbole(paths: list[Path], ctx: _Ctx) -> tuple[_Table, _Items | None]:
    """RecBole's atomic files: ``<name>.inter`` (tab-separated, a ``name:type`` header; RecBole's standard
    fields user_id, item_id, rating, timestamp are found by name, others need ``columns=``) and the optional
    ``<name>.item`` (title, categories, brand: the fields of :data:`RECBOLE_ITEM_FIELDS`; ML-100K's
    movie_title/class, Amazon's title/categories/brand). The item file is found beside an ``.inter`` file given
    alone. Benchmark splits (``<name>.train.inter``, ``.valid.inter``, ``.test.inter``) are read together as
    one log. ``.user``, ``.kg``, ``.link`` and ``.net`` files hold nothing p5rec uses: they are named in the log."""
    found = _locate(paths, _Layout({"inter": ("*.inter",), "items": ("*.item",),
                                    "unused": ("*.user", "*.kg", "*.link", "*.net")}))
    delimiter = ctx.delimiter or "\t"
    inter_files = found["inter"]
    whole = [p for p in inter_files if not p.name.endswith(_RECBOLE_SPLITS)]
    if whole and len(whole) < len(inter_files):
        raise ValueError(f"both a whole interaction file and benchmark split files: "
                         f"{', '.join(str(p) for p in inter_files)}; pass the one(s) to read")
    if found["unused"]:
        logger.info("not read (p5rec uses interactions and item metadata only): %s",
                    ", ".join(str(p) for p in found["unused"]))
    table = _Table()
    item_field = None
    for path in inter_files:
        header, records = _recbole_records(path, ctx, delimiter)
        mapping = _recbole_fields(path, header, ctx.columns)
        if item_field not in (None, mapping["item"]):
            raise DataFormatError(f"{path}: the item field is {mapping['item']!r}, in another file "
                                  f"{item_field!r}", path=path)
        item_field = mapping["item"]
        names = [name for name, _ in header]
        width = len(names)

        def parse(fields: list[str], mapping: dict[str, str] = mapping) -> tuple:
            if len(fields) != width:
                raise _Bad(f"expected {width} {delimiter!r}-separated fields (as in the header), found {len(fields)}")
            return _generic_row(dict(zip(names, fields)), mapping)

        for row in _parsed(ctx, path, records, parse):
            table.add(*row)
    item_file = _one(found, "items")
    if item_file is None and all(not p.is_dir() for p in paths):
        siblings = {s for s in (_recbole_sibling(p) for p in inter_files) if s is not None}
        if len(siblings) == 1:
            item_file = siblings.pop()
            logger.info("item metadata: %s (beside %s)", item_file, inter_files[0].name)
    if item_file is None:
        return table, None
    header, records = _recbole_records(item_file, ctx, delimiter, meta=True)
    names = [name for name, _ in header]
    if item_field not in names:
        raise DataFormatError(f"{item_file} line 1: no {item_field!r} field, the item field of the interactions; "
                              f"fields: {', '.join(f'{n}:{t}' for n, t in header)}", path=item_file, line=1)
    position = {role: next((names.index(n) for n in candidates if n in names), None)
                for role, candidates in RECBOLE_ITEM_FIELDS.items()}
    logger.info("%s: %s", item_file.name, ", ".join(
        f"{role} <- {names[i]}" if i is not None else f"no {role}" for role, i in position.items()))
    key = names.index(item_field)

    def parse_item(fields: list[str]) -> tuple:
        if len(fields) != len(names):
            raise _Bad(f"expected {len(names)} {delimiter!r}-separated fields (as in the header), found {len(fields)}")
        item = fields[key].strip()
        if not item:
            raise _Bad(f"missing field {item_field!r}")
        title, cats, brand = (position[r] for r in ("title", "categories", "brand"))
        return (item, "" if title is None else fields[title].strip(), "" if brand is None else fields[brand].strip(),
                [] if cats is None else _token_seq(fields[cats]))

    items = _Items()
    for row in _parsed(ctx, item_file, records, parse_item, meta=True):
        items.add(*row)
    return table, items


# ----------------------------------------------------------------------------------------------------------------
# Guessing a format from file names

_BY_NAME = (
    ("sequential_data.txt", "p5seq"),
    ("datamaps.json", "p5seq"),
    ("u.data", "movielens100k"),
    ("ratings.dat", "movielens1m"),
    ("ratings.csv", "movielens-latest"),
    ("review.json", "yelp"),
    ("review.json.gz", "yelp"),
    ("*_review.json", "yelp"),
    ("*_review.json.gz", "yelp"),
    ("reviews_*.json", "amazon2014"),
    ("reviews_*.json.gz", "amazon2014"),
    ("*.inter", "recbole"),
)


def _peek_json(path: Path) -> str | None:
    """Guess an Amazon/Yelp release from the keys of the first line of a JSON-lines file."""
    try:
        with _open_text(path, "utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        record = json.loads(first)
    except (OSError, UnicodeDecodeError, EOFError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    if "parent_asin" in record or ("user_id" in record and "asin" in record):
        return "amazon2023"
    if "reviewerID" in record:
        return "amazon2014" if path.name.startswith("reviews_") else "amazon2018"
    if "business_id" in record and "stars" in record:
        return "yelp"
    return "jsonl"


def _detect_file(path: Path) -> str | None:
    name = path.name
    for pattern, fmt in _BY_NAME:
        if fnmatch.fnmatchcase(name, pattern):
            return fmt
    if name.startswith("meta_"):
        return None
    if _matches(name, ("*.json", "*.json.gz", "*.jsonl", "*.jsonl.gz", "*.ndjson")):
        return _peek_json(path) if path.is_file() else ("jsonl" if ".jsonl" in name else None)
    if _matches(name, ("*.csv", "*.csv.gz", "*.tsv", "*.tsv.gz")):
        return "csv"
    if _matches(name, ("*.parquet", "*.parq")):
        return "parquet"
    return None


def detect_format(path: str | Path) -> str | None:
    """Guess the reader for ``path`` (a file or a directory) from file names, peeking at the first line of an
    ambiguous JSON file. ``None`` when nothing is recognised."""
    path = Path(path)
    if not path.is_dir():
        return _detect_file(path)
    children = sorted(child for child in path.iterdir() if child.is_file())
    names = {child.name for child in children}
    for pattern, fmt in _BY_NAME:  # the specific names first, in priority order
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            return fmt
    guesses = [g for g in (_detect_file(child) for child in children) if g is not None]
    for fmt in ("amazon2023", "amazon2018", "amazon2014", "yelp", "parquet", "csv", "jsonl"):
        if fmt in guesses:
            return fmt
    return None
