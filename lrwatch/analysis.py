"""From a run's series to cycles and findings.

Every quantity at step t is computed from data at steps <= t only (running
maxima, trailing windows, the current cycle's peak so far). A finding's step is
therefore the first step at which it could have been known: a finished run gives
the findings a live watcher would have printed, and analysing a longer prefix of
a run never moves or removes an earlier finding. The watcher re-runs this on the
growing arrays; it is vectorised, so that costs milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from lrwatch.runs import RunLike
from lrwatch.schedule_config import KnownSchedule, known_schedule
from lrwatch.tags import Group, TagMap
from lrwatch.trainers import Reading, fold_duplicate_groups, read_layout

WARNING = "warning"
CRITICAL = "critical"
TINY_LOSS = 1e-9  # a loss at or below zero counts as this fraction of the base model's in a geometric mean


@dataclass(frozen=True)
class Thresholds:
    """When a finding fires. The README explains each default against the recorded runs."""

    restart_jump: float = 0.25  # lr rising by this fraction of the cycle's peak, from below it, is a restart
    risk_warning: float = 2.0  # predicted d*lr at the next restart / highest d*lr so far
    risk_critical: float = 4.0
    runaway_window: int = 50  # steps over which d's growth is measured
    runaway_warning: float = 3.0  # d grew by this factor within the window (after d's warm-up)
    runaway_critical: float = 10.0
    settle_growth: float = 1.1  # d's warm-up is over once it grows less than this over a window ...
    settle_climb: float = 10.0  # ... after it has climbed this far above its first value (out of d0)
    loss_divergence: float = 20.0  # smoothed loss / its best so far (10 false-alarmed a healthy diffusion run)
    loss_smoothing: int = 10  # steps averaged (trailing mean) before the loss is compared
    loss_grace: int = 50  # steps before the loss baseline counts (d's warm-up overshoots)
    # The loss against the base model's (a LoRA's B starts at zero, so the first steps are the
    # base model): chosen on the realistic corpus's train seeds (README).
    loss_above_base: float = 3.2  # geometric mean of the last `loss_base_window` steps / the first steps'
    loss_base_window: int = 10
    loss_reference: int = 10  # the first steps, whose geometric mean is the base model's loss
    restart_spike: float = 4.0  # d*lr right after a restart / highest d*lr before it
    tiny_lr: float = 1e-6  # lr below this fraction of its highest is treated as zero (d unknown)

    def __post_init__(self) -> None:
        if self.risk_critical < self.risk_warning or self.runaway_critical < self.runaway_warning:
            raise ValueError("a critical threshold must not be below its warning threshold")
        ratios = (self.risk_warning, self.runaway_warning, self.loss_divergence, self.restart_spike,
                  self.settle_growth, self.settle_climb, self.loss_above_base)
        if not all(math.isfinite(r) and r > 1 for r in ratios):
            raise ValueError("ratios must be finite and above 1")
        if min(self.runaway_window, self.loss_smoothing, self.loss_base_window, self.loss_reference) < 1 \
                or self.loss_grace < 0:
            raise ValueError("windows must be at least 1 step (the loss grace at least 0)")
        if not 0 < self.restart_jump <= 1:
            raise ValueError("restart_jump must be in (0, 1]")
        if not 0 <= self.tiny_lr < 1:
            raise ValueError("tiny_lr must be in [0, 1)")


@dataclass
class Finding:
    kind: str  # predicted_restart_blowup | runaway_d | blowup
    severity: str  # warning | critical
    group: str | None
    step: int
    message: str
    values: dict[str, float | int | str | None] = field(default_factory=dict)

    def key(self) -> tuple:
        return (self.kind, self.severity, self.group, self.values.get("cycle"), self.values.get("what"))

    def to_dict(self) -> dict:
        return asdict(self)


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
    base_loss: float | None = None  # geometric-mean loss of the run's first steps: the base model's (LoRA B is 0)
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
    reading = reading or read_layout(run, tag_map=tag_map)
    th = _in_logged_steps(thresholds or Thresholds(), reading.steps_per_update)
    tags = set(run.tags)
    schedule = reading.schedule or known_schedule(run.config)
    findings: list[Finding] = []
    notes: list[str] = list(reading.notes)
    tag_groups = fold_duplicate_groups(run, reading.tag_map.groups(tags))
    groups = [analyze_group(run, g, schedule, th, findings) for g in tag_groups]
    loss_tag = reading.tag_map.loss_tag(tags)
    base = None
    if loss_tag is not None:
        loss_found, base, loss_notes = loss_findings(run, loss_tag, th, reading.steps_per_update)
        findings += loss_found
        notes += loss_notes
    notes += _coverage_notes(groups, loss_tag, run.config, reading)
    if schedule is not None and schedule.problem:
        notes.append(f"the logged schedule could not be used ({schedule.problem}): restarts are found from the lr")
    notes += [f"logged configuration not read: {p}" for p in run.config_problems]
    last = [int(g.steps[-1]) for g in groups if len(g.steps)]
    loss = run.series(loss_tag) if loss_tag else None
    if loss is not None and len(loss.steps):
        last.append(int(loss.steps[-1]))
    findings = _drop_shadowed_warnings(findings)
    findings.sort(key=lambda f: (f.step, f.severity != CRITICAL, f.kind))
    analysis = Analysis(groups, findings, loss_tag, max(last) if last else None, schedule, notes, base_loss=base,
                        trainer=reading.layout.name, trainer_why=reading.why)
    if not analysis.checked:
        analysis.unrecognised = {tag: len(s.steps) for tag in run.tags if (s := run.series(tag)) is not None}
    return analysis


def _in_logged_steps(th: Thresholds, scale: int) -> Thresholds:
    """Windows and grace periods are in optimizer steps; a trainer that counts batches (OneTrainer
    with gradient accumulation) logs ``scale`` steps per update."""
    if scale == 1:
        return th
    return replace(th, runaway_window=th.runaway_window * scale, loss_smoothing=th.loss_smoothing * scale,
                   loss_grace=th.loss_grace * scale, loss_base_window=th.loss_base_window * scale,
                   loss_reference=th.loss_reference * scale)


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


def _drop_shadowed_warnings(findings: list[Finding]) -> list[Finding]:
    """A warning raised at the same step as its critical twin says nothing more."""
    critical = {(f.kind, f.group, f.values.get("cycle"), f.step) for f in findings if f.severity == CRITICAL}
    return [f for f in findings
            if f.severity == CRITICAL or (f.kind, f.group, f.values.get("cycle"), f.step) not in critical]


def _joined(run: RunLike, group: Group, schedule: KnownSchedule | None = None
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Steps where the group's series were logged, with lr and d*lr there; a series that was not
    logged (and cannot be derived) is None (absent, never NaN). Derived: d*lr = lr * d (lr and d
    logged), lr = d*lr / d (SimpleTuner), lr from the schedule (only d*lr logged)."""
    lr = run.series(group.lr_tag) if group.lr_tag else None
    dlr = run.series(group.dlr_tag) if group.dlr_tag else None
    d = run.series(group.d_tag) if group.d_tag else None
    known = lr if dlr is None else dlr if lr is None else None  # exactly one of lr and d*lr logged
    if d is not None and known is not None:
        steps, i, j = np.intersect1d(known.steps, d.steps, assume_unique=True, return_indices=True)
        k, dv = known.values[i], d.values[j]
        if lr is not None:
            return steps, k, k * dv
        with np.errstate(divide="ignore", invalid="ignore"):
            return steps, np.where(dv != 0, k / dv, np.nan), k
    if lr is None and dlr is None:
        return np.zeros(0, np.int64), None, None
    if dlr is None:
        return lr.steps, lr.values, None  # type: ignore[union-attr]
    if lr is None:
        if schedule is not None and schedule.lr_at is not None:
            return dlr.steps, schedule.lr_at(dlr.steps), dlr.values
        return dlr.steps, None, dlr.values
    steps, i, j = np.intersect1d(lr.steps, dlr.steps, assume_unique=True, return_indices=True)
    return steps, lr.values[i], dlr.values[j]


