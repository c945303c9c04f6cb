"""The two sources of file events (inotify read in the loop's thread, watchdog's observers) on a
real folder tree: the same writes, new folders, moves and deletions come out of both."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lrwatch.file_events import FileEvents, InotifyEvents, WatchdogEvents, open_file_events

# watchdog's own race on a new folder (lrwatch.file_events filters it; pytest resets filters per test)
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")
LINUX = sys.platform.startswith("linux")
SOURCES = [pytest.param(InotifyEvents, id="inotify", marks=pytest.mark.skipif(not LINUX, reason="Linux only")),
           pytest.param(lambda: WatchdogEvents(None), id="watchdog")]


def gather(events: FileEvents, done: Callable[[set[str], set[str]], bool], timeout: float = 5.0
           ) -> tuple[set[str], set[str]]:
    """Everything the source reports until ``done(written, moved)`` holds (or ``timeout``)."""
    written: set[str] = set()
    moved: set[str] = set()
    deadline = time.monotonic() + timeout
    while not done(written, moved) and time.monotonic() < deadline:
        events.wait(0.1)
        w, m = events.take()
        written |= w
        moved |= m
    return written, moved


@pytest.fixture(params=SOURCES)
def source(request):
    events = request.param()
    yield events
    events.stop()


def append(path: Path, data: bytes = b"x") -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def test_writes_in_a_folder_made_after_the_start_are_reported_with_their_path(tmp_path, source):
    source.add(str(tmp_path), recursive=True)
    run = tmp_path / "run" / "network_train"
    run.mkdir(parents=True)
    _, moved = gather(source, lambda w, m: str(tmp_path / "run") in m)
    assert str(tmp_path / "run") in moved  # a new folder: the loop lists the tree again
    time.sleep(0.2)  # watchdog adds its watch on the new folders in its own thread
    append(run / "events.out.tfevents.1")
    written, _ = gather(source, lambda w, m: str(run / "events.out.tfevents.1") in w)
    assert str(run / "events.out.tfevents.1") in written


def test_a_moved_folder_is_followed_under_its_new_name(tmp_path, source):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    source.add(str(tmp_path), recursive=True)
    (tmp_path / "a").rename(tmp_path / "b")
    _, moved = gather(source, lambda w, m: {str(tmp_path / "a"), str(tmp_path / "b")} <= m)
    assert {str(tmp_path / "a"), str(tmp_path / "b")} <= moved
    time.sleep(0.2)
    append(tmp_path / "b" / "sub" / "f")
    written, _ = gather(source, lambda w, m: bool(w))
    assert written == {str(tmp_path / "b" / "sub" / "f")}  # not the old path


def test_deleted_files_and_folders_are_reported_as_gone(tmp_path, source):
    (tmp_path / "run").mkdir()
    append(tmp_path / "run" / "f")
    (tmp_path / "other").mkdir()
    source.add(str(tmp_path), recursive=True)
    (tmp_path / "run" / "f").unlink()
    shutil.rmtree(tmp_path / "other")
    _, moved = gather(source, lambda w, m: {str(tmp_path / "run" / "f"), str(tmp_path / "other")} <= m)
    assert {str(tmp_path / "run" / "f"), str(tmp_path / "other")} <= moved


def test_a_folder_watched_without_recursion_reports_only_its_own_files(tmp_path, source):
    (tmp_path / "sub").mkdir()
    source.add(str(tmp_path), recursive=False)
    append(tmp_path / "sub" / "deep")
    append(tmp_path / "own")
    written, _ = gather(source, lambda w, m: str(tmp_path / "own") in w)
    time.sleep(0.2)
    written |= source.take()[0]
    assert str(tmp_path / "own") in written and str(tmp_path / "sub" / "deep") not in written


@pytest.mark.skipif(not LINUX, reason="inotify")
def test_inotify_forgets_a_deleted_root_so_that_it_can_be_watched_again(tmp_path):
    root = tmp_path / "logs"
    root.mkdir()
    events = InotifyEvents()
    try:
        events.add(str(root), recursive=True)
        assert events.watching(str(root))
        root.rmdir()
        _, moved = gather(events, lambda w, m: str(root) in m)
        assert str(root) in moved
        gather(events, lambda w, m: not events.watching(str(root)), timeout=2)
        assert not events.watching(str(root))
        root.mkdir()
        events.add(str(root), recursive=True)
        append(root / "f")
        written, _ = gather(events, lambda w, m: bool(w))
        assert written == {str(root / "f")}
    finally:
        events.stop()


@pytest.mark.skipif(not LINUX, reason="inotify")
def test_inotify_events_lost_to_a_full_queue_make_the_loop_look_at_every_root_again(tmp_path):
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: too many writes to overflow it here")
    events = InotifyEvents()
    try:
        events.add(str(tmp_path), recursive=True)
        fds = [os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT) for i in range(2)]
        for i in range(limit + 10):  # alternating files: the kernel merges only repeats of the last event
            os.write(fds[i % 2], b"x")
        for fd in fds:
            os.close(fd)
        _, moved = events.take()
        assert str(tmp_path) in moved
    finally:
        events.stop()


def test_the_native_source_is_inotify_on_linux_unless_watchdog_is_asked_for(monkeypatch):
    monkeypatch.delenv("LRWATCH_OBSERVER", raising=False)
    events, note = open_file_events(None)
    try:
        assert isinstance(events, InotifyEvents if LINUX else WatchdogEvents) and note is None
    finally:
        events.stop()
    monkeypatch.setenv("LRWATCH_OBSERVER", "watchdog")
    events, _ = open_file_events(None)
    try:
        assert isinstance(events, WatchdogEvents)
    finally:
        events.stop()
    polled, _ = open_file_events(0.5)
    polled.stop()
    assert isinstance(polled, WatchdogEvents)


@pytest.mark.skipif(not LINUX, reason="inotify")
def test_a_watcher_out_of_inotify_watches_says_so_and_polls_instead(tmp_path, monkeypatch):
    """The kernel's watch limit (fs.inotify.max_user_watches) reached when a new folder appears:
    the watcher says so and polls, and writes in that folder still arrive."""
    import errno

    from lrwatch.monitor import Monitor
    from lrwatch.watching import Watcher

    real_watch = InotifyEvents._watch

    def limited(self, folder, recursive):
        if os.path.basename(folder) == "new":
            raise OSError(errno.ENOSPC, "No space left on device: cannot watch " + folder)
        real_watch(self, folder, recursive)

    monkeypatch.setattr(InotifyEvents, "_watch", limited)
    said: list[str] = []
    watcher = Watcher(Monitor([tmp_path]), None, said.append)
    watcher.start()
    try:
        assert isinstance(watcher.events, InotifyEvents)
        (tmp_path / "new").mkdir()
        _, rediscover, _ = watcher.wait(2.0)
        assert rediscover and isinstance(watcher.events, WatchdogEvents) and watcher.polling
        assert any("polling every 1 s instead" in line for line in said), said
        append(tmp_path / "new" / "events.out.tfevents.1")
        written, _ = gather(watcher.events, lambda w, m: bool(w), timeout=5)
        assert str(tmp_path / "new" / "events.out.tfevents.1") in written
    finally:
        watcher.stop()


@pytest.mark.skipif(os.name != "posix", reason="event files are kept open on POSIX only")
@pytest.mark.parametrize("poll", [pytest.param(None, id="native"), pytest.param(0.2, id="polling")])
def test_an_event_file_renamed_away_and_made_again_is_read_anew_without_waiting_for_a_listing(tmp_path, poll):
    """A watched file is kept open between reads; renamed away it keeps its name elsewhere, so
    only the move's event can tell the watch that its path names another file now."""
    from conftest import records_of

    from lrwatch.loader import EventFile
    from lrwatch.monitor import Monitor
    from lrwatch.runs import Run
    from lrwatch.watching import Watcher

    src, cuts = records_of("dadapt_sgd_blowup")
    run = tmp_path / "logs" / "run"
    run.mkdir(parents=True)
    path = run / "events.out.tfevents.1700000000.h.1.0"
    path.write_bytes(src[: cuts[40]])
    monitor = Monitor([tmp_path / "logs"])
    watcher = Watcher(monitor, poll)
    watcher.start()
    monitor.poll()
    monitor.start_live()
    state = monitor.states[run]

    def last_points(of: Run | EventFile) -> dict[str, tuple[int, float]]:
        """Each tag's last (step, value): a file read again from its start ends the run's series."""
        if isinstance(of, EventFile):
            s = of.read_new().scalars
            return {tag: (int(s.steps[k]), float(s.values[k])) for k, tag in enumerate(s.tags[i] for i in s.tag_ids)}
        return {t: (int(x.steps[-1]), float(x.values[-1])) for t in of.tags if (x := of.series(t)) is not None}

    def watch_until(expected: dict[str, tuple[int, float]], seconds: float = 5.0) -> bool:
        """The watch loop's reading (lrwatch.watching.watch) until the run ends with ``expected``."""
        deadline = time.monotonic() + seconds  # under RELIST_INTERVAL: no listing on the clock
        while time.monotonic() < deadline:
            runs, rediscover, _ = watcher.wait(0.1)
            monitor.poll() if rediscover else monitor.poll(rediscover=False, written=runs)
            got = last_points(state.run)
            if all(got.get(tag) == point for tag, point in expected.items()):
                return True
        return False

    try:
        append(path, src[cuts[40] : cuts[42]])
        assert watch_until(last_points(EventFile(path)))
        path.rename(tmp_path / "kept.bak")  # out of the watched tree: no event names it
        path.write_bytes(src[: cuts[2]] + src[cuts[30] : cuts[35]])
        expected = last_points(EventFile(path))
        assert watch_until(expected), (last_points(state.run), expected)
        assert path in state.run.rewritten
    finally:
        watcher.stop()
