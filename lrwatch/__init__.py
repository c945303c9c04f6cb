"""lrwatch: a watchdog for adaptive-optimizer (Prodigy, D-Adaptation) runs with cyclic lr schedules.

Library first: :func:`audit` reads runs and returns an :class:`AuditResult` holding each
run's analysis and the exit code the CLI would give; the CLI is a thin layer over it.
torch is never imported here (only :mod:`lrwatch.schedulers` needs it).
"""

from __future__ import annotations

__version__ = "0.2.0"

from lrwatch.analysis import Analysis, Finding, Thresholds, analyze
from lrwatch.audit import AuditResult, audit
from lrwatch.monitor import Monitor
from lrwatch.runs import Run
from lrwatch.tags import TagMap

__all__ = ["Analysis", "AuditResult", "Finding", "Monitor", "Run", "TagMap", "Thresholds", "analyze", "audit"]
