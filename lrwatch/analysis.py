"""From a run's series to cycles and findings.

Every quantity at step t is computed from data at steps <= t only (running
maxima, trailing windows, the current cycle's peak so far). A finding's step is
therefore the first step at which it could have been known: a finished run gives
the findings a live watcher would have printed, and analysing a longer prefix of
a run never moves or removes an earlier finding. That is what lets the watcher
update a run's analysis with its new points only (``Analyser``): the rules carry
what they keep of the earlier points, and an audit is the same code fed the whole
run at once. The rules work on numpy arrays; a watched update's few new points
(``SMALL_UPDATE``) take the same steps in plain floats, where numpy's fixed cost per
call would be most of the work (tests hold the two to the same floats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from lrwatch.options import OptionError
from lrwatch.rules.core import (
    CRITICAL,
    SMALL_UPDATE,
    WARNING,
    Finding,
    Spacing,
    Stale,
    first_nonfinite,
    first_true,
    points,
    samples,
    spacing,
)
from lrwatch.rules.kinds import Basis, Kind
from lrwatch.rules.loss import TrainingLossRule, ValidationRule
from lrwatch.runs import GrowingArray, Run, RunLike, Series
from lrwatch.schedule_config import KnownSchedule, known_schedule
from lrwatch.tags import Group, TagMap
from lrwatch.trainers import (
    DIFFERS,
    PENDING,
    SAME,
    Reading,
    group_match,
    read_layout,
    twin_candidates,
)

__all__ = ["CRITICAL", "WARNING", "Analyser", "Analysis", "Basis", "Finding", "Kind", "Thresholds", "analyze",
           "points", "samples", "spacing"]


@dataclass(frozen=True)
class Thresholds:
    """When a finding fires. The README's threshold table explains each default and how it was
    chosen (leave-one-task-out over the tasks of ``fixtures/tasks.py``: ``bench/transfer.py``)."""

    restart_jump: float = 0.25  # lr rising by this fraction of the cycle's peak, from below it, is a restart
    risk_warning: float = 2.0  # predicted d*lr at the next restart / highest d*lr so far: a warning
    # A prediction at this ratio after d's warm-up is a strong one: still a warning (healthy runs'
    # restarts landed at 13-49x, frying ones at 1-3x), the one `--kill-at predict` acts on.
    risk_stop: float = 4.0
    runaway_window: int = 50  # steps over which d's growth is measured
    runaway_warning: float = 3.0  # d grew by this factor within the window (after d's warm-up)
    runaway_critical: float = 100.0  # chosen leave-one-task-out: at 10, healthy DAdaptAdaGrad runs were critical
    settle_growth: float = 1.1  # d's warm-up is over once it grows less than this over a window ...
    settle_climb: float = 10.0  # ... after it has climbed this far above its first value (out of d0)
    # The training loss against the run's own best level (lrwatch.rules.loss.TrainingLossRule):
    loss_window: int = 25  # steps (and at least as many losses) whose geometric mean is the loss's level
    loss_over_best: float = 1.5  # critical when the level reaches this multiple of its best so far, ...
    loss_noise_sigmas: float = 4.0  # ... times the chance factor of this many standard errors of the run's spread
    validation_over_best: float = 2.0  # a validation loss at this multiple of its best so far: critical
    restart_spike: float = 4.0  # d*lr right after a restart / highest d*lr before it
    tiny_lr: float = 1e-6  # lr below this fraction of its highest is treated as zero (d unknown)

    def __post_init__(self) -> None:
        if self.risk_stop < self.risk_warning or self.runaway_critical < self.runaway_warning:
            raise OptionError("a critical threshold (or risk_stop) must not be below its warning threshold")
        ratios = (self.risk_warning, self.runaway_warning, self.restart_spike, self.settle_growth, self.settle_climb,
                  self.loss_over_best, self.validation_over_best)
        if not all(math.isfinite(r) and r > 1 for r in ratios):
            raise OptionError("ratios must be finite and above 1")
        if min(self.runaway_window, self.loss_window) < 1:
            raise OptionError("windows must be at least 1 step")
        if not 0 < self.restart_jump <= 1:
            raise OptionError("restart_jump must be in (0, 1]")
        if not 0 <= self.tiny_lr < 1:
            raise OptionError("tiny_lr must be in [0, 1)")
        if not (math.isfinite(self.loss_noise_sigmas) and self.loss_noise_sigmas >= 0):
            raise OptionError("loss_noise_sigmas must be finite and at least 0")


@dataclass
class Cycle:
    index: int
    start: int
    end: int
    peak_lr: float
    min_lr: float
    min_lr_step: int
    d_start: float | None
    d_end: float | None
    d_growth: float | None
    peak_dlr: float | None
    complete: bool


@dataclass
class GroupAnalysis:
    name: str
    lr_tag: str | None
    dlr_tag: str | None
    steps: np.ndarray
    lr: np.ndarray | None  # None: not logged (never NaN for "absent")
    dlr: np.ndarray | None
    d: np.ndarray  # NaN where unknown (no lr or d*lr, lr zero or tiny before any known d)
    cycle_peak: np.ndarray  # the highest (finite) lr of the current cycle so far, at every point
    restarts: list[int]
    cycles: list[Cycle]
    risk: float | None  # predicted d*lr at the next restart / highest d*lr so far, now
    next_restart: int | None  # from the logged config, when known
    d_tag: str | None = None
    risk_series: np.ndarray | None = None  # the risk at every point (NaN where no restart is predicted)

    @property
    def adaptive(self) -> bool:
        return self.dlr is not None

    @property
    def d_now(self) -> float | None:
        known = self.d[np.isfinite(self.d)]
        return float(known[-1]) if len(known) else None

    def drop_curves(self) -> None:
        """Keep only the last point of every per-point array (d: the last known d): what the
        report says stays (d now, risk, restarts, cycles); the curves that snapshot verdicts,
        the TensorBoard export and the plot draw on go. Copies, so the full arrays are freed."""
        d_now = self.d_now
        self.steps = self.steps[-1:].copy()
        self.lr = None if self.lr is None else self.lr[-1:].copy()
        self.dlr = None if self.dlr is None else self.dlr[-1:].copy()
        self.d = np.array([np.nan if d_now is None else d_now])
        self.cycle_peak = self.cycle_peak[-1:].copy()
        self.risk_series = None if self.risk_series is None else self.risk_series[-1:].copy()


@dataclass
class Analysis:
    groups: list[GroupAnalysis]
    findings: list[Finding]
    loss_tag: str | None
    last_step: int | None
    schedule: KnownSchedule | None
    notes: list[str]
    unrecognised: dict[str, int] = field(default_factory=dict)  # scalar tag -> points, when nothing was checked
    validation_tag: str | None = None  # a validation loss: it decides criticals, snapshot verdicts and the best one
    trainer: str | None = None  # the layout the tags were read as (lrwatch.trainers)
    trainer_why: str | None = None

    @property
    def checked(self) -> bool:
        """Whether any lr, d*lr or loss tag was recognised: otherwise nothing was checked."""
        return bool(self.groups) or self.loss_tag is not None

    @property
    def worst(self) -> str | None:
        severities = {f.severity for f in self.findings}
        return CRITICAL if CRITICAL in severities else WARNING if WARNING in severities else None


def analyze(run: RunLike, tag_map: TagMap | None = None, thresholds: Thresholds | None = None,
            reading: Reading | None = None) -> Analysis:
    """Findings for ``run``, its tags read as ``reading`` says (else: ``tag_map``, else detected)."""
    return Analyser(thresholds).update(run, reading or read_layout(run, tag_map=tag_map))


def _in_logged_steps(th: Thresholds, scale: int) -> Thresholds:
    """Windows and grace periods are in optimizer steps; a trainer that counts batches (OneTrainer
    with gradient accumulation) logs ``scale`` steps per update."""
    if scale == 1:
        return th
    return replace(th, runaway_window=th.runaway_window * scale, loss_window=th.loss_window * scale)


def adaptive_optimizer_hint(optimizer: str, source: str) -> str | None:
    """For a run that logged no d*lr: if ``optimizer`` (from the logged config or a snapshot's
    metadata) is Prodigy or D-Adaptation, say why d*lr is missing and what to pass instead."""
    name = optimizer.split("(")[0].strip()
    cls = name.rsplit(".", 1)[-1]
    if "prodigy" not in cls.lower() and not cls.lower().startswith("dadapt"):
        return None
    instead = "Prodigy" if cls.lower() == "prodigy" else cls
    return (f"{source} names the optimizer {name!r}, an adaptive one, but no d*lr was logged, so d cannot be "
            f"checked: kohya logs d*lr only when --optimizer_type is exactly 'Prodigy' or starts with 'DAdapt' "
            f"(a dotted name like 'prodigyopt.Prodigy' trains the same but logs none); pass --optimizer_type "
            f"{instead}")


def _coverage_notes(groups: list[GroupAnalysis], loss_tag: str | None, config: dict[str, object],
                    reading: Reading) -> list[str]:
    """What could and could not be checked: never a silent pass."""
    notes = []
    for g in groups:
        if g.dlr_tag and g.lr is None and not reading.layout.lr_tags_hold_dlr:  # (those say so themselves)
            notes.append(f"{g.dlr_tag} has no lr partner: d and restarts cannot be computed for group {g.name} "
                         "(give the raw lr's tag with --lr-tag); only non-finite values are checked there")
    if not groups and loss_tag is None:
        return notes  # nothing checked: the report lists the tags it saw
    if not any(g.adaptive for g in groups):
        checked = "lr and loss are" if groups and loss_tag else "the lr is" if groups else "the loss is"
        if reading.layout.name == "diffusers":
            notes.append(f"d is not logged by this trainer ({reading.layout.title}): only {checked} checked")
        else:
            notes.append(f"no adaptive optimizer seen (no d*lr tag): only {checked} checked")
        optimizer = config.get("optimizer_type")
        hint = adaptive_optimizer_hint(str(optimizer), "the logged config") if optimizer else None
        if hint:
            notes.append(hint)
    elif loss_tag is None:
        notes.append("no loss tag seen: the loss is not checked")
    return notes


def validation_hint(layout: str) -> str:
    """Said once per run that logs a loss but no validation loss: how to log one."""
    how = {
        "kohya": "with kohya sd-scripts: --validation_split 0.1 --validate_every_n_steps N, N your save interval",
        "kohya-base-lr": "with sd-scripts: --validation_split 0.1 --validate_every_n_steps N, N your save interval",
        "onetrainer": "with OneTrainer: turn validation on and mark a concept as a validation concept",
    }.get(layout, "kohya sd-scripts (--validation_split) and OneTrainer (validation concepts) log one that "
                   "lrwatch reads; this trainer's is not read yet")
    return (f"no validation loss logged, so the noisy training loss is the only evidence of a fry; a validation "
            f"loss at fixed timesteps is steadier and decides better ({how})")


def _drop_shadowed_warnings(findings: list[Finding]) -> list[Finding]:
    """A warning raised at the same step as its critical (or strong) twin says nothing more."""
    def top(f: Finding) -> bool:
        return f.severity == CRITICAL or bool(f.values.get("strong"))

    tops = {(f.kind, f.group, f.values.get("cycle"), f.step) for f in findings if top(f)}
    return [f for f in findings if top(f) or (f.kind, f.group, f.values.get("cycle"), f.step) not in tops]


def _joined(run: RunLike, group: Group, schedule: KnownSchedule | None = None, after: int | None = None
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Steps where the group's series were logged (after step ``after``, when given), with lr
    and d*lr there; a series that was not logged (and cannot be derived) is None (absent, never
    NaN). Derived: d*lr = lr * d (lr and d logged), lr = d*lr / d (SimpleTuner), lr from the
    schedule (only d*lr logged)."""
    lr = _after(run.recent(group.lr_tag) if group.lr_tag else None, after)
    dlr = _after(run.recent(group.dlr_tag) if group.dlr_tag else None, after)
    d = _after(run.recent(group.d_tag) if group.d_tag else None, after)
    known = lr if dlr is None else dlr if lr is None else None  # exactly one of lr and d*lr logged
    if d is not None and known is not None:
        steps, k, dv = paired(known, d)
        if lr is not None:
            return steps, k, k * dv
        return steps, np.where(dv != 0, k / dv, np.nan), k
    if lr is None and dlr is None:
        return np.zeros(0, np.int64), None, None
    if dlr is None:
        return lr[0], lr[1], None  # type: ignore[index]
    if lr is None:
        if schedule is not None and schedule.lr_at is not None:
            return dlr[0], schedule.lr_at(dlr[0]), dlr[1]
        return dlr[0], None, dlr[1]
    return paired(lr, dlr)


