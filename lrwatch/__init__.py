"""lrwatch: a watchdog for adaptive-optimizer (Prodigy, D-Adaptation) runs with cyclic lr schedules.

Library first: :func:`audit` reads runs and returns an :class:`AuditResult` holding each
run's analysis and the exit code the CLI would give; :func:`watch` follows runs as they are
written and guards their trainer (``WatchOptions``), returning the exit code the CLI would
give. A bad option raises :class:`OptionError` (a ``ValueError``); the CLI is a thin layer
that turns it into a usage message.
torch is never imported here (only :mod:`lrwatch.schedulers` needs it).
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.2.0"

from lrwatch.analysis import Analysis, Finding, Thresholds, analyze
from lrwatch.audit import AuditResult, audit
from lrwatch.monitor import Monitor
from lrwatch.options import OptionError, WatchOptions
from lrwatch.runs import Run
from lrwatch.snapshots import SnapshotBook
from lrwatch.tags import TagMap


def watch(paths: list[str | os.PathLike[str]], options: WatchOptions | None = None, **kwargs: Any) -> int:
    """``lrwatch watch`` from Python: :func:`lrwatch.watching.watch_paths` (its keywords: the
    audit's, plus ``events_out``, ``exec_cmd``, ``webhook``, ``err`` and ``out``). The watch
    loop and what it needs (file events, process tables) are imported here, at the first call,
    so that ``import lrwatch`` stays light for an audit."""
    from lrwatch.watching import watch_paths

    return watch_paths(paths, options, **kwargs)

__all__ = ["Analysis", "AuditResult", "Finding", "Monitor", "OptionError", "Run", "SnapshotBook", "TagMap",
           "Thresholds", "WatchOptions", "analyze", "audit", "watch"]
