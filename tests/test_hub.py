"""Dataset resolution: registry parsing, the lookup order, and real downloads from a local HTTP server."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import pytest
import yaml

from p5rec.data import hub, readers
from p5rec.data.hub import ChecksumError, DatasetNotAvailable, resolve

REVIEWS = [
    {"reviewerID": "U1", "asin": "A1", "overall": 5.0, "unixReviewTime": 10, "summary": "s"},
    {"reviewerID": "U2", "asin": "A1", "overall": 4.0, "unixReviewTime": 20, "summary": "t"},
]


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch):
    """No test sees the developer's data, cache or registry overrides."""
    for name in ("P5REC_DATA", "P5REC_CACHE", "P5REC_REGISTRY"):
        monkeypatch.delenv(name, raising=False)


def gz_bytes(records: list[dict]) -> bytes:
    return gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode(), mtime=0)


def ml100k_zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("ml-100k/u.data", "1\t10\t4\t100\n2\t10\t3\t200\n")
        bundle.writestr("ml-100k/README", "tiny\n")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """A real HTTP server on 127.0.0.1 serving one directory, for download tests."""

    def __init__(self, root: Path) -> None:
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Quiet, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    running = Server(root)
    running.root = root
    try:
        yield running
    finally:
        running.stop()


def write_registry(path: Path, entries: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"datasets": entries}, sort_keys=False))
    return path


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


# --- The shipped registry ----------------------------------------------------------------------------------------


def test_shipped_registry():
    entries = hub.load_registry()
    assert list(entries) == [
        "amazon2014-musical-instruments", "amazon2014-beauty", "amazon2014-sports", "amazon2014-toys",
        "movielens-100k", "movielens-1m", "yelp", "p5-beauty"]
    mi = entries["amazon2014-musical-instruments"]
    assert mi.embedded == "reviews_Musical_Instruments_5.json.gz" and mi.format == "amazon2014"
    assert mi.files[0].sha256 == "03f9cc27ae13a454cb4ea6cb620fb10546cc1194ef921441d1c5f34addff2748"
    assert entries["amazon2014-toys"].files[0].url.endswith("/reviews_Toys_and_Games_5.json.gz")
    assert entries["movielens-100k"].files[0].unpack == "ml-100k"
    assert not entries["yelp"].downloadable and "yelp.com/dataset" in entries["yelp"].manual
    beauty = entries["p5-beauty"]
    assert beauty.format == "p5seq" and not beauty.downloadable and "jeykigung/P5" in beauty.manual
    assert {f.name: f.sha256 for f in beauty.files} == {
        "sequential_data.txt": "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
        "datamaps.json": "c3386147637538f6d97f7eafffeb4e7180daa0638875bc1d889bbee45ce241a8",
    }
    assert all(e.license and e.homepage and e.citation for e in entries.values())
    assert [e.name for e in hub.list_datasets()] == list(entries)
    # every download goes over https; a null sha256 means trust on first use (tested below)
    assert all(f.url.startswith("https://") for e in entries.values() for f in e.files if f.url)


def test_registry_checks(tmp_path):
    good = {"name": "x", "format": "amazon2014", "files": [{"name": "reviews_x.json", "url": None}]}
    with pytest.raises(ValueError, match="listed twice"):
        hub.load_registry(write_registry(tmp_path / "r.yaml", [good, good]))
    with pytest.raises(ValueError, match="unknown format 'amazon1999'"):
        hub.load_registry(write_registry(tmp_path / "r.yaml", [{**good, "format": "amazon1999"}]))
    with pytest.raises(ValueError, match="sha256 must be 64 hex digits"):
        hub.load_registry(write_registry(tmp_path / "r.yaml", [{**good, "files": [{"name": "a", "sha256": "ab"}]}]))
    with pytest.raises(ValueError, match="missing 'files'"):
        hub.load_registry(write_registry(tmp_path / "r.yaml", [{"name": "x", "format": "csv"}]))


