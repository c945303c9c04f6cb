"""The loss rules: each run judged against itself.

A LoRA run's loss has no level that means "fried" across tasks: an epsilon-prediction SD 1.5
run, a v-prediction run with min-SNR weighting and a flow-matching DiT sit at levels an order
of magnitude apart, and a run that first improves to a tenth of its base model's loss and then
fries can stay below that base. What every run has is its own best level and its own noise:

- ``TrainingLossRule``: the level of the last ``window`` losses (a geometric mean: a diffusion
  loss swings ~30x with the random timestep and is close to log-normal, so its log-mean is
  the steady part) against the lowest level the run reached before that window (its first
  losses, the base model, included), beyond what the run's own spread allows by chance;
- ``ValidationRule``: a validation loss at fixed timesteps and seed (kohya's
  ``--validation_split``, OneTrainer's validation concepts) against its own best so far. It is
  steady where the training loss is not, so one point decides. Where it was logged since before
  the training loss's best, the training loss's rule only warns; a fry inside the first
  validation interval leaves the validation loss no healthy point, and the training loss decides.

A non-finite loss, and a loss of exactly 0 (ai-toolkit logs a NaN loss as 0.0 and trains on;
a diffusion loss is never 0), is a blow-up whatever the scale.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from lrwatch.rules.core import (
    CRITICAL,
    WARNING,
    Finding,
    Spacing,
    Stale,
    first_true,
    samples,
    window_sums,
)
from lrwatch.rules.kinds import Basis, Kind


def levels(loss: np.ndarray, window: int, first_end: int) -> tuple[np.ndarray, np.ndarray]:
    """The level (geometric mean) and the spread (standard deviation of the logs) of the
    ``window`` losses ending at each index from ``first_end`` on. ``loss`` is positive."""
    lo = first_end - window + 1
    logs = np.log(loss[lo:])
    sums = window_sums(logs, window, window - 1)
    squares = window_sums(logs * logs, window, window - 1)
    level = np.exp(sums / window)
    if window < 2:
        return level, np.zeros(len(level))
    spread = np.sqrt(np.maximum(squares - sums * sums / window, 0.0) / (window - 1))
    return level, spread


BASE_FRACTION = 0.4  # the run's first losses (its base model: a LoRA's B starts at zero) are one candidate of
# its best level from this fraction of a window on, so a fry inside the first window is measured against them


def base_window(window: int) -> int:
    """Losses of the base candidate: at least 2 (a spread needs two)."""
    return max(2, math.ceil(BASE_FRACTION * window))


def upper_levels(level: np.ndarray, spread: np.ndarray, width: float, sigmas: float) -> np.ndarray:
    """Each level raised by what chance allows it: level x exp(sigmas x spread x width), with
    ``width`` sqrt(1/a + 1/b) for two windows of a and b losses (at batch 1, spread ~0.9, two
    25-loss levels differ by ~1.7x at two standard errors; at batch 4, ~0.4, by ~1.3x). The
    lowest of these is the run's best level that noise cannot explain away."""
    return level * np.exp(sigmas * spread * width)


# Windows a run has had when its allowance for chance starts to widen (500 losses at 25 a window).
# Measured on flat log-normal losses at spread 1.0 (batch 1's): 1 in 400 runs of 1,000, 2,000 and
# 5,000 steps gets a critical (0 of 400 at spread 0.8). With 10, mlp_eps loses a fry caught in
# time and no false critical goes away; with 40, 1 in 133 runs of 2,000 steps gets one.
REFERENCE_WINDOWS = 20


def compared(losses: np.ndarray, window: int) -> np.ndarray:
    """How much wider than at ``REFERENCE_WINDOWS`` the chance allowance is after ``losses``
    losses: sqrt(ln k / ln 20) for k windows (1 up to 20). The best level is the lowest of k
    window levels and the level judged the highest of as many: on a flat log-normal loss both
    stray ~sqrt(2 ln k) standard errors, so a fixed allowance that holds for 1,000 steps
    fails a long healthy run (a flat loss at log-spread 1.0, batch 1's, got a critical in 14
    of 20 runs of 10,000 steps; ``tests/test_rules_loss.py``)."""
    k = np.maximum(losses / window, REFERENCE_WINDOWS)
    return np.sqrt(np.log(k) / math.log(REFERENCE_WINDOWS))


