"""The audit as a library call: exactly what ``lrwatch audit`` does, returning a result object."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lrwatch.analysis import Thresholds
from lrwatch.monitor import READ_BUDGET, Monitor, RunState
from lrwatch.report import exit_code, render, run_json, to_json
from lrwatch.snapshots import (
    DEFAULT_FRIED_LOSS,
    DEFAULT_FRIED_VALIDATION,
    DEFAULT_SAFE_LR,
    Snapshot,
    SnapshotBook,
    best_snapshot,
)
from lrwatch.tags import TagMap
from lrwatch.trainers import ScheduleOptions


@dataclass
class AuditResult:
    monitor: Monitor
    exit_code: int  # as the CLI's (README: exit codes)
    manifest_problems: list[str] = field(default_factory=list)  # manifests that could not be written
    export_problems: list[str] = field(default_factory=list)  # TensorBoard exports that could not be written

    @property
    def runs(self) -> list[RunState]:
        return self.monitor.runs

    def best_snapshot(self) -> Snapshot | None:
        """The snapshot to keep, over every run: the first-ranked safe one (None without snapshots)."""
        book = self.monitor.snapshots
        if book is None:
            return None
        return best_snapshot([s for snaps in book.by_run.values() for s in snaps])

    def render(self) -> str:
        return render(self.monitor)

    def to_json(self) -> str:
        return to_json(self.monitor)


# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """For a process that reads and then exits (the audit command and its workers): ask glibc
    to keep freed memory for reuse. By default it hands numpy's large temporaries back to the
    system and faults them in again at the next one: on a 600k-event file 48k page faults
    instead of 23k, a fifth of the reading time, for the same peak memory. Not for the watcher
    (it lives on) nor for the library (the process is not lrwatch's); nothing without glibc.
    True if glibc took all three settings."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    # the three together: any one alone turns off glibc's adaptive threshold, and then every
    # large array is mapped and faulted in afresh
    return all([mallopt(M_MMAP_THRESHOLD, 32 << 20),  # the largest glibc documents for 64-bit
                mallopt(M_TOP_PAD, 64 << 20),
                mallopt(M_TRIM_THRESHOLD, 1 << 30)])


PARALLEL_FROM = 4  # runs: below this, starting worker processes costs more than it saves
BATCH = 16  # runs handed to a worker at once, at most


def _pool_size(workers: int | None, runs: int) -> int:
    if runs < PARALLEL_FROM:
        return 1
    return max(1, min(workers if workers is not None else (os.cpu_count() or 1), runs))


def _analyse_alone(states: list[RunState], options: dict[str, Any], keep_points: bool) -> list[RunState]:
    """In a worker process: read and analyse each run as if it were the only one (the costly
    part of an audit); without ``keep_points``, only what the report says of it comes back."""
    worker = Monitor([], **options)
    worker.read_budget = None if keep_points else READ_BUDGET
    for state in states:
        worker.states = {state.run.path: state}
        worker.poll({state.run.path}, rediscover=False)
        if not keep_points:  # then what the report says is final here: its text too (seconds for thousands)
            _drop_points(state)
            state.rendered = run_json(state)
    return states


def _drop_points(state: RunState) -> None:
    state.analyser = None
    state.run.drop_points()
    for group in state.analysis.groups if state.analysis else []:
        group.drop_curves()


def _analyse_in_parallel(monitor: Monitor, pool: int, keep_points: bool,
                         on_run: Callable[[int, int], None] | None) -> None:
    """Read and analyse the runs in ``pool`` processes, then put them in their places here, where
    what needs every run (joining a resumed run to the run it continues) is done. A run whose
    worker failed is read here, where its error is kept like any other."""
    from concurrent.futures import ProcessPoolExecutor, as_completed  # here: multiprocessing costs 10 ms to import

    options = {"tag_map": monitor.tag_map, "thresholds": monitor.thresholds, "trainer": monitor.trainer,
               "schedule": monitor.schedule}
    states = list(monitor.states.values())
    size = max(1, min(BATCH, len(states) // (4 * pool)))  # a few batches per worker: less to and fro
    batches = [states[i : i + size] for i in range(0, len(states), size)]
    done_states: list[RunState] = []
    done = 0
    with ProcessPoolExecutor(max_workers=pool, initializer=keep_freed_memory) as executor:
        futures = {executor.submit(_analyse_alone, batch, options, keep_points): batch for batch in batches}
        for future in as_completed(futures):
            try:
                done_states += future.result()
            except Exception:
                for state in futures[future]:
                    monitor.poll({state.run.path}, rediscover=False)
            done += len(futures[future])
            if on_run is not None:
                on_run(done, len(states))
    monitor.adopt(done_states)


def audit(
    paths: list[str | os.PathLike[str]],
    tag_map: TagMap | None = None,
    thresholds: Thresholds | None = None,
    snapshots: list[str | os.PathLike[str]] | None = None,
    steps_per_epoch: int | None = None,
    safe_lr: float = DEFAULT_SAFE_LR,
    manifest: bool = True,
    fried_loss: float = DEFAULT_FRIED_LOSS,
    fried_validation: float = DEFAULT_FRIED_VALIDATION,
    on_run: Callable[[int, int], None] | None = None,
    trainer: str | None = None,
    schedule: ScheduleOptions | None = None,
    tensorboard: bool = False,
    storage_options: dict[str, Any] | None = None,
    workers: int | None = None,
    keep_points: bool = True,
) -> AuditResult:
    """Read and analyse every run under ``paths`` once (a watch that does not wait); with
    ``snapshots``, judge the snapshots in those folders and, with ``manifest``, write
    ``lrwatch-snapshots.json`` into each. ``on_run(done, total)`` reports progress. ``trainer``
    (a name in ``lrwatch.trainers.LAYOUTS``) overrides detection; ``schedule`` gives the schedule
    of logs that hold only d×lr. ``tensorboard`` writes each run's analysis as a TensorBoard run
    ``<run folder>/lrwatch/`` (lrwatch.tbexport). Paths may be URLs fsspec understands
    (``storage_options`` go to it). With many runs, reading them is spread over ``workers``
    processes (default: every core; 1 reads in this process); the results keep their order.
    ``keep_points=False`` reads each run in parts (``READ_BUDGET``), letting go of the points
    its rules no longer need, and keeps only what the report says of it once it is analysed
    (its points and per-point curves go; a series asked for later is read again), so that
    memory grows neither with the runs nor with their length; with ``snapshots`` or
    ``tensorboard`` every point is kept."""
    book = (SnapshotBook(list(snapshots), steps_per_epoch, safe_lr, fried_loss, fried_validation, storage_options)
            if snapshots else None)
    monitor = Monitor(paths, tag_map, thresholds, snapshots=book, trainer=trainer, schedule=schedule,
                      storage_options=storage_options)
    runs = monitor.discover()
    pool = _pool_size(workers, len(runs))
    keep_points = keep_points or bool(snapshots) or tensorboard  # both draw on every run's curves
    if not keep_points:
        monitor.read_budget = READ_BUDGET
    if pool > 1:
        _analyse_in_parallel(monitor, pool, keep_points, on_run)
    else:
        for i, run in enumerate(runs, 1):
            monitor.poll({run.path}, rediscover=False)
            if not keep_points:
                _drop_points(monitor.states[run.path])
            if on_run is not None:
                on_run(i, len(runs))
    if not keep_points:  # a resumed run joined again (above) read its points again
        for state in monitor.states.values():
            _drop_points(state)
    monitor.judge_snapshots()
    problems = book.write_manifests() if book is not None and manifest else []
    exported: list[str] = []
    if tensorboard:
        from lrwatch.tbexport import Exporter

        exported = Exporter().update(monitor.runs, book.by_run if book else None)
    return AuditResult(monitor, exit_code(monitor), problems, exported)