# --- Lookup order --------------------------------------------------------------------------------------------------


def test_embedded_default_needs_no_network(tmp_path):
    resolved = resolve("amazon2014-musical-instruments", cache_dir=tmp_path / "cache", download=False)
    assert resolved.origin == "embedded" and resolved.format == "amazon2014"
    assert resolved.paths == [hub.repo_data_dir() / "reviews_Musical_Instruments_5.json.gz"]
    assert resolved.sha256 == {
        "reviews_Musical_Instruments_5.json.gz": "03f9cc27ae13a454cb4ea6cb620fb10546cc1194ef921441d1c5f34addff2748"}
    assert not (tmp_path / "cache").exists()


def test_explicit_path_and_data_dir_come_first(tmp_path, monkeypatch):
    data = gz_bytes(REVIEWS)
    registry = write_registry(tmp_path / "r.yaml", [{
        "name": "tiny", "format": "amazon2014",
        "files": [{"name": "reviews_Tiny_5.json.gz", "url": "http://127.0.0.1:9/never", "sha256": sha(data)}],
    }])
    own = tmp_path / "mine" / "tiny"
    own.mkdir(parents=True)
    (own / "reviews_Tiny_5.json.gz").write_bytes(data)
    monkeypatch.setenv("P5REC_DATA", str(tmp_path / "mine"))
    resolved = resolve("tiny", registry=registry, cache_dir=tmp_path / "cache")
    assert resolved.origin == "data_dir" and resolved.paths == [own / "reviews_Tiny_5.json.gz"]
    assert resolved.sha256 == {"reviews_Tiny_5.json.gz": sha(data)}
    assert len(readers.read(resolved.format, resolved.paths).interactions) == 2

    by_path = resolve(own / "reviews_Tiny_5.json.gz", registry=registry)
    assert (by_path.origin, by_path.format, by_path.name) == ("path", "amazon2014", "reviews_Tiny_5")
    with pytest.raises(ValueError, match="cannot tell the format"):
        resolve(tmp_path / "r.yaml")
    assert resolve(tmp_path / "r.yaml", fmt="csv").format == "csv"
    with pytest.raises(DatasetNotAvailable, match="neither an existing path nor a registered dataset; known"):
        resolve("no-such-dataset", registry=registry)


def test_unavailable_datasets_say_where_files_go(tmp_path):
    with pytest.raises(DatasetNotAvailable) as info:
        resolve("p5-beauty", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "jeykigung/P5" in message and str(tmp_path / "data" / "p5-beauty") in message
    assert "sequential_data.txt" in message
    with pytest.raises(DatasetNotAvailable, match="download is off.*ml-1m.zip"):
        resolve("movielens-1m", cache_dir=tmp_path / "cache", download=False)
    assert not (tmp_path / "cache").exists()


# --- Downloads from a real local server ----------------------------------------------------------------------------


def test_download_verifies_then_uses_cache(tmp_path, server, monkeypatch):
    data = gz_bytes(REVIEWS)
    (server.root / "reviews_Tiny_5.json.gz").write_bytes(data)
    entry = {"name": "tiny", "format": "amazon2014",
             "files": [{"name": "reviews_Tiny_5.json.gz", "url": f"{server.url}/reviews_Tiny_5.json.gz",
                        "sha256": sha(data)}]}
    monkeypatch.setenv("P5REC_REGISTRY", str(write_registry(tmp_path / "r.yaml", [entry])))
    cache = tmp_path / "cache"

    resolved = resolve("tiny", cache_dir=cache)
    assert resolved.origin == "download"
    assert resolved.paths == [cache / "tiny" / "reviews_Tiny_5.json.gz"]
    assert resolved.paths[0].read_bytes() == data
    assert hub.sha256_file(resolved.paths[0]) == sha(data) == resolved.sha256["reviews_Tiny_5.json.gz"]
    assert files_under(cache) == resolved.paths  # no temporary file left behind
    assert readers.read(resolved.format, resolved.paths).interactions["user"] == ["U1", "U2"]

    server.stop()  # the second resolve must not touch the network
    again = resolve("tiny", cache_dir=cache)
    assert again.origin == "cache" and again.paths == resolved.paths and again.sha256 == resolved.sha256

    # A cached file that no longer matches its checksum is refused, not silently used.
    resolved.paths[0].write_bytes(b"corrupt")
    with pytest.raises(ChecksumError, match="expected .* got"):
        resolve("tiny", cache_dir=cache)


def test_download_with_wrong_checksum_keeps_nothing(tmp_path, server):
    data = gz_bytes(REVIEWS)
    (server.root / "reviews_Tiny_5.json.gz").write_bytes(data)
    wrong = "0" * 64
    registry = write_registry(tmp_path / "r.yaml", [{
        "name": "tiny", "format": "amazon2014",
        "files": [{"name": "reviews_Tiny_5.json.gz", "url": f"{server.url}/reviews_Tiny_5.json.gz",
                   "sha256": wrong}]}])
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError) as info:
        resolve("tiny", registry=registry, cache_dir=cache)
    assert wrong in str(info.value) and sha(data) in str(info.value)
    assert files_under(cache) == []


