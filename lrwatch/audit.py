"""The audit as a library call: exactly what ``lrwatch audit`` does, returning a result object."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from lrwatch.analysis import Thresholds
from lrwatch.monitor import Monitor, RunState
from lrwatch.report import exit_code, render, to_json
from lrwatch.runs import Run
from lrwatch.snapshots import DEFAULT_FRIED_LOSS, DEFAULT_SAFE_LR, Snapshot, SnapshotBook, best_safe
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
        """The newest snapshot judged safe, over every run (None without snapshots)."""
        book = self.monitor.snapshots
        return None if book is None else best_safe([s for snaps in book.by_run.values() for s in snaps])

    def render(self) -> str:
        return render(self.monitor)

    def to_json(self) -> str:
        return to_json(self.monitor)


PARALLEL_FROM = 4  # runs: below this, starting worker processes costs more than it saves


def _pool_size(workers: int | None, runs: int) -> int:
    if runs < PARALLEL_FROM:
        return 1
    return max(1, min(workers if workers is not None else (os.cpu_count() or 1), runs))


def _read_run(run: Run) -> Run:
    """In a worker process: read every event file of one run (the costly part of an audit)."""
    run.refresh()
    return run


def _read_in_parallel(monitor: Monitor, runs: list[Run], pool: int,
                      on_run: Callable[[int, int], None] | None) -> None:
    """Read the runs in ``pool`` processes and put each read run back in its place; the analysis
    (which needs every run, to join resumed ones) stays in this process. A run whose read fails
    in a worker is read again here, where its error is kept like any other."""
    with ProcessPoolExecutor(max_workers=pool) as executor:
        futures = {executor.submit(_read_run, run): run.path for run in runs}
        for done, future in enumerate(as_completed(futures), 1):
            try:
                monitor.states[futures[future]].run = future.result()
            except Exception:  # noqa: S110 -- the serial read below reports it
                pass
            if on_run is not None:
                on_run(done, len(runs))


def audit(
    paths: list[str | os.PathLike[str]],
    tag_map: TagMap | None = None,
    thresholds: Thresholds | None = None,
    snapshots: list[str | os.PathLike[str]] | None = None,
    steps_per_epoch: int | None = None,
    safe_lr: float = DEFAULT_SAFE_LR,
    manifest: bool = True,
    fried_loss: float = DEFAULT_FRIED_LOSS,
    on_run: Callable[[int, int], None] | None = None,
    trainer: str | None = None,
    schedule: ScheduleOptions | None = None,
    tensorboard: bool = False,
    storage_options: dict[str, Any] | None = None,
    workers: int | None = None,
) -> AuditResult:
    """Read and analyse every run under ``paths`` once (a watch that does not wait); with
    ``snapshots``, judge the snapshots in those folders and, with ``manifest``, write
    ``lrwatch-snapshots.json`` into each. ``on_run(done, total)`` reports progress. ``trainer``
    (a name in ``lrwatch.trainers.LAYOUTS``) overrides detection; ``schedule`` gives the schedule
    of logs that hold only d×lr. ``tensorboard`` writes each run's analysis as a TensorBoard run
    ``<run folder>/lrwatch/`` (lrwatch.tbexport). Paths may be URLs fsspec understands
    (``storage_options`` go to it). With many runs, reading them is spread over ``workers``
    processes (default: every core; 1 reads in this process); the results keep their order."""
    book = SnapshotBook(list(snapshots), steps_per_epoch, safe_lr, fried_loss, storage_options) if snapshots else None
    monitor = Monitor(paths, tag_map, thresholds, snapshots=book, trainer=trainer, schedule=schedule,
                      storage_options=storage_options)
    runs = monitor.discover()
    pool = _pool_size(workers, len(runs))
    if pool > 1:
        _read_in_parallel(monitor, runs, pool, on_run)
    for i, run in enumerate(runs, 1):
        monitor.poll({run.path}, rediscover=False)  # read already (in a worker), or read here
        if on_run is not None and pool <= 1:
            on_run(i, len(runs))
    monitor.judge_snapshots()
    problems = book.write_manifests() if book is not None and manifest else []
    exported: list[str] = []
    if tensorboard:
        from lrwatch.tbexport import Exporter

        exported = Exporter().update(monitor.runs, book.by_run if book else None)
    return AuditResult(monitor, exit_code(monitor), problems, exported)
