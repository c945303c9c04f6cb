"""What woke the watch loop: files written, and paths that appeared as folders, moved or went away.

Two sources with one interface. On Linux the loop reads inotify itself, in its own thread:
watchdog's inotify observer hands every event through three threads and two queues, which
with 200 runs written at once (1,000 writes/s) cost ~2.5 % of a core against ~0.3 % read
here. Elsewhere (Windows' ReadDirectoryChangesW, macOS' FSEvents), with ``--poll``, or with
``LRWATCH_OBSERVER=watchdog``, watchdog's observers deliver the same two sets.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from lrwatch.sources import walk_files

if TYPE_CHECKING:
    from watchdog.events import FileSystemEventHandler

# watchdog's inotify observer warns when a new folder's watch is added twice (its own race between
# the creation event and its recursive walk); harmless, and not the user's concern.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)


class FileEvents(Protocol):
    failure: OSError | None  # why a folder made since the start could not be observed (then poll)

    def add(self, folder: str, recursive: bool) -> None:
        """Observe ``folder`` (and, if ``recursive``, every folder below it, also those made later)."""

    def watching(self, folder: str) -> bool:
        """Whether ``folder`` is still observed (a deleted root must be added again when it returns)."""

    def wait(self, timeout: float) -> bool:
        """Block until an event arrives (True) or ``timeout`` passes (False)."""

    def take(self) -> tuple[set[str], set[str]]:
        """(files written, paths that appeared as folders, moved or went away) since the last call."""

    def stop(self) -> None: ...


def open_file_events(poll: float | None) -> tuple[FileEvents, str | None]:
    """The best source here, and why it is not the native one when it is not (a note to say)."""
    if poll:
        return WatchdogEvents(poll), None
    if sys.platform.startswith("linux") and os.environ.get("LRWATCH_OBSERVER", "") != "watchdog":
        try:
            return InotifyEvents(), None
        except OSError as e:
            return WatchdogEvents(None), f"inotify unavailable ({e.strerror or e}): using watchdog's observer"
    return WatchdogEvents(None), None


# --- inotify (Linux) ----------------------------------------------------------------------------------

IN_MODIFY, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE = 0x2, 0x40, 0x80, 0x100
IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x200, 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
# Writes, and new, renamed and deleted entries. Not opens and closes: tensorboard's writer opens
# and closes the file at every flush, and every reader opens it.
WATCH_MASK = IN_MODIFY | IN_CREATE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name
_READ_BYTES = 64 * 1024


def _libc() -> Any:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    for name in ("inotify_init1", "inotify_add_watch", "inotify_rm_watch"):
        if not hasattr(libc, name):
            raise OSError(errno.ENOSYS, f"libc has no {name}")
    return libc


class InotifyEvents:
    """inotify read without threads: the loop polls its descriptor and reads what is queued."""

    def __init__(self) -> None:
        self._libc = _libc()
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd = fd
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._folder: dict[int, str] = {}  # watch descriptor -> the folder it watches
        self._prefix: dict[int, str] = {}  # ... and with a separator at its end
        self._recursive: dict[int, bool] = {}  # whether folders made inside it are watched too
        self._wd: dict[str, int] = {}
        self._roots: set[str] = set()
        self._written: set[str] = set()
        self._moved: set[str] = set()
        self.failure: OSError | None = None

    def add(self, folder: str, recursive: bool) -> None:
        self._roots.add(folder)
        self._watch(folder, recursive)
        if recursive:
            self._watch_below(folder)

    def watching(self, folder: str) -> bool:
        return folder in self._wd

    def wait(self, timeout: float) -> bool:
        return bool(self._poller.poll(max(0, int(timeout * 1000))))

    def take(self) -> tuple[set[str], set[str]]:
        self._read()
        written, moved, self._written, self._moved = self._written, self._moved, set(), set()
        return written, moved

    def stop(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _watch(self, folder: str, recursive: bool) -> None:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), WATCH_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):  # gone again before it could be watched
                return
            if err in (errno.EACCES, errno.EPERM):  # not ours to read: the listing names it, and polling would not help
                return
            raise OSError(err, f"{os.strerror(err)}: cannot watch {folder}"
                               + (" (raise fs.inotify.max_user_watches, or use --poll)" if err == errno.ENOSPC else ""))
        self._folder[wd], self._recursive[wd], self._wd[folder] = folder, recursive, wd
        self._prefix[wd] = os.path.join(folder, "")

    def _watch_below(self, folder: str) -> None:
        """Every folder below, as a listing finds them (``walk_files``: symlinked ones too, each
        real folder once); a watch follows its link."""
        for below, _ in walk_files(Path(folder)):
            if str(below) != folder:
                self._watch(str(below), True)

    def _forget(self, folder: str) -> None:
        """Stop watching ``folder`` and what is below it (it moved: its watches would name the old paths)."""
        below = folder + os.sep
        for path in [p for p in self._wd if p == folder or p.startswith(below)]:
            wd = self._wd[path]
            self._drop(wd)
            self._libc.inotify_rm_watch(self.fd, wd)

    def _drop(self, wd: int) -> None:
        """Forget a watch descriptor (removed by us, or by the kernel when its folder went away)."""
        folder = self._folder.pop(wd, None)
        if folder is not None and self._wd.get(folder) == wd:  # not a newer watch of the same path
            del self._wd[folder]
        self._prefix.pop(wd, None)
        self._recursive.pop(wd, None)

    def _read(self) -> None:
        while True:
            try:
                buf = os.read(self.fd, _READ_BYTES)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            i = 0
            while i + _HEADER.size <= len(buf):
                wd, mask, _, size = _HEADER.unpack_from(buf, i)
                name = buf[i + _HEADER.size : i + _HEADER.size + size].split(b"\0", 1)[0]
                i += _HEADER.size + size
                self._event(wd, mask, name)

    def _event(self, wd: int, mask: int, name: bytes) -> None:
        if mask == IN_MODIFY and wd in self._prefix:  # nearly every event: a trainer's flush
            self._written.add(self._prefix[wd] + os.fsdecode(name))
            return
        if mask & IN_Q_OVERFLOW:  # events were lost: every root is looked at again
            self._moved.update(self._roots)
            return
        folder = self._folder.get(wd)
        if folder is None:
            return
        if mask & IN_IGNORED:  # the folder was deleted (or its file system unmounted)
            self._drop(wd)
            return
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            self._moved.add(folder)
            if mask & IN_MOVE_SELF:
                self._forget(folder)
            return
        path = os.path.join(folder, os.fsdecode(name))
        if mask & IN_ISDIR:
            self._moved.add(path)
            if mask & IN_MOVED_FROM:
                self._forget(path)
            elif mask & (IN_CREATE | IN_MOVED_TO) and self._recursive.get(wd):
                try:
                    self._watch(path, True)
                    self._watch_below(path)
                except OSError as e:  # out of watches: the watcher polls instead
                    self.failure = e
        elif mask & (IN_DELETE | IN_MOVED_FROM):
            self._moved.add(path)
        elif mask & (IN_CREATE | IN_MOVED_TO) and self._recursive.get(wd) and os.path.isdir(path):
            self._moved.add(path)  # a symlink to a folder (a run linked in): watched through its link
            try:
                self._watch(path, True)
                self._watch_below(path)
            except OSError as e:
                self.failure = e
        else:
            self._written.add(path)


# --- watchdog (Windows, macOS, polling) ---------------------------------------------------------------

class WatchdogEvents:
    """watchdog's native observer (or its polling observer, every ``poll`` seconds)."""

    def __init__(self, poll: float | None) -> None:
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        self.failure: OSError | None = None  # never set: add() raises; new folders are watchdog's own affair
        self._changes = _Changes()
        self._observer = PollingObserver(timeout=poll) if poll else Observer()
        self._observer.start()

    def add(self, folder: str, recursive: bool) -> None:
        from watchdog.events import (
            DirCreatedEvent,
            DirDeletedEvent,
            DirMovedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
        )

        # Not "folder modified": watchdog asks inotify for every close-after-write to make those,
        # one more event per flush. Deletions and moves make the loop look at the folders instead.
        wanted = [FileModifiedEvent, FileCreatedEvent, FileMovedEvent, FileDeletedEvent, DirCreatedEvent,
                  DirMovedEvent, DirDeletedEvent]
        # _Changes has the one method the observer calls (dispatch); it is defined without watchdog,
        # which the inotify path never imports
        handler = cast("FileSystemEventHandler", self._changes)
        self._observer.schedule(handler, folder, recursive=recursive, event_filter=wanted)

    def watching(self, folder: str) -> bool:
        return True

    def wait(self, timeout: float) -> bool:
        return self._changes.wake.wait(timeout)

    def take(self) -> tuple[set[str], set[str]]:
        return self._changes.take()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)


class _Changes:
    """watchdog's handler: collects paths from the observer thread and wakes the loop."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._written: set[str] = set()
        self._moved: set[str] = set()

    def dispatch(self, event: Any) -> None:  # watchdog calls this for the wanted events only
        src = os.fsdecode(event.src_path)
        with self._lock:
            if event.is_directory or event.event_type in ("deleted", "moved"):
                self._moved.add(src)
            else:
                self._written.add(src)
            dest = getattr(event, "dest_path", "")
            if dest:
                (self._moved if event.is_directory else self._written).add(os.fsdecode(dest))
        self.wake.set()

    def take(self) -> tuple[set[str], set[str]]:
        with self._lock:
            written, moved, self._written, self._moved = self._written, self._moved, set(), set()
        self.wake.clear()
        return written, moved