def test_download_failure_names_url(tmp_path, server):
    registry = write_registry(tmp_path / "r.yaml", [{
        "name": "tiny", "format": "amazon2014",
        "files": [{"name": "reviews_Tiny_5.json.gz", "url": f"{server.url}/missing.json.gz", "sha256": None}]}])
    with pytest.raises(DatasetNotAvailable, match="could not download .*missing.json.gz"):
        resolve("tiny", registry=registry, cache_dir=tmp_path / "cache")
    assert files_under(tmp_path / "cache") == []


def test_zip_archive_is_downloaded_and_extracted(tmp_path, server):
    archive = ml100k_zip_bytes()
    (server.root / "ml-100k.zip").write_bytes(archive)
    registry = write_registry(tmp_path / "r.yaml", [{
        "name": "ml", "format": "movielens100k",
        "files": [{"name": "ml-100k.zip", "url": f"{server.url}/ml-100k.zip", "sha256": None,
                   "unpack": "ml-100k"}]}])
    cache = tmp_path / "cache"
    resolved = resolve("ml", registry=registry, cache_dir=cache)
    assert resolved.origin == "download"
    assert resolved.paths == [cache / "ml" / "ml-100k"]
    assert resolved.sha256 == {"ml-100k.zip": sha(archive)}
    # the archive, what it extracted to, and the checksum of this first download (the registry pins none)
    assert [p.name for p in files_under(cache)] == ["README", "u.data", "ml-100k.zip", "ml-100k.zip.sha256"]
    result = readers.read(resolved.format, resolved.paths)
    assert result.interactions["user"] == ["1", "2"] and result.interactions["rating"] == [4.0, 3.0]

    server.stop()
    assert resolve("ml", registry=registry, cache_dir=cache).origin == "cache"


def test_archive_in_data_dir_is_extracted_into_cache(tmp_path):
    archive = ml100k_zip_bytes()
    registry = write_registry(tmp_path / "r.yaml", [{
        "name": "ml", "format": "movielens100k",
        "files": [{"name": "ml-100k.zip", "url": None, "sha256": sha(archive), "unpack": "ml-100k"}]}])
    own = tmp_path / "mine" / "ml"
    own.mkdir(parents=True)
    (own / "ml-100k.zip").write_bytes(archive)
    resolved = resolve("ml", registry=registry, data_dir=tmp_path / "mine", cache_dir=tmp_path / "cache")
    assert resolved.origin == "data_dir"
    assert resolved.paths == [tmp_path / "cache" / "ml" / "ml-100k"]  # the user's directory stays untouched
    assert sorted(p.name for p in own.iterdir()) == ["ml-100k.zip"]
    again = resolve("ml", registry=registry, data_dir=tmp_path / "mine", cache_dir=tmp_path / "cache")
    assert again.paths == resolved.paths and again.sha256 == {"ml-100k.zip": sha(archive)}


