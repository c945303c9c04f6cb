"""What every rule shares: the finding, and the numeric kernels over a run's growing series.

Every quantity at step t is computed from data at steps <= t only, so analysing a longer
prefix of a run never moves or removes an earlier finding, and a run read in parts gives the
very same floats as one read at once (the window sums add in one order wherever a window is
cut). A watched update's few new points (``SMALL_UPDATE``) take plain floats where numpy's
fixed cost per call would be most of the work.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import asdict, dataclass, field

import numpy as np

from lrwatch.rules.kinds import Basis, Kind

WARNING = "warning"
CRITICAL = "critical"
SMALL_UPDATE = 64  # points: a watched run's few new ones, where plain Python beats numpy's fixed cost per call


@dataclass
class Finding:
    kind: Kind
    severity: str  # warning | critical
    group: str | None
    step: int
    message: str
    values: dict[str, float | int | str | None] = field(default_factory=dict)
    basis: Basis = Basis.LR  # what the evidence was measured on

    def key(self) -> tuple:
        return (self.kind, self.severity, self.group, self.values.get("cycle"), self.values.get("what"),
                bool(self.values.get("strong")))

    def to_dict(self) -> dict:
        return asdict(self)


class Stale(Exception):
    """What was analysed before may have changed: analyse the run again from its start."""


def first_true(mask: np.ndarray) -> int | None:
    """The index of the first True, or None (one argmax: a watched update calls this a dozen
    times on a few points, where each numpy call's fixed cost is what counts)."""
    if not len(mask):
        return None
    i = int(mask.argmax())
    return i if mask[i] else None


def first_nonfinite(x: np.ndarray) -> int | None:
    """The index of the first NaN or inf, or None (a watched update's few points: plain floats)."""
    if len(x) <= SMALL_UPDATE:
        return next((i for i, v in enumerate(x.tolist()) if not math.isfinite(v)), None)
    return first_true(~np.isfinite(x))


class Spacing:
    """``spacing`` of a growing run's steps, kept from the smallest and largest gap."""

    def __init__(self) -> None:
        self.low = self.high = 0

    def add(self, steps: np.ndarray, start: int) -> float:
        """``spacing(steps)`` once ``steps[start:]`` were added."""
        new = steps[max(0, start - 1):]
        if len(new) >= 2:
            if len(new) <= SMALL_UPDATE:  # a watched update's few steps: plain ints cost less than numpy's calls
                listed = new.tolist()
                gaps = [b - a for a, b in zip(listed, listed[1:])]
                low, high = min(gaps), max(gaps)
            else:
                diffs = new[1:] - new[:-1]
                low, high = int(diffs.min()), int(diffs.max())
            fresh = start <= 1
            self.low = low if fresh else min(self.low, low)
            self.high = high if fresh else max(self.high, high)
        if len(steps) < 2:
            return 1.0
        return max(float(self.low), 1.0) if self.low == self.high else spacing(steps)


def spacing(steps: np.ndarray) -> float:
    """Optimizer steps between logged points: 1 for a trainer that logs every step, N for one
    that logs every N (repeats at one step, from gradient accumulation, are already folded)."""
    if len(steps) < 2:
        return 1.0
    gaps = np.diff(steps)
    low = gaps.min()  # nearly always every gap is the same: no median needed
    return max(float(low) if low == gaps.max() else float(np.median(gaps)), 1.0)


def points(gap: float, span: int) -> int:
    """How many logged points, one every ``gap`` steps (``spacing``), cover ``span`` optimizer
    steps: windows and grace periods are counted in steps, whether a trainer logs every step
    or every N."""
    return max(1, math.ceil(span / gap))


def samples(gap: float, span: int, per_update: int = 1) -> int:
    """The points a loss window of ``span`` logged steps takes: those steps, and never fewer
    points than the window has optimizer updates (``span / per_update``). A diffusion loss
    swings ~30x with the random timestep, so what averages out its noise is the number of
    losses, not the steps they span: a trainer that logs one step's loss every 10 steps
    (ai-toolkit) gets windows 10x as long, not one loss each."""
    return max(points(gap, span), math.ceil(span / per_update))



def window_sums(x: np.ndarray, span: int, skip: int) -> np.ndarray:
    """Sums of the last ``span`` values (fewer at the array's start) ending at each index from
    ``skip`` on, added in one order (newest first) wherever the window is cut from: a run
    analysed in parts gives the very same floats as one analysed at once."""
    if (len(x) - skip) * span <= 256:  # a watched step's few points: the same adds, in plain floats
        return np.array(window_sums_list(x.tolist(), span, skip))
    return window_sums_array(x, span, skip)


def window_sums_array(x: np.ndarray, span: int, skip: int) -> np.ndarray:
    """``window_sums`` in numpy: one vectorised add per place in the window, newest first."""
    total = x[skip:].copy()
    for k in range(1, span):
        lo = max(skip, k)  # window ends with a value k back
        if lo >= len(x):
            break
        total[lo - skip :] += x[lo - k : len(x) - k]
    return total


def window_sums_list(values: list[float], span: int, skip: int) -> list[float]:
    """``window_sums`` in plain floats, added in the same order: each window reversed (a
    slice), then summed left to right by ``reduce`` (not ``sum``, whose float adds are
    compensated from Python 3.12 on)."""
    return [functools.reduce(operator.add, values[end : end - span if end >= span else None : -1])
            for end in range(skip, len(values))]



def geometric_mean(x: np.ndarray, floor: float = 0.0) -> float:
    """exp(mean(log x)), values below ``floor`` counted as ``floor`` (>0 where x may hold zeros)."""
    return float(np.exp(np.mean(np.log(np.maximum(x, floor)))))