_RESTART_CHUNK = 4096


def find_restarts(lr: np.ndarray, jump: float) -> np.ndarray:
    """Indices where the lr restarts: it rises by at least ``jump`` x the current cycle's peak
    from below that peak. A warmup rises from its own peak, so it never qualifies; float
    noise is far below ``jump``. Searched chunk by chunk with the cycle's peak carried
    across chunks, so each restart costs only the distance to it."""
    finite = np.where(np.isfinite(lr), lr, -np.inf)
    n = len(finite)
    out: list[int] = []
    pos, carry = 0, -np.inf  # carry: the cycle's peak before index `pos`
    while pos < n - 1:
        seg = finite[pos : min(n, pos + _RESTART_CHUNK)]
        peak = np.maximum(np.maximum.accumulate(seg), carry)  # cycle peak up to and including each index
        prev_peak, prev, cur = peak[:-1], seg[:-1], seg[1:]
        hits = np.flatnonzero((prev < prev_peak) & (cur - prev >= jump * prev_peak) & (prev_peak > 0))
        if len(hits):
            pos, carry = pos + 1 + int(hits[0]), -np.inf  # a new cycle starts at the restart
            out.append(pos)
        elif pos + len(seg) >= n:
            break
        else:  # overlap one point so the pair across the chunk boundary is checked too
            pos, carry = pos + len(seg) - 1, peak[-2]
    return np.asarray(out, dtype=np.int64)


