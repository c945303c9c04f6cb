"""lrwatch: a watchdog for adaptive-optimizer (Prodigy, D-Adaptation) runs with cyclic lr schedules.

Library first: :func:`audit` reads runs and returns a :class:`~lrwatch.monitor.Monitor`
holding each run's analysis; the CLI is a thin layer over it. torch is never imported
here (only :mod:`lrwatch.schedulers` needs it).
"""

from __future__ import annotations

__version__ = "0.1.0"

import os

from lrwatch.analysis import Analysis, Finding, Thresholds, analyze
from lrwatch.monitor import Monitor
from lrwatch.runs import Run
from lrwatch.tags import TagMap

__all__ = ["Analysis", "Finding", "Monitor", "Run", "TagMap", "Thresholds", "analyze", "audit"]


def audit(
    paths: list[str | os.PathLike[str]],
    tag_map: TagMap | None = None,
    thresholds: Thresholds | None = None,
) -> Monitor:
    """Read and analyse every run under ``paths`` once: a watch that does not wait."""
    monitor = Monitor(paths, tag_map, thresholds)
    monitor.poll()
    return monitor
