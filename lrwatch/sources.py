"""Where logs live: a local folder, or any URL fsspec understands (s3://, gs://, hf://, memory://).

Local paths stay ``pathlib.Path`` (today's speed, native file events). A URL becomes a
``UPath`` (universal_pathlib: the pathlib API over fsspec, from ``lrwatch[s3]``/``[gcs]``),
so the code that lists runs and files reads both the same way; the few things pathlib
cannot do remotely go through the helpers here: walking a tree in one listing, a file's
size and version, and reading a byte range (never a whole file again). Credentials and
endpoints come the standard way (``AWS_ENDPOINT_URL``, profiles, ...) plus
``--storage-option key=value``.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, cast
from urllib.parse import unquote, urlparse


class RemoteUnavailable(RuntimeError):
    """A URL was given but universal_pathlib (or the protocol's fsspec package) is missing."""


def is_url(text: str) -> bool:
    return "://" in text and not os.path.exists(text)


def location(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Path:
    """A local ``Path``, or for a URL a ``UPath`` (typed as ``Path``: it reads like one)."""
    if isinstance(path, Path):
        return path
    if hasattr(path, "fs"):  # already a UPath
        return cast(Path, path)
    text = os.fspath(path)
    if not is_url(text):
        return Path(text)
    if text.startswith("file://"):
        return Path(unquote(urlparse(text).path))
    try:
        from upath import UPath
    except ImportError:
        raise RemoteUnavailable(f"{text}: reading URLs needs universal_pathlib and the protocol's fsspec "
                                "package: pip install 'lrwatch[s3]' (or [gcs])") from None
    try:
        remote = UPath(text, **(storage_options or {}))
        remote.fs  # noqa: B018 -- the protocol's package is imported here, so a missing one is said now
    except (ImportError, ValueError, TypeError) as e:
        raise RemoteUnavailable(f"{text}: {e} (pip install 'lrwatch[s3]' or 'lrwatch[gcs]' brings the usual "
                                "ones)") from None
    return cast(Path, remote)


def is_remote(path: object) -> bool:
    return not isinstance(path, Path)


def _fs_path(path: Path) -> tuple[Any, str]:
    return path.fs, path.path  # type: ignore[attr-defined]


def walk_files(root: Path, unlistable: dict[Path, str] | None = None) -> Iterator[tuple[Path, list[str]]]:
    """(folder, file names) for every folder under ``root``: one listing per folder locally,
    one recursive listing for a remote root. Local symlinked folders are followed, each real
    folder once (a link to an ancestor is no loop). Folders that could not be listed (no
    permission) go into ``unlistable`` with the reason, never silently left out."""
    if not is_remote(root):
        seen: set[str] = set()

        def refused(e: OSError) -> None:
            if unlistable is not None and e.filename is not None:
                unlistable[Path(e.filename)] = e.strerror or str(e)

        for folder, dirs, files in os.walk(root, onerror=refused, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            yield Path(folder), files
        return
    fs, base = _fs_path(root)
    by_folder: dict[str, list[str]] = {}
    for name in fs.find(base):
        folder, _, file_name = name.rpartition("/")
        by_folder.setdefault(folder, []).append(file_name)
    prefix = base.rstrip("/")
    for folder, files in sorted(by_folder.items()):
        rel = folder[len(prefix):].strip("/")
        yield (root / rel if rel else root), files


class FileInfo(NamedTuple):  # (a tuple: made for every read of a watched file)
    size: int
    version: tuple  # changes when the file is replaced (inode locally; ETag/mtime remotely)


def file_info(path: Path) -> FileInfo:
    """Size and version of a file (raises FileNotFoundError / OSError like ``os.stat``)."""
    if not is_remote(path):
        st = os.stat(path)
        return FileInfo(st.st_size, _local_version(st))
    fs, name = _fs_path(path)
    fs.invalidate_cache(name)  # a synced file is replaced by a longer (or shorter) one: ask again
    info = fs.info(name)
    return FileInfo(int(info.get("size") or 0), (info.get("ETag") or info.get("etag") or info.get("mtime")
                                                  or info.get("LastModified") or "",))


def _local_version(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino  # a file renamed over it, or made anew, is another inode


def read_range(path: Path, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file: a seek and a read locally, one range request remotely."""
    if end <= start:
        return b""
    if not is_remote(path):
        with open(path, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)
    fs, name = _fs_path(path)
    return bytes(fs.cat_file(name, start=start, end=end))


_READ_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0)  # O_BINARY: no newline translation on Windows
_PREAD = getattr(os, "pread", None)  # a read at an offset in one call (POSIX); Windows seeks, then reads


def _most_kept_open() -> int:
    """How many watched files to hold open at once: a quarter of the process's file limit, at
    most 1,024 (the rest is for the trainer, TensorBoard, the audit). None at all on Windows, where
    a file held open cannot be renamed or deleted by the trainer or a sync tool."""
    if os.name != "posix":
        return 0
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1024 if soft == resource.RLIM_INFINITY else max(0, min(1024, soft // 4))


def _close_kept(fd: int) -> None:
    GrowingFile.kept -= 1
    try:
        os.close(fd)
    except OSError:
        pass


class GrowingFile:
    """What a local file a watch follows gained since the last read, when that is a flush: the
    file is the one ``version`` names and grew by at most ``most`` bytes (anything else, a
    ``Reader`` reads). A file that is being written is kept open between reads (POSIX, up to
    ``most_kept``), so a flush costs an ``fstat`` and a read; an open and a close besides, with
    the path's look-up, cost ~1 point of a core at 1,000 flushes/s (``bench/bench_load.py``).
    A file kept open is read only while it still has a name (a file renamed over or deleted
    has none left); ``check_name``, at each listing of the run, closes it if its path now
    names another file (renamed away, and made again)."""

    kept = 0  # files held open, all instances together
    most_kept = _most_kept_open()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._close: weakref.finalize | None = None  # closes the file when this object goes

    def appended(self, offset: int, version: tuple, most: int, tail: bytes = b"") -> bytes | None:
        """The bytes after ``offset``, or None (replaced, shorter, more than ``most`` new, or
        rewritten in place: the ``tail`` read last, just before ``offset``, is not there now)."""
        if self._fd is not None:
            st = os.fstat(self._fd)
            if st.st_nlink and _local_version(st) == version:
                return _grown_by(self._fd, st.st_size, offset, most, tail)
            self.close()
        fd = os.open(self.path, _READ_FLAGS)
        try:
            st = os.fstat(fd)
            if _local_version(st) != version:
                return None
            data = _grown_by(fd, st.st_size, offset, most, tail)
            if data and GrowingFile.kept < self.most_kept:  # new bytes: a file being written
                GrowingFile.kept += 1
                self._fd, fd = fd, -1
                self._close = weakref.finalize(self, _close_kept, self._fd)
            return data
        finally:
            if fd >= 0:
                os.close(fd)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_fd": None, "_close": None}  # (an open file stays in its process)

    def check_name(self) -> None:
        """Close the file kept open unless its path still names it."""
        if self._fd is None:
            return
        try:
            same = _local_version(os.stat(self.path)) == _local_version(os.fstat(self._fd))
        except OSError:
            same = False
        if not same:
            self.close()

    def close(self) -> None:
        if self._close is not None:
            self._close()
        self._fd = self._close = None


def _grown_by(fd: int, size: int, offset: int, most: int, tail: bytes) -> bytes | None:
    """The bytes after ``offset``, read in one call with the ``tail`` before it, which must
    still be there: a file truncated and written again in place keeps its inode and may be
    longer than before, and only its content tells (``--poll`` may see it only after both)."""
    if not offset <= size <= offset + most:
        return None
    data = _read_at(fd, offset - len(tail), size)
    if len(data) != size - offset + len(tail) or not data.startswith(tail):
        return None
    return data[len(tail):] if tail else data


def _read_at(fd: int, start: int, end: int) -> bytes:
    """Bytes [start, end) of an open file (fewer at its end): one read, unless the OS hands out
    less (Windows caps a read at 2 GiB)."""
    if _PREAD is None:
        os.lseek(fd, start, os.SEEK_SET)
    parts = []
    while start < end:
        got = os.read(fd, end - start) if _PREAD is None else _PREAD(fd, end - start, start)
        if not got:
            break
        parts.append(got)
        start += len(got)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class Reader:
    """One file opened for a pass of reads: locally one file descriptor (``fstat``, then reads
    at offsets; no Python file object, whose set-up costs more than a watched step's read),
    remotely ranged requests. Use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> Reader:
        if not is_remote(self.path):
            self._fd = os.open(self.path, _READ_FLAGS)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def info(self) -> FileInfo:
        if self._fd is None:
            return file_info(self.path)
        st = os.fstat(self._fd)
        return FileInfo(st.st_size, _local_version(st))

    def read(self, start: int, end: int) -> bytes:
        if self._fd is None:
            return read_range(self.path, start, end)
        return _read_at(self._fd, start, end)


def version_key(path: Path) -> tuple:
    """What identifies the current contents of a small file (for caches of parsed configs)."""
    if not is_remote(path):
        return (path.stat().st_mtime_ns,)
    return file_info(path).version