def _d_series(lr: np.ndarray, dlr: np.ndarray, tiny: float) -> np.ndarray:
    """d = (d*lr)/lr where lr is usable, carried forward where it is not (lr zero or tiny:
    both optimizers keep d there, and the ratio would only amplify float noise)."""
    top = np.maximum.accumulate(np.where(np.isfinite(lr), np.abs(lr), 0.0)) if len(lr) else lr
    usable = np.isfinite(lr) & np.isfinite(dlr) & (lr > 0) & (lr > tiny * top)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(usable, dlr / np.where(usable, lr, 1.0), np.nan)
    idx = np.where(np.isfinite(d), np.arange(len(d)), -1)
    idx = np.maximum.accumulate(idx) if len(idx) else idx
    return np.where(idx >= 0, d[np.maximum(idx, 0)], np.nan)


def analyze_group(run: RunLike, group: Group, schedule: KnownSchedule | None, th: Thresholds,
                  findings: list[Finding]) -> GroupAnalysis:
    steps, lr, dlr = _joined(run, group, schedule)
    name = group.name
    restarts_idx = find_restarts(lr, th.restart_jump) if lr is not None and len(lr) else np.zeros(0, np.int64)
    cycle_of = np.zeros(len(steps), np.int64)
    if len(restarts_idx):
        cycle_of[restarts_idx] = 1
        cycle_of = np.cumsum(cycle_of)
    d = _d_series(lr, dlr, th.tiny_lr) if lr is not None and dlr is not None else np.full(len(steps), np.nan)
    cycle_peak = _cycle_peak_lr(lr, cycle_of) if lr is not None else np.full(len(steps), np.nan)

    _nonfinite(findings, name, steps, {label: x for label, x in (("lr", lr), ("d*lr", dlr)) if x is not None})
    risk_now = None
    risk = np.full(len(steps), np.nan)
    next_restart = schedule.next_restart(int(steps[-1])) if schedule and len(steps) else None
    if lr is not None and dlr is not None and len(steps):
        best = _running_max_finite(dlr)  # the highest d*lr so far, at every point
        risk = _restart_risk(steps, d, cycle_peak, best, schedule)
        risk_now = None if not np.isfinite(risk[-1]) else float(risk[-1])
        w = points(spacing(steps), th.runaway_window)
        settled = _d_settled_index(d, cycle_of, th, w)
        _risk_findings(findings, name, steps, risk, d, best, cycle_of, schedule, th, settled)
        _runaway_findings(findings, name, steps, d, cycle_of, th, settled, w)
        _spike_findings(findings, name, steps, dlr, best, restarts_idx, th)
    cycles = _cycles(steps, lr, dlr, d, restarts_idx, schedule)
    return GroupAnalysis(name, group.lr_tag, group.dlr_tag, steps, lr, dlr, d, cycle_peak,
                         [int(steps[i]) for i in restarts_idx], cycles, risk_now, next_restart, group.d_tag, risk)


def _running_max_finite(x: np.ndarray) -> np.ndarray:
    return np.maximum.accumulate(np.where(np.isfinite(x), x, -np.inf))


def _cycle_peak_lr(lr: np.ndarray, cycle_of: np.ndarray) -> np.ndarray:
    """Highest lr of the current cycle so far, at every index."""
    out = np.empty(len(lr))
    bounds = np.flatnonzero(np.diff(cycle_of)) + 1
    for a, b in zip([0, *bounds.tolist()], [*bounds.tolist(), len(lr)]):
        out[a:b] = _running_max_finite(lr[a:b])
    return out