# --- Trust on first use (files the registry does not pin) ------------------------------------------------------------


def test_first_download_is_recorded_and_every_later_use_checked(tmp_path, server):
    data = gz_bytes(REVIEWS)
    (server.root / "reviews_Tiny_5.json.gz").write_bytes(data)
    registry = write_registry(tmp_path / "r.yaml", [{
        "name": "tiny", "format": "amazon2014",
        "files": [{"name": "reviews_Tiny_5.json.gz", "url": f"{server.url}/reviews_Tiny_5.json.gz", "sha256": None}]}])
    cache = tmp_path / "cache"
    resolved = resolve("tiny", registry=registry, cache_dir=cache)
    file = resolved.paths[0]
    record = hub.record_path(file)
    assert record == cache / "tiny" / "reviews_Tiny_5.json.gz.sha256"
    assert record.read_text() == f"{sha(data)}  reviews_Tiny_5.json.gz\n"  # sha256sum -c reads it
    assert files_under(cache) == [file, record]  # no temporary file left behind

    server.stop()  # later uses come from the cache, checked against the record
    assert resolve("tiny", registry=registry, cache_dir=cache).origin == "cache"
    changed = gz_bytes(REVIEWS[:1])
    file.write_bytes(changed)
    with pytest.raises(ChecksumError) as info:
        resolve("tiny", registry=registry, cache_dir=cache)
    message = str(info.value)
    assert "\n" not in message and str(file) in message and sha(data) in message and sha(changed) in message
    assert file.read_bytes() == changed and record.read_text().startswith(sha(data))  # nothing silently replaced


def test_a_new_download_must_match_the_first(tmp_path, server):
    """The file on the server changed since the first download: the new copy is refused and nothing is kept."""
    first, later = gz_bytes(REVIEWS), gz_bytes(REVIEWS[:1])
    (server.root / "reviews_Tiny_5.json.gz").write_bytes(first)
    registry = write_registry(tmp_path / "r.yaml", [{
        "name": "tiny", "format": "amazon2014",
        "files": [{"name": "reviews_Tiny_5.json.gz", "url": f"{server.url}/reviews_Tiny_5.json.gz", "sha256": None}]}])
    cache = tmp_path / "cache"
    file = resolve("tiny", registry=registry, cache_dir=cache).paths[0]
    file.unlink()  # the cached copy is gone, its record stays
    (server.root / "reviews_Tiny_5.json.gz").write_bytes(later)
    with pytest.raises(ChecksumError, match=f"{sha(later)} differs from {sha(first)}"):
        resolve("tiny", registry=registry, cache_dir=cache)
    assert files_under(cache) == [hub.record_path(file)]


def test_cached_file_without_record_is_recorded_on_first_use(tmp_path):
    """A file put into the cache by hand, or by a p5rec before records existed, is trusted once, then checked."""
    data = gz_bytes(REVIEWS)
    registry = write_registry(tmp_path / "r.yaml", [{
        "name": "tiny", "format": "amazon2014",
        "files": [{"name": "reviews_Tiny_5.json.gz", "url": "http://127.0.0.1:9/never", "sha256": None}]}])
    cache = tmp_path / "cache"
    file = cache / "tiny" / "reviews_Tiny_5.json.gz"
    file.parent.mkdir(parents=True)
    file.write_bytes(data)
    assert resolve("tiny", registry=registry, cache_dir=cache).origin == "cache"
    assert hub.read_record(file) == sha(data)
    file.write_bytes(b"corrupt")
    with pytest.raises(ChecksumError, match="recorded at its first download"):
        resolve("tiny", registry=registry, cache_dir=cache)
    hub.record_path(file).write_text("not a checksum\n")
    with pytest.raises(ChecksumError, match="not a sha256 record"):
        resolve("tiny", registry=registry, cache_dir=cache)