class Candidate(NamedTuple):
    """A stretch of losses that may be the run's best level."""

    upper: float  # its level raised by what chance allows (``upper_levels``)
    level: float
    first_step: int
    last_step: int
    length: int  # losses


class TrainingLossRule:
    """The training loss far above the run's own best level. Fed the loss series in step order;
    carries the best candidate (its level raised by chance, its level, its first step) of the
    windows already passed. The candidates: every window of ``window`` losses that ends before
    the window judged begins, and the run's first ``base_window`` losses. Indices count from the
    run's first loss; ``loss`` and ``steps`` hold the losses from index ``first`` on (a run read
    in parts keeps only what ``let_go`` asks for)."""

    def __init__(self, tag: str, window_steps: int, over_best: float, sigmas: float, per_update: int) -> None:
        self.tag, self.window_steps, self.over_best, self.sigmas = tag, window_steps, over_best, sigmas
        self.per_update = per_update
        self.findings: list[Finding] = []
        self.steps, self.loss = np.zeros(0, np.int64), np.zeros(0)
        self.first = 0  # index of ``loss[0]``
        self.n = 0  # losses seen
        self.spacing = Spacing()
        self.gap = 1.0
        self.window: int | None = None  # losses per window
        self.usable_upto: int | None = None  # the first non-finite or non-positive loss: the level stops there
        self.unusable_step: int | None = None  # its step
        self.checked_upto = 0  # window ends checked so far
        self.best: Candidate | None = None  # the lowest candidate (raised by chance) among those passed
        self.found = False
        self.validation_from: int | None = None  # the first step of a validation loss, if one is logged
        self.spread_sums = np.zeros(0)  # running sums of the windows' spreads, from the first window on
        self.spread_base = 0  # sums let go of before ``spread_sums[0]``
        self.spread_next = 0  # the end of the first window not summed yet

    def extend(self, steps: np.ndarray, loss: np.ndarray, first: int = 0) -> None:
        """The series with its new losses; ``first``: the index of ``loss[0]``."""
        i0 = self.n
        if first + len(steps) <= i0:
            return
        self.steps, self.loss, self.first, self.n = steps, loss, first, first + len(steps)
        self.gap = self.spacing.add(steps, i0 - first)
        window = samples(self.gap, self.window_steps, self.per_update)
        if self.window is not None and window != self.window and i0:
            raise Stale("the steps between logged losses changed")
        self.window = window
        if self.usable_upto is None:
            self._unusable(i0)
        n = self.n if self.usable_upto is None else self.usable_upto
        if not self.found:
            self._level(n)

    def let_go(self) -> int:
        """Let go of the spreads' sums no window will read again; return the first loss the
        rule still needs."""
        w = self.window
        if w is None or self.best is None:
            return 0  # the base candidate (the run's first losses) is not taken yet
        if self.found or self.usable_upto is not None:
            return self.n
        keep = max(0, self.checked_upto - 2 * w - 2)  # the next update's first window and its candidates
        done = keep - (w - 1)  # the spreads' sums from here on are read
        if done > self.spread_base:
            self.spread_sums = self.spread_sums[done - self.spread_base :].copy()
            self.spread_base = done
        return keep

    def _unusable(self, i0: int) -> None:
        f = self.first
        new = self.loss[i0 - f :]
        bad = first_true(~(np.isfinite(new) & (new > 0)))
        if bad is None:
            return
        i = i0 + bad
        self.usable_upto = i
        value, step = float(self.loss[i - f]), int(self.steps[i - f])
        self.unusable_step = step
        if math.isfinite(value) and value < 0:
            return  # not a diffusion loss (``notes`` says the level is not checked past it)
        if value == 0:
            message = (f"{self.tag} is exactly 0 at step {step}: a diffusion loss never is; ai-toolkit logs a "
                       "NaN loss as 0.0 and trains on")
            what = f"zero_{self.tag}"
        else:
            message, what = f"{self.tag} is {value} at step {step}", f"nonfinite_{self.tag}"
        self.findings.append(Finding(Kind.BLOWUP, CRITICAL, None, step, message,
                                     {"what": what, "value": None if math.isnan(value) else value}, Basis.LOSS))

    def _level(self, n: int) -> None:
        w = self.window
        assert w is not None
        m = base_window(w)
        first = max(self.checked_upto, m + w - 1)  # the first end with the base candidate before its window
        if first >= n:
            return
        f = self.first
        if self.best is None:  # the base candidate, once (nothing was let go before it: ``let_go``)
            self.spread_next = w - 1  # the first window's end
            level, spread = levels(self.loss[:m], m, m - 1)
            upper = upper_levels(level, spread, math.sqrt(1 / m + 1 / w), self.sigmas)
            self.best = Candidate(float(upper[0]), float(level[0]), int(self.steps[0]), int(self.steps[m - 1]), m)
        self.checked_upto = n
        carried = self.best
        lo = max(first - w, w - 1)  # window candidates from here on become usable in this update
        level, spread = levels(self.loss[: n - f], w, lo - f)  # ends lo .. n-1
        upper = upper_levels(level, spread, math.sqrt(2 / w), self.sigmas)
        usable = max(0, n - w - lo)  # ends lo .. n-1-w: each a candidate for the end w later
        running = np.minimum.accumulate(np.concatenate(([carried.upper], upper[:usable])))
        # which candidate is the running best: 0 the carried one, c + 1 the window ending at lo + c
        which = np.maximum.accumulate(np.where(np.concatenate(([True], upper[:usable] == running[1:])),
                                               np.arange(usable + 1), 0))
        ends = np.arange(first, n)
        k = np.clip(ends - w - lo + 1, 0, usable)  # the best before each end, in ``running``

        def candidate(c: int) -> Candidate:
            if c == 0:
                return carried
            start = lo + c - w - f  # its first loss, in ``loss``
            return Candidate(float(running[c]), float(level[c - 1]), int(self.steps[start]),
                             int(self.steps[start + w - 1]), w)

        self.best = candidate(int(which[usable]))
        now = level[first - lo :]
        chosen = which[k]  # the best candidate before each end
        best_level = np.where(chosen == 0, carried.level, level[np.maximum(chosen - 1, 0)])
        # What chance allows grows with how many windows the run has had: the best is the lowest of
        # them, and each new one is another draw (``compared``).
        typical = self._typical_spread(spread, lo, first, n)  # the run's own noise at each end
        # Chance moves two levels: the best's (its own spread: ``own`` is sigmas x that x sqrt(1/a + 1/w))
        # and the judged window's, whose spread is the run's typical one (the best's until windows exist).
        own = np.log(running[k] / best_level)
        judged = np.sqrt(own * own / 2 + (self.sigmas * typical) ** 2 / w)
        chance = np.where(np.isnan(typical), own, np.maximum(own, judged))  # never less than the best's alone
        allowed_by_chance = np.exp(chance * compared(ends + 1, w))
        hit = first_true(now >= self.over_best * best_level * allowed_by_chance)
        if hit is None:
            return
        self.found = True
        i = first + hit
        best = candidate(int(chosen[hit]))
        ratio, allowed = float(now[hit] / best.level), float(allowed_by_chance[hit])
        step, since = int(self.steps[i - f]), best.first_step
        decided = self.validation_from is not None and self.validation_from <= since
        self.findings.append(Finding(
            Kind.BLOWUP, WARNING if decided else CRITICAL, None, step,
            f"{self.tag} far above the run's own best: geometric mean of the last {w} losses (steps "
            f"{int(self.steps[i - w + 1 - f])}-{step}) {now[hit]:.3g} is {ratio:.1f}x its best level before (the "
            f"{best.length} losses of steps {since}-{best.last_step}: "
            f"{best.level:.3g}), {ratio / allowed:.1f}x beyond the {allowed:.2f}x their spread allows by chance"
            + (" (a warning: the validation loss, logged since before that best, decides)" if decided else ""),
            {"what": "loss_above_best", "ratio": round(ratio, 4), "loss": float(now[hit]), "best": best.level,
             "window_from_step": int(self.steps[i - w + 1 - f]),
             "best_from_step": since, "chance": round(allowed, 4), "ratio_beyond_chance": round(ratio / allowed, 4)},
            Basis.LOSS))

    def _typical_spread(self, spread: np.ndarray, lo: int, first: int, n: int) -> np.ndarray:
        """For each end from ``first`` to ``n - 1``, the mean spread of the windows that are
        candidates there (ending a window or more before it): the run's noise, not its best
        candidate's (the lowest level tends to be a window that was also calm by chance, whose
        own spread then allows too little), and not the judged rise's own. NaN before any.
        ``spread`` holds the spreads of the windows ending at ``lo`` .. ``n - 1``."""
        w = self.window
        assert w is not None
        new = spread[self.spread_next - lo:]  # windows ending spread_next .. n-1: their running sums
        done = self.spread_next - (w - 1)
        b = self.spread_base  # (sums before it were let go of: ``let_go``)
        if done - b + len(new) > len(self.spread_sums):
            grown = np.empty(max(2 * len(self.spread_sums), done - b + len(new)))
            grown[: done - b] = self.spread_sums[: done - b]
            self.spread_sums = grown
        self.spread_sums[done - b : done - b + len(new)] = ((self.spread_sums[done - 1 - b] if done else 0.0)
                                                            + np.cumsum(new))
        self.spread_next = n
        last = np.arange(first, n) - w - (w - 1)  # index of the last candidate window for each end
        typical = np.full(len(last), np.nan)
        some = last >= 0
        typical[some] = self.spread_sums[last[some] - b] / (last[some] + 1)
        return typical

    def notes(self) -> list[str]:
        """How the loss could be judged."""
        notes = []
        if self.usable_upto is not None and not self.findings:
            notes.append(f"{self.tag} is negative from step {self.unusable_step}: its level is not "
                         "checked past it (only non-finite values are)")
        if self.gap > self.per_update and self.window is not None:
            notes.append(f"{self.tag} is logged every {self.gap / self.per_update:g} steps: the loss rule takes "
                         f"{self.window} losses per window ({self.window * self.gap / self.per_update:g} steps), so a "
                         "fry shows there later than in a run that logs every step")
        return notes