def _restart_risk(steps, d, peak, best, schedule: KnownSchedule | None) -> np.ndarray:
    """At each step: d now x the peak lr the next cycle will start from, over the highest
    d*lr reached so far. NaN where no restart is coming (known from the config)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        risk = d * peak / best
    risk[~np.isfinite(risk) | (best <= 0)] = np.nan
    if schedule is not None and schedule.restarts is not None:
        last_restart = schedule.restarts[-1] if schedule.restarts else -1
        risk[steps >= last_restart] = np.nan
    return risk


def _first_per_cycle(mask: np.ndarray, cycle_of: np.ndarray) -> list[int]:
    """Index of the first True in each cycle."""
    hits = np.flatnonzero(mask)
    if not len(hits):
        return []
    _, first = np.unique(cycle_of[hits], return_index=True)
    return hits[first].tolist()


def _risk_findings(findings, group, steps, risk, d, best, cycle_of, schedule, th: Thresholds, settled: int) -> None:
    """A restart predicted to land far above the highest d*lr so far. Critical only once d's
    warm-up is over: while d climbs out of d0 the highest d*lr so far means little, and on
    the realistic corpus such predictions (DAdaptLion: 4-5x) preceded healthy training."""
    after_warm_up = np.arange(len(risk)) >= settled
    for severity, level in ((WARNING, th.risk_warning), (CRITICAL, th.risk_critical)):
        eligible = after_warm_up if severity == CRITICAL else True
        for i in _first_per_cycle((risk >= level) & eligible, cycle_of):  # NaN (no restart coming) compares False
            step = int(steps[i])
            restart = schedule.next_restart(step) if schedule else None
            when = f"at the restart at step {restart}" if restart else "at the next restart"
            findings.append(Finding(
                "predicted_restart_blowup", severity, group, step,
                f"d grew to {d[i]:.3g}: {when} d*lr would be {risk[i]:.1f}x the highest d*lr so far "
                f"({best[i]:.3g})",
                {"ratio": round(float(risk[i]), 4), "d": float(d[i]), "max_dlr": float(best[i]),
                 "predicted_dlr": float(risk[i] * best[i]), "cycle": int(cycle_of[i]), "restart_step": restart},
            ))


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


def _d_settled_index(d: np.ndarray, cycle_of: np.ndarray, th: Thresholds, w: int) -> int:
    """First index after d's warm-up: d has climbed out of d0 (``settle_climb`` x its first
    value) and then either grown less than ``settle_growth`` over a window, or met a restart
    at least a window after the climb began. Growth before that is the warm-up itself,
    however slow: Prodigy with safeguard_warmup, or an lr warmup, can hold d at d0 for a
    cycle or more, and short cycles restart while it climbs."""
    finite = np.flatnonzero(np.isfinite(d))
    if not len(finite):
        return len(d)
    climbed = np.flatnonzero(np.isfinite(d) & (d >= th.settle_climb * d[finite[0]]))
    if not len(climbed):
        return len(d)
    start = int(climbed[0])
    restart = np.flatnonzero(np.diff(cycle_of[start + w :]) > 0)
    out = start + w + 1 + int(restart[0]) if len(restart) else len(d)
    if len(d) - start > w:
        with np.errstate(divide="ignore", invalid="ignore"):
            growth = d[start + w :] / d[start:-w]
        settled = np.flatnonzero(np.isfinite(growth) & (growth < th.settle_growth))
        if len(settled):
            out = min(out, start + int(settled[0]) + w)
    return out


def _runaway_findings(findings, group, steps, d, cycle_of, th: Thresholds, settled: int, w: int) -> None:
    if len(d) <= 1:
        return
    # Growth over the trailing window (``w`` points: the window's steps). The window never
    # reaches back into d's warm-up: growth measured from d0 is the warm-up itself.
    back = np.maximum(np.arange(len(d)) - w, settled)
    eligible = np.arange(len(d)) > back
    back = np.minimum(back, len(d) - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        growth = d / d[back]
    eligible &= np.isfinite(growth)
    for severity, level in ((WARNING, th.runaway_warning), (CRITICAL, th.runaway_critical)):
        for i in _first_per_cycle(eligible & (growth >= level), cycle_of):
            findings.append(Finding(
                "runaway_d", severity, group, int(steps[i]),
                f"d grew {growth[i]:.1f}x in {int(steps[i] - steps[back[i]])} steps "
                f"({d[back[i]]:.3g} -> {d[i]:.3g}) after it had settled",
                {"growth": round(float(growth[i]), 4), "d": float(d[i]), "d_before": float(d[back[i]]),
                 "window": int(steps[i] - steps[back[i]]), "cycle": int(cycle_of[i])},
            ))


def _spike_findings(findings, group, steps, dlr, best, restarts_idx, th: Thresholds) -> None:
    """What happened at each restart: d*lr far above everything before. A warning, not a fry:
    on the realistic corpus, runs whose restarts landed at 4-5x trained on fine; the loss
    rules confirm a real fry."""
    best_before = np.concatenate(([-np.inf], best[:-1]))
    for cycle, i in enumerate(restarts_idx.tolist(), start=1):
        ratio = dlr[i] / best_before[i] if best_before[i] > 0 else np.nan
        if np.isfinite(ratio) and ratio >= th.restart_spike:
            findings.append(Finding(
                "blowup", WARNING, group, int(steps[i]),
                f"restart at step {int(steps[i])}: d*lr {dlr[i]:.3g} is {ratio:.1f}x the highest before "
                f"({best_before[i]:.3g})",
                {"what": "restart_spike", "ratio": round(float(ratio), 4), "dlr": float(dlr[i]),
                 "max_dlr_before": float(best_before[i]), "cycle": cycle},
            ))


def _nonfinite(findings, group, steps, named: dict[str, np.ndarray]) -> None:
    for label, values in named.items():
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            i = int(bad[0])
            findings.append(Finding(
                "blowup", CRITICAL, group, int(steps[i]),
                f"{label} is {values[i]} at step {int(steps[i])}",
                {"what": f"nonfinite_{label}", "value": None if math.isnan(values[i]) else float(values[i])},
            ))


def loss_findings(run: RunLike, loss_tag: str, th: Thresholds, per_update: int = 1
                  ) -> tuple[list[Finding], float | None, list[str]]:
    """The loss's findings, the base model's loss (None where it cannot be known) and notes on
    how the loss could be judged. ``th``'s windows are in logged steps, ``per_update`` of them
    per optimizer update."""
    series = run.series(loss_tag)
    if series is None or not len(series.steps):
        return [], None, []
    out: list[Finding] = []
    notes: list[str] = []
    steps, loss = series.steps, series.values
    _nonfinite(out, None, steps, {loss_tag: loss})
    finite_upto = np.flatnonzero(~np.isfinite(loss))
    n = int(finite_upto[0]) if len(finite_upto) else len(loss)
    gap = spacing(steps)
    gap_finite = gap if n == len(steps) else spacing(steps[:n])
    ref_n = samples(gap_finite, th.loss_reference, per_update)
    base = _base_loss(loss[:n], ref_n)
    if base is not None:
        out += _loss_above_base(steps[:n], loss[:n], base, loss_tag, th,
                                samples(gap_finite, th.loss_base_window, per_update), ref_n)
    elif n >= ref_n:
        notes.append(f"{loss_tag} is zero or negative in the run's first steps: it is not compared with the base "
                     "model's (only its divergence and non-finite values are checked)")
    if gap > per_update:  # fewer losses than optimizer updates
        least = samples(gap, th.loss_reference, per_update)
        notes.append(f"{loss_tag} is logged every {gap / per_update:g} steps: the loss rules take at least {least} "
                     f"losses per window ({least * gap / per_update:g} steps), so a fry shows there later than in a "
                     "run that logs every step")
    grace = points(gap, th.loss_grace)
    if n <= grace:
        return out, base, notes
    smooth = trailing_mean(loss[:n], samples(gap, th.loss_smoothing, per_update))
    baseline = np.minimum.accumulate(np.where(np.arange(n) >= grace, smooth, np.inf))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = smooth / baseline
    hits = np.flatnonzero((np.arange(n) > grace) & (baseline > 0) & (ratio >= th.loss_divergence))
    if len(hits):
        i = int(hits[0])
        out.append(Finding(
            "blowup", CRITICAL, None, int(steps[i]),
            f"{loss_tag} diverged: smoothed {smooth[i]:.3g} is {ratio[i]:.1f}x its best ({baseline[i]:.3g})",
            {"what": "loss_diverged", "ratio": round(float(ratio[i]), 4), "loss": float(smooth[i]),
             "baseline": float(baseline[i])},
        ))
    return out, base, notes


def _base_loss(loss: np.ndarray, ref_n: int) -> float | None:
    """The base model's loss: the geometric mean of the run's first ``ref_n`` losses (its first
    ``loss_reference`` steps, and at least that many losses: a LoRA's B starts at zero, so they
    are the untouched model). Geometric, because a diffusion loss swings ~30x with the random
    timestep and is close to log-normal: its log-mean is the median's value with less noise.
    ``loss`` is finite here; a loss that is not positive there has no base."""
    if len(loss) < ref_n or not np.all(loss[:ref_n] > 0):
        return None
    return geometric_mean(loss[:ref_n])


def geometric_mean(x: np.ndarray, floor: float = 0.0) -> float:
    """exp(mean(log x)), values below ``floor`` counted as ``floor`` (>0 where x may hold zeros)."""
    return float(np.exp(np.mean(np.log(np.maximum(x, floor)))))


def _loss_above_base(steps: np.ndarray, loss: np.ndarray, base: float, loss_tag: str, th: Thresholds, w: int,
                     ref_n: int) -> list[Finding]:
    """The loss far above the base model's: the geometric mean of the last few steps over
    ``base``. This catches fries within the first cycle, which the best-so-far rule cannot
    (its best is taken after d's warm-up). A single huge step still counts, as it should.
    ``loss`` is finite here; values at or below zero count as a tiny loss. ``w`` and ``ref_n``:
    the losses the level and the base take."""
    if len(loss) < max(w, ref_n + 1):
        return []
    level = np.exp(trailing_mean(np.log(np.maximum(loss, base * TINY_LOSS)), w)[w - 1:])  # level[k]: loss[k:k+w]
    ends = np.arange(w - 1, len(loss))
    hits = np.flatnonzero((ends >= ref_n) & (level >= th.loss_above_base * base))
    if not len(hits):
        return []
    k = int(hits[0])
    i = int(ends[k])
    return [Finding(
        "blowup", CRITICAL, None, int(steps[i]),
        f"{loss_tag} far above the base model's: geometric mean of the last {w} losses (steps "
        f"{int(steps[k])}-{int(steps[i])}) {level[k]:.3g} is {level[k] / base:.1f}x the first {ref_n}'s (steps "
        f"{int(steps[0])}-{int(steps[ref_n - 1])}: {base:.3g})",
        {"what": "loss_above_base", "ratio": round(float(level[k] / base), 4), "loss": float(level[k]),
         "baseline": base},
    )]


def trailing_mean(x: np.ndarray, span: int) -> np.ndarray:
    """Mean of the finite values among the last ``span`` points (fewer at the start; NaN where
    there are none), vectorised. The analysis passes finite values; the plot, a raw loss."""
    finite = np.isfinite(x)
    csum = np.cumsum(np.concatenate(([0.0], np.where(finite, x, 0.0))))
    count = np.cumsum(np.concatenate(([0], finite)))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - span, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (csum[idx] - csum[lo]) / (count[idx] - count[lo])


def _cycles(steps, lr, dlr, d, restarts_idx, schedule: KnownSchedule | None) -> list[Cycle]:
    if not len(steps) or lr is None:
        return []
    bounds = np.concatenate(([0], restarts_idx, [len(steps)]))
    out = []
    for k, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        if b <= a:
            continue
        seg = lr[a:b]
        finite = np.isfinite(seg)
        lo = a + int(np.argmin(np.where(finite, seg, np.inf))) if finite.any() else a
        dseg = d[a:b][np.isfinite(d[a:b])]
        dlr_seg = dlr[a:b][np.isfinite(dlr[a:b])] if dlr is not None else dseg[:0]
        d_start = float(dseg[0]) if len(dseg) else None
        d_end = float(dseg[-1]) if len(dseg) else None
        complete = b < len(steps) or bool(schedule and schedule.max_steps and steps[-1] >= schedule.max_steps)
        out.append(Cycle(
            k, int(steps[a]), int(steps[b - 1]),
            float(np.max(seg[finite])) if finite.any() else math.nan,
            float(lr[lo]), int(steps[lo]), d_start, d_end,
            (d_end / d_start) if d_start and d_end is not None else None,
            float(dlr_seg.max()) if len(dlr_seg) else None, complete,
        ))
    return out
