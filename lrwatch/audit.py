"""The audit as a library call: exactly what ``lrwatch audit`` does, returning a result object."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lrwatch.analysis import Thresholds
from lrwatch.monitor import Monitor, RunState
from lrwatch.report import exit_code, render, to_json
from lrwatch.snapshots import DEFAULT_FRIED_LOSS, DEFAULT_SAFE_LR, Snapshot, SnapshotBook, best_safe
from lrwatch.tags import TagMap
from lrwatch.tbexport import Exporter
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
) -> AuditResult:
    """Read and analyse every run under ``paths`` once (a watch that does not wait); with
    ``snapshots``, judge the snapshots in those folders and, with ``manifest``, write
    ``lrwatch-snapshots.json`` into each. ``on_run(done, total)`` reports progress. ``trainer``
    (a name in ``lrwatch.trainers.LAYOUTS``) overrides detection; ``schedule`` gives the schedule
    of logs that hold only d×lr. ``tensorboard`` writes each run's analysis as a TensorBoard run
    ``<run folder>/lrwatch/`` (lrwatch.tbexport). Paths may be URLs fsspec understands
    (``storage_options`` go to it)."""
    book = SnapshotBook(list(snapshots), steps_per_epoch, safe_lr, fried_loss, storage_options) if snapshots else None
    monitor = Monitor(paths, tag_map, thresholds, snapshots=book, trainer=trainer, schedule=schedule,
                      storage_options=storage_options)
    runs = monitor.discover()
    for i, run in enumerate(runs, 1):
        monitor.poll({run.path}, rediscover=False)
        if on_run is not None:
            on_run(i, len(runs))
    monitor.judge_snapshots()
    problems = book.write_manifests() if book is not None and manifest else []
    exported = Exporter().update(monitor.runs, book.by_run if book else None) if tensorboard else []
    return AuditResult(monitor, exit_code(monitor), problems, exported)
