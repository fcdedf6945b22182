"""Named datasets: where their files are, how to fetch them, and proof of what was read.

``data/registry.yaml`` (shipped in the repository; ``P5REC_REGISTRY`` or ``registry=`` may point at another file)
lists each dataset's reader format, files, download URLs and sha256 checksums. ``resolve`` turns a name (or a
path) into local files, looking in this order and stopping at the first hit:

1. an existing path given directly (format guessed from file names unless ``fmt=`` says);
2. ``$P5REC_DATA/<name>/`` (or ``data_dir=``) holding the files: the user's own downloads;
3. the file embedded in the repository's ``data/`` directory (the default dataset, usable with no network);
4. the cache, ``$P5REC_CACHE/<name>/`` (or ``cache_dir=``, default ``~/.cache/p5rec``);
5. a download into the cache: streamed to a temporary file, checked against the sha256 when the registry knows it,
   and only then moved into place, so the cache never holds a partial or wrong file. Zip archives are extracted
   into the cache next to the archive.

Every file p5rec fetched is verified on every use. A file the registry pins (``sha256:``) must have that checksum.
For one it does not pin, the checksum of the first download is trusted (trust on first use): it is saved beside
the file as ``<file>.sha256`` (``sha256sum`` format, so ``sha256sum -c`` checks it too) and every later use from
the cache must match it, so a file that changed in the cache, on disk or by a later download, is refused rather
than silently read. Files in ``$P5REC_DATA`` are the user's own and only warn when they differ from a pin.

Datasets that cannot be downloaded (Yelp's terms, P5's Google Drive folder) carry ``manual`` instructions, which the
error repeats together with the directory to put the files in.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm.auto import tqdm

import p5rec
from p5rec import atomic
from p5rec.data import readers

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ENTRY_KEYS = {"name", "description", "format", "files", "license", "homepage", "citation", "embedded", "manual"}
_FILE_KEYS = {"name", "url", "sha256", "unpack", "optional"}
RECORD_SUFFIX = ".sha256"  # beside a downloaded file the registry does not pin: the checksum of its first download


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset as the registry lists it."""

    name: str  # file name as stored (in the data dir, the cache, or embedded)
    url: str | None = None  # None: no direct link (manual download)
    sha256: str | None = None  # None: not recorded; a download then logs the checksum it got
    unpack: str | None = None  # for an archive: the directory it extracts to, which the reader is given
    optional: bool = False  # the reader works without it (e.g. item metadata)


@dataclass(frozen=True)
class DatasetEntry:
    """One named dataset of the registry."""

    name: str
    format: str
    files: tuple[FileSpec, ...]
    description: str = ""
    license: str = ""
    homepage: str = ""
    citation: str = ""
    embedded: str | None = None  # a file in the repository's data/ directory
    manual: str | None = None  # how to obtain the files by hand; set when they cannot be downloaded

    @property
    def downloadable(self) -> bool:
        return self.manual is None and all(spec.url for spec in self.files if not spec.optional)


@dataclass
class Resolved:
    """Local files for a dataset, ready for ``readers.read(format, paths)``."""

    name: str
    format: str
    paths: list[Path]  # what to hand the reader: files, or the directory an archive extracted to
    sha256: dict[str, str]  # file name (or "dir/file" inside an extracted directory) -> sha256
    origin: str = ""  # "path", "data_dir", "embedded", "cache" or "download"


class ChecksumError(ValueError):
    """A file's sha256 is not the one the registry records."""


class DatasetNotAvailable(FileNotFoundError):
    """A dataset's files are not present locally and cannot be downloaded (disabled, manual, or failed)."""


# ----------------------------------------------------------------------------------------------------------------
# The registry file


def default_registry_path() -> Path:
    """``$P5REC_REGISTRY`` if set, else ``data/registry.yaml`` beside the package in the repository."""
    override = os.environ.get("P5REC_REGISTRY")
    if override:
        return Path(override).expanduser()
    return repo_data_dir() / "registry.yaml"


def repo_data_dir() -> Path:
    """The repository's ``data/`` directory: the registry and the embedded default dataset live there."""
    return Path(p5rec.__file__).resolve().parent.parent / "data"