class ValidationRule:
    """A validation loss far above its own best so far, or non-finite: evidence, critical."""

    def __init__(self, tag: str, over_best: float) -> None:
        self.tag, self.over_best = tag, over_best
        self.findings: list[Finding] = []
        self.seen = 0
        self.best = math.inf
        self.found = False
        self.first_step: int | None = None

    def extend(self, steps: np.ndarray, values: np.ndarray, first: int = 0) -> None:
        """The series with its new points; ``first``: the index of ``steps[0]``."""
        if self.first_step is None and len(steps):
            self.first_step = int(steps[0])
        for step, value in zip(steps[self.seen - first :].tolist(), values[self.seen - first :].tolist()):
            if self.found:
                break
            if not math.isfinite(value):
                self._found(step, f"{self.tag} is {value} at step {step}", {"what": f"nonfinite_{self.tag}"})
            elif value >= self.over_best * self.best:
                ratio = value / self.best
                self._found(step, f"{self.tag} {value:.3g} at step {step} is {ratio:.2f}x its best so far "
                                  f"({self.best:.3g})",
                            {"what": "validation_above_best", "ratio": round(ratio, 4), "loss": value,
                             "best": self.best})
            else:
                self.best = min(self.best, value)
        self.seen = first + len(steps)

    def _found(self, step: int, message: str, values: dict) -> None:
        self.found = True
        self.findings.append(Finding(Kind.BLOWUP, CRITICAL, None, step, message, values, Basis.VALIDATION))
