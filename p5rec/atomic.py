"""Writing outputs so that a crash never leaves a half-written one under the final name.

Every file or directory p5rec produces is first written under a temporary sibling name (same directory, so the
last step is a rename within one filesystem) and then takes its final name with one rename, which POSIX makes
atomic: whoever looks, a reader or the next run after a SIGKILL, finds the old output or the new one, never a
mixture and never a truncated file. A killed process may leave its hidden temporary sibling behind
(``.<name>.<random>.tmp``); it never sits under the target's name, and :func:`stale_siblings` finds it.

Temporary names are created with ``os.open(..., O_EXCL)`` / ``os.mkdir`` rather than ``tempfile``, so they get the
usual permissions (0666/0777 less the umask) instead of ``tempfile``'s private 0600/0700, which the final file would
otherwise keep.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


def temporary_sibling(target: Path, tag: str = "tmp") -> Path:
    """An unused hidden name beside ``target``: ``.<target name>.<random hex>.<tag>`` (not created)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}.{tag}")


def stale_siblings(target: Path) -> list[Path]:
    """Siblings of ``target`` that a process killed while writing left behind: ``.<name>.<hex>.tmp`` (a
    replacement being built) or ``.<name>.<hex>.old`` (the previous output, killed between the two renames of
    :func:`replace_dir`). Only names: whether their writer is still alive is not known here, so callers report
    them and never delete them."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}."
    return sorted(p for p in target.parent.iterdir()
                  if p.name.startswith(prefix) and p.name[len(prefix) + 8:] in (TMP_SUFFIX, ".old"))


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary sibling, flushed and fsync'ed, then ``os.replace``.

    The parent directory must exist (``FileNotFoundError`` otherwise). On any error the temporary file is removed
    and ``path`` is untouched. Returns ``path``.
    """
    path = Path(path)
    temporary = temporary_sibling(path, TMP_SUFFIX.lstrip("."))
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """:func:`write_bytes` for text."""
    return write_bytes(path, text.encode(encoding))


def copy_file(source: Path, dest: Path) -> Path:
    """Copy ``source`` to ``dest`` atomically (content only, as ``shutil.copyfile``)."""
    return write_bytes(dest, Path(source).read_bytes())


def make_temporary_dir(target: Path) -> Path:
    """Create and return an empty hidden sibling directory of ``target`` to build a replacement in (the parent
    is created if needed). Fill it, then hand it to :func:`replace_dir`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = temporary_sibling(target, TMP_SUFFIX.lstrip("."))
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:  # 32 random bits collided; draw again
            continue


def replace_dir(new: Path, target: Path) -> None:
    """Give the finished directory ``new`` the name ``target``.

    An existing ``target`` (the caller has decided it may go) is first renamed aside, and deleted only once
    ``new`` is in place; if the second rename fails, the old one is put back. Between the two renames (two
    syscalls) ``target`` is briefly absent, never half-written.
    """
    new, target = Path(new), Path(target)
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = temporary_sibling(target, "old")
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