def load_registry(path: str | Path | None = None) -> dict[str, DatasetEntry]:
    """Parse and check a registry YAML (``{"datasets": [entry, ...]}``); names are unique, formats are registered
    readers, checksums are 64 hex digits. Unknown keys only warn, so newer registries load in older code."""
    path = Path(path) if path is not None else default_registry_path()
    if not path.is_file():
        raise FileNotFoundError(f"dataset registry not found: {path}")
    with open(path, encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    if not isinstance(document, dict) or not isinstance(document.get("datasets"), list):
        raise ValueError(f"{path}: expected a mapping with a 'datasets' list")
    entries: dict[str, DatasetEntry] = {}
    for number, raw in enumerate(document["datasets"], start=1):
        entry = _parse_entry(raw, f"{path} dataset #{number}")
        if entry.name in entries:
            raise ValueError(f"{path}: dataset {entry.name!r} is listed twice")
        entries[entry.name] = entry
    return entries


def _parse_entry(raw: object, where: str) -> DatasetEntry:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, found {type(raw).__name__}")
    for key in ("name", "format", "files"):
        if not raw.get(key):
            raise ValueError(f"{where}: missing {key!r}")
    where = f"{where} ({raw['name']})"
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        logger.warning("%s: ignoring unknown key(s) %s", where, ", ".join(sorted(unknown)))
    if raw["format"] not in readers.READERS:
        raise ValueError(f"{where}: unknown format {raw['format']!r}; known: {', '.join(readers.READERS.names())}")
    if not isinstance(raw["files"], list):
        raise ValueError(f"{where}: 'files' must be a list")
    files = []
    for spec in raw["files"]:
        if not isinstance(spec, dict) or not spec.get("name"):
            raise ValueError(f"{where}: each file needs a 'name', found {spec!r}")
        unknown = set(spec) - _FILE_KEYS
        if unknown:
            logger.warning("%s: file %s: ignoring unknown key(s) %s", where, spec["name"], ", ".join(sorted(unknown)))
        digest = spec.get("sha256")
        if digest is not None and not _SHA256.match(str(digest).lower()):
            raise ValueError(f"{where}: file {spec['name']}: sha256 must be 64 hex digits, found {digest!r}")
        files.append(FileSpec(
            name=str(spec["name"]),
            url=spec.get("url") or None,
            sha256=str(digest).lower() if digest else None,
            unpack=spec.get("unpack") or None,
            optional=bool(spec.get("optional", False)),
        ))
    return DatasetEntry(
        name=str(raw["name"]),
        format=str(raw["format"]),
        files=tuple(files),
        description=str(raw.get("description") or "").strip(),
        license=str(raw.get("license") or "").strip(),
        homepage=str(raw.get("homepage") or "").strip(),
        citation=str(raw.get("citation") or "").strip(),
        embedded=raw.get("embedded") or None,
        manual=str(raw["manual"]).strip() if raw.get("manual") else None,
    )


def list_datasets(registry: str | Path | None = None) -> list[DatasetEntry]:
    """The registry's datasets in file order (for ``p5rec data list``)."""
    return list(load_registry(registry).values())


# ----------------------------------------------------------------------------------------------------------------
# Checksums


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_tree(directory: Path) -> dict[str, str]:
    return {
        f"{directory.name}/{child.relative_to(directory).as_posix()}": sha256_file(child)
        for child in sorted(directory.rglob("*"))
        if child.is_file()
    }


# ----------------------------------------------------------------------------------------------------------------
# Resolution


def resolve(
    name_or_path: str | Path,
    *,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    download: bool = True,
    registry: str | Path | None = None,
    fmt: str | None = None,
) -> Resolved:
    """Local files for a registered dataset name or an existing path (see the module docstring for the order).

    ``data_dir`` defaults to ``$P5REC_DATA``; ``cache_dir`` to ``$P5REC_CACHE`` or ``~/.cache/p5rec``; both hold one
    sub-directory per dataset name. ``fmt`` overrides the registry's (or the guessed) reader format.
    Raises ``DatasetNotAvailable`` (a ``FileNotFoundError``) when the files are absent and cannot be downloaded,
    saying where to put them; ``ChecksumError`` when a cached, embedded or downloaded file has the wrong sha256.
    """
    candidate = Path(name_or_path).expanduser()
    if candidate.exists():
        return _resolve_path(candidate, fmt)
    entries = load_registry(registry)
    name = str(name_or_path)
    if name not in entries:
        raise DatasetNotAvailable(
            f"{name!r} is neither an existing path nor a registered dataset; known datasets: "
            f"{', '.join(entries) or '(none)'}"
        )
    entry = entries[name]
    fmt = fmt or entry.format

    data_root = data_dir if data_dir is not None else os.environ.get("P5REC_DATA")
    cache_root = Path(cache_dir if cache_dir is not None else os.environ.get("P5REC_CACHE") or "~/.cache/p5rec")
    cache = cache_root.expanduser() / entry.name
    looked: list[str] = []

    if data_root:
        user_dir = Path(data_root).expanduser() / entry.name
        looked.append(str(user_dir))
        if _holds(user_dir, entry):
            paths, hashes = _collect(user_dir, entry, extract_to=cache)
            _check(entry, hashes, strict=False, where=user_dir)
            return Resolved(entry.name, fmt, paths, hashes, origin="data_dir")

    if entry.embedded:
        embedded = repo_data_dir() / entry.embedded
        looked.append(str(embedded))
        if embedded.is_file():
            hashes = {embedded.name: sha256_file(embedded)}
            _check(entry, hashes, strict=True, where=embedded.parent)
            return Resolved(entry.name, fmt, [embedded], hashes, origin="embedded")

    looked.append(str(cache))
    if _holds(cache, entry):
        paths, hashes = _collect(cache, entry, extract_to=cache)
        _check(entry, hashes, strict=True, where=cache)
        _check_recorded(entry, hashes, cache)
        return Resolved(entry.name, fmt, paths, hashes, origin="cache")

    target = Path(data_root).expanduser() / entry.name if data_root else Path("$P5REC_DATA") / entry.name
    needed = ", ".join(spec.name + (f" (or its extracted {spec.unpack}/)" if spec.unpack else "")
                       for spec in entry.files if not spec.optional)
    if entry.manual:
        raise DatasetNotAvailable(
            f"dataset {entry.name!r} must be downloaded by hand (looked in: {', '.join(looked)}). {entry.manual} "
            f"Files needed: {needed} in {target}."
        )
    if not download:
        raise DatasetNotAvailable(
            f"dataset {entry.name!r} is not available locally and download is off (looked in: "
            f"{', '.join(looked)}). Put {needed} into {target} (or {cache}), or allow the download."
        )
    if not entry.downloadable:
        raise DatasetNotAvailable(
            f"dataset {entry.name!r} has no download URL; put {needed} into {target} (or {cache})."
        )
    for spec in entry.files:
        if spec.url is None or (cache / spec.name).is_file() or (spec.unpack and (cache / spec.unpack).is_dir()):
            continue
        _download(spec.url, cache / spec.name, spec.sha256)
    paths, hashes = _collect(cache, entry, extract_to=cache)
    _check(entry, hashes, strict=True, where=cache)
    _check_recorded(entry, hashes, cache)
    return Resolved(entry.name, fmt, paths, hashes, origin="download")


def _resolve_path(path: Path, fmt: str | None) -> Resolved:
    fmt = fmt or readers.detect_format(path)
    if fmt is None:
        raise ValueError(
            f"cannot tell the format of {path} from its file names; name it (one of: "
            f"{', '.join(readers.READERS.names())})"
        )
    hashes = _hash_tree(path) if path.is_dir() else {path.name: sha256_file(path)}
    name = path.name if path.is_dir() else path.name.split(".")[0]
    return Resolved(name, fmt, [path], hashes, origin="path")


def _holds(directory: Path, entry: DatasetEntry) -> bool:
    """Whether ``directory`` has every required file (an archive counts if present or already extracted)."""
    if not directory.is_dir():
        return False
    for spec in entry.files:
        present = (directory / spec.name).is_file() or bool(spec.unpack and (directory / spec.unpack).is_dir())
        if not present and not spec.optional:
            return False
    return True


def _collect(directory: Path, entry: DatasetEntry, *, extract_to: Path) -> tuple[list[Path], dict[str, str]]:
    """Reader paths and checksums for the files of ``entry`` in ``directory``; archives not yet extracted are
    extracted into ``extract_to``."""
    paths: list[Path] = []
    hashes: dict[str, str] = {}
    for spec in entry.files:
        file = directory / spec.name
        if spec.unpack:
            unpacked = directory / spec.unpack
            if not unpacked.is_dir() and (extract_to / spec.unpack).is_dir():
                unpacked = extract_to / spec.unpack  # extracted from this archive before
            if not unpacked.is_dir():
                if not file.is_file():
                    continue  # optional and absent
                unpacked = _extract(file, extract_to, spec.unpack)
            paths.append(unpacked)
            hashes.update({spec.name: sha256_file(file)} if file.is_file() else _hash_tree(unpacked))
        elif file.is_file():
            paths.append(file)
            hashes[spec.name] = sha256_file(file)
    return paths, hashes


def _check(entry: DatasetEntry, hashes: dict[str, str], *, strict: bool, where: Path) -> None:
    """Compare checksums with the registry. Files we placed (cache, embedded) must match; a user's own copy that
    differs only warns, since it may be a re-packed or newer release of the same data."""
    for spec in entry.files:
        got = hashes.get(spec.name)
        if spec.sha256 is None or got is None or got == spec.sha256:
            continue
        message = f"{where / spec.name}: sha256 expected {spec.sha256}, got {got}"
        if strict:
            raise ChecksumError(f"{message}; delete the file to fetch it again")
        logger.warning("%s (a different release of %s?)", message, entry.name)


def record_path(file: Path) -> Path:
    """Where the trusted-on-first-use checksum of a downloaded ``file`` is kept: ``<file>.sha256`` beside it."""
    file = Path(file)
    return file.with_name(file.name + RECORD_SUFFIX)


def read_record(file: Path) -> str | None:
    """The sha256 recorded for ``file`` (None if there is no record); ``ChecksumError`` if the record is not one."""
    record = record_path(file)
    if not record.is_file():
        return None
    digest = record.read_text(encoding="utf-8").split(maxsplit=1)[0].lower() if record.stat().st_size else ""
    if not _SHA256.match(digest):
        raise ChecksumError(f"{record}: not a sha256 record; delete it and {file} to download the file again")
    return digest


def write_record(file: Path, digest: str) -> Path:
    """Record ``digest`` as the trusted checksum of ``file`` (atomically, ``sha256sum`` format)."""
    return atomic.write_text(record_path(file), f"{digest}  {Path(file).name}\n")


def _check_recorded(entry: DatasetEntry, hashes: dict[str, str], cache: Path) -> None:
    """Trust on first use for the files of ``entry`` in the cache that the registry does not pin: the checksum
    recorded at the first download must match; a cached file with no record yet (fetched by hand, or by a p5rec
    before records existed) gets one now."""
    for spec in entry.files:
        got = hashes.get(spec.name)
        file = cache / spec.name
        if spec.sha256 is not None or got is None or not file.is_file():
            continue
        recorded = read_record(file)
        if recorded is None:
            write_record(file, got)
            logger.warning("%s has no sha256 in the registry; trusting it on first use and recording %s in %s",
                           file, got, record_path(file))
        elif recorded != got:
            raise ChecksumError(f"{file}: sha256 {got} differs from {recorded}, recorded at its first download in "
                                f"{record_path(file)}; delete both files to download it again")


def _download(url: str, dest: Path, expected: str | None) -> Path:
    """Stream ``url`` to ``dest`` through a temporary file in the same directory; verify ``expected`` sha256 (or,
    without one, a checksum recorded by an earlier download) and the announced length before the file takes its
    final name. Without ``expected``, the checksum is recorded beside the file (trust on first use) before the file
    is moved into place. On any failure nothing but an earlier record is left behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    digest = hashlib.sha256()
    logger.info("downloading %s -> %s", url, dest)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=None, leave=False) as bar:
                received = 0
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                    received += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if total is not None and received != total:
            raise DatasetNotAvailable(f"download of {url} stopped after {received} of {total} bytes; nothing was kept")
        got = digest.hexdigest()
        if expected is not None and got != expected:
            raise ChecksumError(f"download of {url}: sha256 expected {expected}, got {got}; nothing was kept")
        if expected is None:
            recorded = read_record(dest)
            if recorded is not None and recorded != got:
                raise ChecksumError(f"download of {url}: sha256 {got} differs from {recorded}, recorded at the first "
                                    f"download in {record_path(dest)}; nothing was kept")
            write_record(dest, got)  # before the file: a file in the cache always has its record
        os.replace(temporary, dest)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        _remove_if_empty(dest.parent)
        if isinstance(exc, (urllib.error.URLError, OSError)) and not isinstance(exc, ChecksumError):
            raise DatasetNotAvailable(
                f"could not download {url} ({exc}); download it by hand and put it at {dest}"
            ) from exc
        raise
    if expected is None:
        logger.warning("%s has no sha256 in the registry; trusting this first download, sha256 %s (recorded in %s)",
                       dest.name, got, record_path(dest))
    return dest


def _extract(archive: Path, into: Path, unpack: str) -> Path:
    """Extract ``archive`` (zip) into ``into`` and return ``into/unpack``. Extraction goes to a temporary
    directory first so a half-extracted tree is never mistaken for a complete one; members escaping the target
    (absolute paths, ``..``) are refused."""
    into.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".extract-", dir=into))
    try:
        with zipfile.ZipFile(archive) as bundle:
            root = workdir.resolve()
            for member in bundle.namelist():
                if not (workdir / member).resolve().is_relative_to(root):
                    raise ValueError(f"{archive}: refusing member {member!r} outside the extraction directory")
            bundle.extractall(workdir)
        extracted = workdir / unpack
        if not extracted.is_dir():
            top = sorted({Path(n).parts[0] for n in zipfile.ZipFile(archive).namelist() if Path(n).parts})
            raise ValueError(f"{archive}: expected a top-level directory {unpack!r}, found {top}")
        target = into / unpack
        os.replace(extracted, target)
        logger.info("extracted %s -> %s", archive, target)
        return target
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass
