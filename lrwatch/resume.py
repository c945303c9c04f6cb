"""A run resumed into a new log folder, joined to the run it continues.

kohya's ``--resume <dir>/<name>-step00000700-state`` starts a new log folder (a new
timestamp), and in many versions its global step starts again at 0. Seen alone,
the resumed part has forgotten the highest d×lr so far, so a restart after the
resume is measured against nothing. When the logged config names the state (with
``--log_config``) and the run that saved it is among the runs read, the resumed
run is analysed as that run's history up to the resume step followed by its own
points, shifted to global steps.
"""

from __future__ import annotations

import re
from pathlib import PurePath, PureWindowsPath

import numpy as np

from lrwatch.runs import Run, Series

_STATE = re.compile(r"^(?P<name>.+)-step(?P<step>\d{8})-state$")
_STAMP = re.compile(r"\d{14}$")


def resumed_from(config: dict[str, object]) -> tuple[str, int] | None:
    """(output name, step) of the state a run resumed from, per its logged ``resume`` setting."""
    raw = str(config.get("resume") or "").rstrip("/\\")
    if not raw or raw == "None":
        return None
    name = (PureWindowsPath(raw) if "\\" in raw else PurePath(raw)).name
    m = _STATE.match(name)
    return (m["name"], int(m["step"])) if m else None


def output_name(run: Run) -> str:
    named = run.config.get("output_name")
    if named:
        return str(named)
    folder = run.path.parent.name if run.path.name in ("network_train", "finetuning", "dreambooth") else run.path.name
    return _STAMP.sub("", folder)


def first_step(run: Run) -> int | None:
    span = run.step_range()
    return span[0] if span else None


def find_continued(run: Run, others: list[Run]) -> tuple[Run, int, int] | None:
    """(the run ``run`` continues, the resume step, the offset of ``run``'s steps) or None.
    The earlier run has the same output name, started before, and logged the resume step."""
    state = resumed_from(run.config)
    if state is None:
        return None
    name, step = state
    first = first_step(run)
    if first is None:
        return None
    candidates = []
    for other in others:
        if other is run or other.path == run.path or output_name(other) != name:
            continue
        span = other.step_range()
        if span is None or span[1] < step or str(other.path) >= str(run.path):
            continue  # kohya names log folders by their start time: an earlier run sorts first
        candidates.append(other)
    if not candidates:
        return None
    earlier = max(candidates, key=lambda r: str(r.path))
    offset = 0 if first > step else step  # versions that restore the global step log it as is
    return earlier, step, offset


class JoinedRun:
    """``later`` seen with the history of ``earlier``: earlier's points up to ``resume_step``,
    then later's, shifted by ``offset`` (``earlier`` None: only the shift, so that steps and the
    logged schedule agree). Reads like a :class:`Run` for the analysis."""

    def __init__(self, earlier: Run | None, later: Run, resume_step: int, offset: int) -> None:
        self.earlier, self.later, self.resume_step, self.offset = earlier, later, resume_step, offset
        self.path, self.name = later.path, later.name
        self.config, self.config_problems = later.config, later.config_problems

    @property
    def config_version(self) -> int:
        return self.later.config_version

    @property
    def tags(self) -> list[str]:
        return sorted(set(self.earlier.tags if self.earlier else ()) | set(self.later.tags))

    @property
    def reads(self) -> int:
        return self.later.reads + (self.earlier.reads if self.earlier else 0)

    def series(self, tag: str) -> Series | None:
        before = self.earlier.series(tag) if self.earlier else None
        after = self.later.series(tag)
        if after is None:
            return None  # a tag the resumed run no longer logs is not continued
        steps = after.steps + self.offset
        if before is None:
            return Series(steps, after.values, after.wall_times)
        keep = before.steps <= self.resume_step
        return Series(np.concatenate([before.steps[keep], steps]), np.concatenate([before.values[keep], after.values]),
                      np.concatenate([before.wall_times[keep], after.wall_times]))

    def recent(self, tag: str) -> Series | None:
        """A joined run is analysed whole (its history can change under it): all of it."""
        return self.series(tag)