def paired(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The steps both series have, with each one's values there (nearly always every step)."""
    if len(a[0]) == len(b[0]) and (a[0].tolist() == b[0].tolist() if len(a[0]) <= SMALL_UPDATE
                                   else np.array_equal(a[0], b[0])):
        return a[0], a[1], b[1]
    steps, i, j = np.intersect1d(a[0], b[0], assume_unique=True, return_indices=True)
    return steps, a[1][i], b[1][j]


def _after(series: Series | None, step: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) of the series' points after ``step`` (all, when None)."""
    if series is None:
        return None
    start = 0 if step is None else int(series.steps.searchsorted(step, side="right"))
    return series.steps[start:], series.values[start:]


_RESTART_CHUNK = 4096


def find_restarts(lr: np.ndarray, jump: float, carry: float = -np.inf) -> np.ndarray:
    """Indices where the lr restarts: it rises by at least ``jump`` x the current cycle's peak
    from below that peak. A warmup rises from its own peak, so it never qualifies; float
    noise is far below ``jump``. Searched chunk by chunk with the cycle's peak carried
    across chunks, so each restart costs only the distance to it. ``carry``: the cycle's
    peak up to ``lr[0]`` (a run read in parts)."""
    finite = np.where(np.isfinite(lr), lr, -np.inf)
    n = len(finite)
    out: list[int] = []
    pos = 0  # carry: the cycle's peak before index `pos`
    while pos < n - 1:
        seg = finite[pos : min(n, pos + _RESTART_CHUNK)]
        peak = np.maximum(np.maximum.accumulate(seg), carry)  # cycle peak up to and including each index
        prev_peak, prev, cur = peak[:-1], seg[:-1], seg[1:]
        hit = first_true((prev < prev_peak) & (cur - prev >= jump * prev_peak) & (prev_peak > 0))
        if hit is not None:
            pos, carry = pos + 1 + hit, -np.inf  # a new cycle starts at the restart
            out.append(pos)
        elif pos + len(seg) >= n:
            break
        else:  # overlap one point so the pair across the chunk boundary is checked too
            pos, carry = pos + len(seg) - 1, peak[-2]
    return np.asarray(out, dtype=np.int64)


class Analyser:
    """A run's analysis, kept up to date as the run grows: each update reads only the points
    after the ones it has seen, carrying what the rules keep (running maxima, the current
    cycle, whether d has settled, which cycles have had a finding), so its work is
    proportional to what changed, not to the run's length. The rules are causal, so an
    update gives exactly what a full analysis of the same points gives (a test pins it);
    whatever could change what was seen (steps that went back, a rewritten file, new tags,
    another reading or config, a different step spacing) starts it again from the run's
    first point. ``analyze`` is one update of a new Analyser."""

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.thresholds = thresholds or Thresholds()
        self.fresh_starts = 0  # analyses that read the run from its first point
        self._rules: _RunRules | None = None
        self._roles: tuple[list[str], TagMap, tuple] | None = None  # (tags, tag map, what they are read as)

    def update(self, run: RunLike, reading: Reading) -> Analysis:
        tags = run.tags
        if self._roles is None or self._roles[:2] != (tags, reading.tag_map):
            self._roles = (tags, reading.tag_map, _roles(tags, reading.tag_map))
        key = _reading_key(run, reading, self._roles[2])
        rules = self._rules
        if rules is not None and rules.key == key:
            try:
                return rules.extend(run)
            except Stale:
                pass
            except BaseException:
                self._rules = None  # half-updated: never extended again
                raise
        self._rules = None
        self.fresh_starts += 1
        rules = _RunRules(run, reading, self.thresholds, key)
        analysis = rules.extend(run)
        self._rules = rules
        return analysis

    def forget(self, run: Run) -> None:
        """Let the run and the rules go of the points the rules no longer need (``Run.forget``):
        what a long run costs is then what the rules carry, not its length. The analysis's
        curves keep only their recent points from then on; a fresh start (above) reads the
        run's files again for the rest."""
        if self._rules is not None:
            run.forget(self._rules.let_go(run))


def _reading_key(run: RunLike, reading: Reading, roles: tuple) -> tuple:
    return (reading.layout.name, reading.why, reading.tag_map, reading.schedule, tuple(reading.notes),
            reading.steps_per_update, roles, run.config_version)


def _roles(tags: list[str], tag_map: TagMap) -> tuple:
    """What the rules read the tags as: a new tag that is none of these (kohya's epoch loss,
    logged once an epoch ends) changes nothing they found."""
    found = set(tags)
    return tuple(tag_map.groups(found)), tag_map.loss_tag(found), tag_map.validation_tag(found)


class _RunRules:
    """One run's rules: a param group's each, and the loss's."""

    def __init__(self, run: RunLike, reading: Reading, thresholds: Thresholds, key: tuple) -> None:
        self.key, self.reading = key, reading
        self.th = th = _in_logged_steps(thresholds, reading.steps_per_update)
        self.schedule = reading.schedule or known_schedule(run.config)
        tags = set(run.tags)
        groups = reading.tag_map.groups(tags)
        self.loss_tag = reading.tag_map.loss_tag(tags)
        self.validation_tag = reading.tag_map.validation_tag(tags)
        used = {t for g in groups for t in (g.lr_tag, g.dlr_tag, g.d_tag) if t}
        self.used = sorted(used | {t for t in (self.loss_tag, self.validation_tag) if t})
        if any((kept := run.recent(tag)) is not None and kept.first for tag in self.used):
            run.series(self.used[0])  # a fresh start over a run read in parts: every point again, from the files
        self.twins = [_TwinPair(g, k) for g, named in twin_candidates(groups) for k in named]
        folded = self._compare_twins(run)  # kohya's twin groups: one group each
        self.groups = [_GroupRules(g, self.schedule, th) for g in groups if g.name not in folded]
        self.loss = TrainingLossRule(self.loss_tag, th.loss_window, th.loss_over_best, th.loss_noise_sigmas,
                                     reading.steps_per_update) if self.loss_tag else None
        self.validation = ValidationRule(self.validation_tag, th.validation_over_best) if self.validation_tag else None
        self.seen: dict[str, tuple[int, int]] = {}  # tag -> (points, points replaced) at the last update
        self.reads = run.reads  # of the run's points from the start (``RunLike.reads``)

    def extend(self, run: RunLike) -> Analysis:
        self._check_appended(run)
        self._check_twins(run)
        loss_notes: list[str] = []
        with np.errstate(divide="ignore", invalid="ignore"):  # the rules' NaN and inf mean "unknown"
            for rules in self.groups:
                rules.extend(*_joined(run, rules.group, self.schedule, rules.last_step))
            if self.validation is not None and (series := run.recent(self.validation.tag)) is not None:
                self.validation.extend(series.steps, series.values, series.first)
            if self.loss is not None and (series := run.recent(self.loss.tag)) is not None:
                self.loss.validation_from = self.validation.first_step if self.validation else None
                self.loss.extend(series.steps, series.values, series.first)
                loss_notes = self.loss.notes()
        return self._analysis(run, loss_notes)

    def _check_appended(self, run: RunLike) -> None:
        seen = {}
        for tag in self.used:
            series = run.recent(tag)
            if series is None:
                continue
            before = self.seen.get(tag)
            if before is not None and (series.total < before[0] or series.replaced != before[1]):
                raise Stale(tag)
            seen[tag] = (series.total, series.replaced)
        if run.reads != self.reads:  # (above: a series that needed every point read them all again)
            raise Stale("the run was read again from its files")
        self.seen = seen

    def let_go(self, run: RunLike) -> dict[str, int]:
        """Let the rules go of their own points they no longer need, and return, for each tag
        they read, the index of the run's first point they still need."""
        keep: dict[str, int] = {}

        def need(tag: str | None, index: int) -> None:
            if tag is not None:
                keep[tag] = min(keep.get(tag, index), index)

        for tag in self.used:
            if (series := run.recent(tag)) is not None:
                need(tag, series.total)
        for rules in self.groups:
            last = rules.last_step
            for group_tag in (rules.group.lr_tag, rules.group.dlr_tag, rules.group.d_tag):
                if group_tag is not None and (kept := run.recent(group_tag)) is not None:
                    after = kept.first + int(kept.steps.searchsorted(last, side="right")) if last is not None else 0
                    need(group_tag, after)
            rules.forget()
        for pair in self.twins:
            if pair.status != DIFFERS:
                for tag in pair.tags():
                    need(tag, pair.compared)
        if self.loss is not None:
            need(self.loss.tag, self.loss.let_go())
        if self.validation is not None:
            need(self.validation.tag, self.validation.seen)
        return keep

    def _compare_twins(self, run: RunLike) -> set[str]:
        """The ``group<i>`` groups that are twins of another group (kohya logs each group
        twice), compared on their new points only."""
        for pair in self.twins:
            if pair.status != DIFFERS:  # (differing points stay: only appends are extended)
                pair.status = group_match(run, pair.group, pair.twin, pair.compared)
                pair.compared = min((s.total for t in pair.tags() if (s := run.recent(t)) is not None), default=0)
        return {pair.group.name for pair in self.twins if pair.status == SAME}

    def _check_twins(self, run: RunLike) -> None:
        """A fold that changes changes the groups: analyse again."""
        if not self.twins:
            return
        folded = self._compare_twins(run)
        kept = {r.group.name for r in self.groups}
        if folded & kept or any(pair.group.name not in folded | kept for pair in self.twins):
            raise Stale("the groups folded as kohya's twins changed")

    def _analysis(self, run: RunLike, loss_notes: list[str]) -> Analysis:
        reading, schedule = self.reading, self.schedule
        groups = [r.result() for r in self.groups]
        findings = [f for r in self.groups for f in r.findings]
        notes = list(reading.notes)
        if self.loss is not None:
            findings += self.loss.findings
            notes += loss_notes
        if self.validation is not None:
            findings += self.validation.findings
            notes.append(f"validation loss {self.validation.tag} decides: a critical from the loss, the snapshot "
                         "verdicts and the best snapshot come from it (the training loss only warns where the "
                         "validation loss was logged since before the training loss's best)")
        notes += _coverage_notes(groups, self.loss_tag, run.config, reading)
        if self.loss is not None and self.validation is None:
            notes.append(validation_hint(reading.layout.name))
        if schedule is not None and schedule.problem:
            notes.append(f"the logged schedule could not be used ({schedule.problem}): restarts are found from the lr")
        notes += [f"logged configuration not read: {p}" for p in run.config_problems]
        last = [int(g.steps[-1]) for g in groups if len(g.steps)]
        if self.loss is not None and len(self.loss.steps):
            last.append(int(self.loss.steps[-1]))
        findings = _drop_shadowed_warnings(findings)
        findings.sort(key=lambda f: (f.step, f.severity != CRITICAL, f.kind))
        analysis = Analysis(groups, findings, self.loss_tag, max(last) if last else None, schedule, notes,
                            validation_tag=self.validation_tag, trainer=reading.layout.name,
                            trainer_why=reading.why)
        if not analysis.checked:
            analysis.unrecognised = {tag: s.total for tag in run.tags if (s := run.recent(tag)) is not None}
        return analysis


@dataclass
class _TwinPair:
    """A ``group<i>`` and a group it may be the twin of, compared up to ``compared`` points."""

    group: Group
    twin: Group
    status: str = PENDING
    compared: int = 0

    def tags(self) -> list[str]:
        return [t for g in (self.group, self.twin) for t in (g.lr_tag, g.dlr_tag, g.d_tag) if t]


class _GroupRules:
    """A param group's rules over its joined points, fed in step order. Each is vectorised
    over the new points (a plain-float loop for a watched update's few), with what it needs
    of the earlier ones carried: the cycle's peak lr, the highest d*lr and |lr|, the last
    known d, where d's warm-up ended, which cycles have had their finding."""

    def __init__(self, group: Group, schedule: KnownSchedule | None, th: Thresholds) -> None:
        self.group, self.schedule, self.th = group, schedule, th
        self.steps = GrowingArray(np.int64)
        self.started = False
        self.lr: GrowingArray | None = None  # None when not logged
        self.dlr: GrowingArray | None = None
        self.d, self.peak, self.risk = GrowingArray(), GrowingArray(), GrowingArray()
        self.best = -np.inf  # the highest finite d*lr so far
        self.restarts: list[int] = []  # indices
        self.restart_steps: list[int] = []
        self.findings: list[Finding] = []
        self.nonfinite_seen: set[str] = set()
        self.cycles_found: dict[tuple[str, str], set[int]] = {}  # (rule, severity) -> cycles with a finding
        self.top_lr = 0.0  # the highest finite |lr| so far
        self.d_last = math.nan  # the last known d
        self.d_first: float | None = None
        self.climb: int | None = None  # index where d had climbed out of d0
        self.settled: int | None = None  # index where d's warm-up ended
        self.spacing = Spacing()
        self.window: int | None = None  # runaway_window in points
        self.closed: list[Cycle] = []
        self.open: _OpenCycle | None = None

    @property
    def last_step(self) -> int | None:
        return int(self.steps.last()) if self.steps.n else None

    def extend(self, steps: np.ndarray, lr: np.ndarray | None, dlr: np.ndarray | None) -> None:
        if not self.started:  # whether lr and d*lr are logged is known from the first call, points or none
            self.started = True
            self.lr = None if lr is None else GrowingArray()
            self.dlr = None if dlr is None else GrowingArray()
        if not len(steps):
            return
        i0 = self.steps.n
        self.steps.extend(steps)
        w = points(self.spacing.add(self.steps.view, i0 - self.steps.start), self.th.runaway_window)
        if self.window is not None and w != self.window:
            raise Stale("the steps between logged points changed")
        self.window = w
        self._nonfinite(i0, {label: x for label, x in (("lr", lr), ("d*lr", dlr)) if x is not None})
        cycle_of, new_restarts, peak = self._restarts(i0, lr)
        if self.lr is not None:
            self.lr.extend(lr)  # type: ignore[arg-type]
        if self.dlr is not None:
            self.dlr.extend(dlr)  # type: ignore[arg-type]
        self.peak.extend(peak)
        if lr is not None and dlr is not None:
            self._adaptive(i0, lr, dlr, peak, cycle_of, new_restarts, w)
        else:
            self.d.extend(np.full(len(steps), np.nan))
            self.risk.extend(np.full(len(steps), np.nan))
        self._cycles(i0, new_restarts)

    def _nonfinite(self, i0: int, named: dict[str, np.ndarray]) -> None:
        for label, values in named.items():
            if label in self.nonfinite_seen:
                continue
            i = first_nonfinite(values)
            if i is not None:
                self.nonfinite_seen.add(label)
                self.findings.append(Finding(
                    Kind.BLOWUP, CRITICAL, self.group.name, int(self.steps.at(i0 + i)),
                    f"{label} is {values[i]} at step {int(self.steps.at(i0 + i))}",
                    {"what": f"nonfinite_{label}", "value": None if math.isnan(values[i]) else float(values[i])},
                ))

    def _restarts(self, i0: int, lr: np.ndarray | None) -> tuple[np.ndarray, list[int], np.ndarray]:
        """The new points' cycle numbers, the restarts among them (indices) and each point's
        cycle peak lr so far."""
        m = self.steps.n - i0
        if lr is None:
            return np.zeros(m, np.int64), [], np.full(m, np.nan)
        if i0:  # the pair across the boundary counts: start from the last point seen
            last_peak = float(self.peak.view[-1])
            if m <= SMALL_UPDATE:
                return self._restarts_small(i0, lr, float(self.lr.view[-1]), last_peak)  # type: ignore[union-attr]
            hits = find_restarts(np.concatenate(([self.lr.view[-1]], lr)), self.th.restart_jump,  # type: ignore
                                 last_peak) + (i0 - 1)
        else:
            last_peak, hits = -np.inf, find_restarts(lr, self.th.restart_jump)
        new = hits.tolist()
        marks = np.zeros(m, np.int64)
        marks[hits - i0] = 1
        cycle_of = len(self.restarts) + np.cumsum(marks)
        self.restarts += new
        self.restart_steps += self.steps.view[hits - self.steps.start].tolist()
        peak = np.empty(m)
        bounds = [0, *(hits - i0).tolist(), m]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                peak[a:b] = _running_max_finite(lr[a:b])
        if bounds[1] > 0:  # the first points continue the cycle seen so far
            peak[: bounds[1]] = np.maximum(peak[: bounds[1]], last_peak)
        return cycle_of, new, peak

    def _restarts_small(self, i0: int, lr: np.ndarray, prev: float, peak: float
                        ) -> tuple[np.ndarray, list[int], np.ndarray]:
        """``_restarts`` of a watched update's few points, in plain floats (numpy's fixed cost
        per call is most of the work there): ``find_restarts``' test, point by point, from
        the last point seen (``prev``) and its cycle's peak."""
        jump, cycle = self.th.restart_jump, len(self.restarts)
        prev = prev if math.isfinite(prev) else -math.inf
        new: list[int] = []
        cycles, peaks = [], []
        for j, x in enumerate(lr.tolist()):
            if not math.isfinite(x):
                x = -math.inf
            if prev < peak and x - prev >= jump * peak and peak > 0:
                new.append(i0 + j)
                cycle, peak = cycle + 1, -math.inf
            if x > peak:
                peak = x
            cycles.append(cycle)
            peaks.append(peak)
            prev = x
        if new:
            self.restarts += new
            self.restart_steps += [int(self.steps.at(i)) for i in new]
        return np.array(cycles, np.int64), new, np.array(peaks, np.float64)

    def _adaptive(self, i0: int, lr: np.ndarray, dlr: np.ndarray, peak: np.ndarray, cycle_of: np.ndarray,
                  new_restarts: list[int], w: int) -> None:
        """The new points' cycle numbers are ``cycle_of``; the restarts among them (indices),
        ``new_restarts``."""
        th = self.th
        d = self._d_series(lr, dlr)
        best_before = self.best
        best = _running_max_finite(dlr, best_before)  # the highest d*lr so far, at every point
        self.best = float(best[-1])
        risk = _restart_risk(self.steps.since(i0), d, peak, best, self.schedule)
        self.d.extend(d)
        self.risk.extend(risk)
        self._settle(i0, w)
        for strong, level in ((False, th.risk_warning), (True, th.risk_stop)):
            mask = risk >= level  # NaN (no restart coming) compares False
            if not mask.any():
                break  # below the warning level, below the stop level too (Thresholds checks the order)
            if strong:
                mask &= np.arange(i0, self.steps.n) >= (self.settled if self.settled is not None else self.steps.n)
            for k in self._first_per_cycle("risk", "strong" if strong else WARNING, mask, cycle_of):
                self._risk_finding(strong, i0 + k, float(best[k]), int(cycle_of[k]))
        self._runaway(i0, w, cycle_of)
        for i in new_restarts:  # what happened at each restart
            before = float(best[i - 1 - i0]) if i > i0 else best_before
            ratio = dlr[i - i0] / before if before > 0 else np.nan
            if np.isfinite(ratio) and ratio >= th.restart_spike:
                self._spike_finding(i, ratio, before, int(cycle_of[i - i0]))

    def _d_series(self, lr: np.ndarray, dlr: np.ndarray) -> np.ndarray:
        """d = (d*lr)/lr where lr is usable, carried forward where it is not (lr zero or tiny:
        both optimizers keep d there, and the ratio would only amplify float noise)."""
        if len(lr) <= SMALL_UPDATE:  # a watched update's few points: the same, in plain floats
            highest, tiny, d_last = self.top_lr, self.th.tiny_lr, self.d_last
            out = []
            for x, y in zip(lr.tolist(), dlr.tolist()):
                finite = math.isfinite(x)
                if finite and abs(x) > highest:
                    highest = abs(x)
                if finite and math.isfinite(y) and x > 0 and x > tiny * highest and math.isfinite(y / x):
                    d_last = y / x
                out.append(d_last)
            self.top_lr, self.d_last = highest, d_last
            return np.array(out, np.float64)
        top = np.maximum(np.maximum.accumulate(np.where(np.isfinite(lr), np.abs(lr), 0.0)), self.top_lr)
        self.top_lr = float(top[-1])
        usable = np.isfinite(lr) & np.isfinite(dlr) & (lr > 0) & (lr > self.th.tiny_lr * top)
        d = np.where(usable, dlr / np.where(usable, lr, 1.0), np.nan)
        idx = np.maximum.accumulate(np.where(np.isfinite(d), np.arange(len(d)), -1))
        d = np.where(idx >= 0, d[np.maximum(idx, 0)], self.d_last)
        self.d_last = float(d[-1])
        return d

    def _settle(self, i0: int, w: int) -> None:
        """Where d's warm-up ended: d has climbed out of d0 (``settle_climb`` x its first
        value) and then either grown less than ``settle_growth`` over a window, or met a
        restart at least a window after the climb began. Growth before that is the warm-up
        itself, however slow: Prodigy with safeguard_warmup, or an lr warmup, can hold d at
        d0 for a cycle or more, and short cycles restart while it climbs. Searched in the new
        points only: each condition holds from the first point where it holds."""
        if self.settled is not None:
            return
        n = self.d.n
        new = self.d.since(i0)
        if self.d_first is None:
            known = first_true(np.isfinite(new))
            if known is None:
                return
            self.d_first = float(new[known])
        if self.climb is None:
            climbed = first_true(np.isfinite(new) & (new >= self.th.settle_climb * self.d_first))
            if climbed is None:
                return
            self.climb = i0 + climbed
        start = self.climb
        found = n
        first_restart = next((r for r in self.restarts if r >= max(start + w + 1, i0)), None)
        if first_restart is not None:
            found = first_restart
        lo = max(start + w, i0)
        if n > lo:
            growth = self.d.since(lo) / self.d.between(lo - w, n - w)
            settled = first_true(np.isfinite(growth) & (growth < self.th.settle_growth))
            if settled is not None:
                found = min(found, lo + settled)
        if found < n:
            self.settled = found

    def _first_per_cycle(self, rule: str, severity: str, mask: np.ndarray, cycle_of: np.ndarray) -> list[int]:
        """Index (in ``mask``) of the first True in each cycle that has had no such finding."""
        hits = np.flatnonzero(mask)
        found = self.cycles_found.setdefault((rule, severity), set())
        out = []
        for i in hits[np.unique(cycle_of[hits], return_index=True)[1]].tolist():
            cycle = int(cycle_of[i])
            if cycle not in found:
                found.add(cycle)
                out.append(i)
        return out

    def _risk_finding(self, strong: bool, i: int, best: float, cycle: int) -> None:
        """A restart predicted to land far above the highest d*lr so far: a forecast, so a
        warning, never a critical (healthy runs' restarts landed at 13-49x the highest d*lr and
        trained on; frying ones at 1-3x). Strong once d's warm-up is over and the ratio reaches
        ``risk_stop``: the one `--kill-at predict` acts on."""
        step, risk, d = int(self.steps.at(i)), self.risk.at(i), self.d.at(i)
        restart = self.schedule.next_restart(step) if self.schedule else None
        when = f"at the restart at step {restart}" if restart else "at the next restart"
        self.findings.append(Finding(
            Kind.PREDICTED_RESTART_BLOWUP, WARNING, self.group.name, step,
            f"d grew to {d:.3g}: {when} d*lr would be {risk:.1f}x the highest d*lr so far ({best:.3g})"
            + (" (a strong prediction, after d's warm-up: --kill-at predict stops here)" if strong else ""),
            {"ratio": round(float(risk), 4), "d": float(d), "max_dlr": float(best),
             "predicted_dlr": float(risk * best), "cycle": cycle, "restart_step": restart, "strong": strong},
        ))

    def _runaway(self, i0: int, w: int, cycle_of: np.ndarray) -> None:
        """d's growth over the trailing window (``w`` points: the window's steps). The window
        never reaches back into d's warm-up: growth measured from d0 is the warm-up itself."""
        if self.settled is None:
            return
        n, o = self.d.n, self.d.start  # (indices below count from the run's first point; the arrays from o)
        d, steps = self.d.view, self.steps.view
        idx = np.arange(i0, n)
        back = np.minimum(np.maximum(idx - w, self.settled), n - 1)
        eligible = idx > np.maximum(idx - w, self.settled)
        growth = d[i0 - o :] / d[back - o]
        eligible &= np.isfinite(growth)
        for severity, level in ((WARNING, self.th.runaway_warning), (CRITICAL, self.th.runaway_critical)):
            mask = eligible & (growth >= level)
            if not mask.any():
                break  # (as for the risk: no warning, no critical)
            for k in self._first_per_cycle("runaway", severity, mask, cycle_of):
                i, b = i0 + k - o, int(back[k]) - o
                self.findings.append(Finding(
                    Kind.RUNAWAY_D, severity, self.group.name, int(steps[i]),
                    f"d grew {growth[k]:.1f}x in {int(steps[i] - steps[b])} steps "
                    f"({d[b]:.3g} -> {d[i]:.3g}) after it had settled",
                    {"growth": round(float(growth[k]), 4), "d": float(d[i]), "d_before": float(d[b]),
                     "window": int(steps[i] - steps[b]), "cycle": int(cycle_of[k])},
                ))

    def _spike_finding(self, i: int, ratio: float, before: float, cycle: int) -> None:
        """What happened at a restart: d*lr far above everything before. A warning, not a fry:
        on the realistic corpus, runs whose restarts landed at 4-5x trained on fine; the loss
        rules confirm a real fry."""
        step, dlr = int(self.steps.at(i)), float(self.dlr.at(i))  # type: ignore[union-attr]
        self.findings.append(Finding(
            Kind.BLOWUP, WARNING, self.group.name, step,
            f"restart at step {step}: d*lr {dlr:.3g} is {ratio:.1f}x the highest before ({before:.3g})",
            {"what": "restart_spike", "ratio": round(float(ratio), 4), "dlr": dlr,
             "max_dlr_before": float(before), "cycle": cycle},
        ))

    def _cycles(self, i0: int, new_restarts: list[int]) -> None:
        if self.lr is None:
            return
        n = self.steps.n
        starts = set(new_restarts)
        bounds = [i0, *(r for r in new_restarts if r > i0), n]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a in starts or self.open is None:
                if self.open is not None:
                    self.closed.append(self.open.cycle(complete=True))
                self.open = _OpenCycle(len(self.closed), int(self.steps.at(a)))
            self.open.add(self, a, b)

    def result(self) -> GroupAnalysis:
        steps = self.steps.view
        n = len(steps)
        lr = self.lr.view if self.lr is not None else None
        dlr = self.dlr.view if self.dlr is not None else None
        cycles = list(self.closed)
        if self.open is not None:
            complete = bool(self.schedule and self.schedule.max_steps and steps[-1] >= self.schedule.max_steps)
            cycles.append(self.open.cycle(complete))
        risk = self.risk.view
        risk_now = None if lr is None or dlr is None or not n or not np.isfinite(risk[-1]) else float(risk[-1])
        next_restart = self.schedule.next_restart(int(steps[-1])) if self.schedule and n else None
        return GroupAnalysis(self.group.name, self.group.lr_tag, self.group.dlr_tag, steps, lr, dlr, self.d.view,
                             self.peak.view, list(self.restart_steps), cycles, risk_now, next_restart,
                             self.group.d_tag, risk)

    def forget(self) -> None:
        """Let go of the points that no rule looks back to: d's growth looks a window back, the
        spacing of steps one point."""
        if self.window is None:
            return
        keep = self.steps.n - self.window - 2
        for part in (self.steps, self.lr, self.dlr, self.d, self.peak, self.risk):
            if part is not None:
                part.forget_before(keep)


class _OpenCycle:
    """The last cycle's summary, added to as its points come."""

    def __init__(self, index: int, start_step: int) -> None:
        self.index, self.start_step = index, start_step
        self.end_step = start_step
        self.peak_lr = math.nan
        self.low_step, self.low_lr = start_step, math.nan  # where the lowest finite lr is (the first, on ties)
        self.d_start: float | None = None
        self.d_end: float | None = None
        self.peak_dlr: float | None = None

    def add(self, rules: _GroupRules, a: int, b: int) -> None:
        self.end_step = int(rules.steps.at(b - 1))
        small = b - a <= SMALL_UPDATE  # a watched update's few points: plain floats cost less than numpy's calls
        lr = _lr_extremes(rules.lr.between(a, b), small)  # type: ignore[union-attr]
        if lr is not None:
            top, low, k = lr
            self.peak_lr = top if math.isnan(self.peak_lr) else max(self.peak_lr, top)
            if not low >= self.low_lr:  # (NaN before any finite lr)
                self.low_step, self.low_lr = int(rules.steps.at(a + k)), low
        d = _finite_ends(rules.d.between(a, b), small)
        if d is not None:
            self.d_start = d[0] if self.d_start is None else self.d_start
            self.d_end = d[1]
        if rules.dlr is not None:
            dlr = _finite_ends(rules.dlr.between(a, b), small)
            if dlr is not None:
                self.peak_dlr = dlr[2] if self.peak_dlr is None else max(self.peak_dlr, dlr[2])

    def cycle(self, complete: bool) -> Cycle:
        growth = (self.d_end / self.d_start) if self.d_start and self.d_end is not None else None
        return Cycle(self.index, self.start_step, self.end_step, self.peak_lr, self.low_lr, self.low_step,
                     self.d_start, self.d_end, growth, self.peak_dlr, complete)


def _lr_extremes(lr: np.ndarray, small: bool) -> tuple[float, float, int] | None:
    """(highest, lowest, index of the first lowest) of ``lr``'s finite values; None if none is.
    ``small``: in plain floats (for a few points numpy's calls cost more than the loop)."""
    if small:
        finite = [(x, k) for k, x in enumerate(lr.tolist()) if math.isfinite(x)]
        if not finite:
            return None
        low = min(finite)  # the lowest value, and of equal ones the first
        return max(finite)[0], low[0], low[1]
    mask = np.isfinite(lr)
    if not mask.any():
        return None
    k = int(np.argmin(np.where(mask, lr, np.inf)))
    return float(np.max(lr[mask])), float(lr[k]), k


def _finite_ends(x: np.ndarray, small: bool) -> tuple[float, float, float] | None:
    """(first, last, highest) of ``x``'s finite values; None if none is (``small``: as above)."""
    if small:
        values = [v for v in x.tolist() if math.isfinite(v)]
        return (values[0], values[-1], max(values)) if values else None
    finite = x[np.isfinite(x)]
    return (float(finite[0]), float(finite[-1]), float(finite.max())) if len(finite) else None


def _running_max_finite(x: np.ndarray, start: float = -math.inf) -> np.ndarray:
    """The highest finite value up to each point (and ``start``; -inf before any)."""
    if len(x) <= SMALL_UPDATE:  # a watched update's few points: plain floats
        highest, out = start, []
        for v in x.tolist():
            if highest < v < math.inf:
                highest = v
            out.append(highest)
        return np.array(out, np.float64)
    top = np.maximum.accumulate(np.where(np.isfinite(x), x, -np.inf))
    return top if start == -math.inf else np.maximum(top, start)


def _restart_risk(steps, d, peak, best, schedule: KnownSchedule | None) -> np.ndarray:
    """At each step: d now x the peak lr the next cycle will start from, over the highest
    d*lr reached so far. NaN where no restart is coming (known from the config)."""
    last_restart = None
    if schedule is not None and schedule.restarts is not None:
        last_restart = schedule.restarts[-1] if schedule.restarts else -1
    if len(d) <= SMALL_UPDATE:  # a watched update's few points: plain floats
        out = []
        for step, x, top, high in zip(steps.tolist(), d.tolist(), peak.tolist(), best.tolist()):
            r = x * top / high if high > 0 else math.nan
            out.append(r if math.isfinite(r) and (last_restart is None or step < last_restart) else math.nan)
        return np.array(out, np.float64)
    risk = d * peak / best
    risk[~np.isfinite(risk) | (best <= 0)] = np.nan
    if last_restart is not None:
        risk[steps >= last_restart] = np.nan
    return risk


def trailing_mean(x: np.ndarray, span: int) -> np.ndarray:
    """Mean of the finite values among the last ``span`` points (fewer at the start; NaN where
    there are none), vectorised (for the plot, whose loss may hold NaN)."""
    finite = np.isfinite(x)
    csum = np.cumsum(np.concatenate(([0.0], np.where(finite, x, 0.0))))
    count = np.cumsum(np.concatenate(([0], finite)))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - span, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (csum[idx] - csum[lo]) / (count[idx] - count[lo])
