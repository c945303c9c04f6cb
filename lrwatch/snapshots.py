"""Which saved snapshots are safe to use.

Timing, as kohya does it at step N: update N (with the lr logged at N-1), save the
snapshot for step N, then log step N (the loss of update N's forward pass, i.e. of
the weights after N-1 updates, and the lr and d*lr for update N+1). Hence:

- a snapshot at step N was last shaped by the lr logged at N-1: a restart logged at
  N does not make the cycle-minimum snapshot saved at N a high-lr save;
- an lr or d*lr blow-up logged at B first reaches the weights of snapshot B+1;
- a loss that went bad at step B shows that the weights after B-1 updates were bad;
- a prediction logged at P is known only after the snapshot at P was saved.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from lrwatch.analysis import (
    CRITICAL,
    Analysis,
    Basis,
    GroupAnalysis,
    Kind,
    adaptive_optimizer_hint,
    samples,
    spacing,
)
from lrwatch.options import OptionError
from lrwatch.output import dumps, write_atomic
from lrwatch.rules.loss import base_window, levels
from lrwatch.runs import RunLike
from lrwatch.schedule_config import KnownSchedule
from lrwatch.sources import is_remote, location, read_range
from lrwatch.trainers import LAYOUTS, SNAPSHOT_NAMES

SAFE = "safe"
HIGH_LR = "high_lr"
AT_RISK = "at_risk"
FRIED = "fried"
UNKNOWN = "unknown"

MANIFEST = "lrwatch-snapshots.json"
DEFAULT_SAFE_LR = 0.05  # lr of the last update at most this fraction of its cycle's peak: "at a minimum"
# Validation losses in a row, equal to the last digit, that show a run's weights no longer change.
FROZEN_POINTS = 3

# The evidence at a save, each against the run's own best (chosen leave-one-task-out: bench/transfer.py):
DEFAULT_FRIED_LOSS = 3.0  # the loss's level before the save / the run's best level before that: fried at this
DEFAULT_FRIED_VALIDATION = 2.0  # the validation loss at the save / its best before: fried at this
LOSS_WINDOW = 25  # optimizer steps before a save whose losses judge its weights (diffusion noise needs ~25)

_EPOCH_NAME = re.compile(r"^(?P<base>.+?)-(?P<epoch>\d{6})$", re.ASCII)
_LOOSE_STEP = re.compile(r"(?:^|[-_.])(?:step|global_step|steps)[-_=]?(?P<step>\d+)", re.IGNORECASE | re.ASCII)
# checkpoint-<step>/ (and SimpleTuner's)
_CHECKPOINT_DIR = re.compile(LAYOUTS["diffusers"].snapshot_name or "", re.ASCII)
SNAPSHOT_SUFFIXES = (".safetensors", ".pt", ".ckpt")


@dataclass
class Snapshot:
    path: str
    kind: str  # step | epoch | final | checkpoint_dir | other
    base: str | None  # kohya output_name the file belongs to
    step: int | None = None
    step_source: str | None = None  # metadata | name | epoch (x steps per epoch) | time (...)
    epoch: int | None = None
    saved_at: float | None = None  # ss_training_finished_at, else mtime
    saved_at_source: str | None = None
    metadata: dict[str, str] | None = None
    problem: str | None = None  # why the file could not be read
    verdict: str = UNKNOWN
    lr_multiplier: float | None = None
    d: float | None = None
    loss_level: float | None = None  # geometric-mean loss over the LOSS_WINDOW steps before its save
    loss_ratio: float | None = None  # that level / the run's best level before it (inf: non-finite there)
    validation_loss: float | None = None  # the validation loss logged at its step
    validation_ratio: float | None = None  # that / the best validation loss before it
    reason: str = ""
    rank: int | None = None  # among the safe snapshots, by the evidence (1: the one to keep)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("metadata")
        return out


def read_header(path: Path) -> tuple[dict[str, str] | None, str | None]:
    """The safetensors header metadata, read without loading any tensor (remotely: two range
    reads, the header's length and the header, never the tensors)."""
    from safetensors import safe_open

    if is_remote(path):
        return _remote_header(path)
    try:
        with safe_open(str(path), framework="np") as f:
            return dict(f.metadata() or {}), None
    except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
        return None, f"not a readable safetensors file ({e})"


MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on a header


def _remote_header(path: Path) -> tuple[dict[str, str] | None, str | None]:
    try:
        size = int.from_bytes(read_range(path, 0, 8), "little")
        if not 2 <= size <= MAX_HEADER_BYTES:
            return None, f"not a readable safetensors file (header length {size})"
        header = json.loads(read_range(path, 8, 8 + size))
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        return ({str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}), None
    except (OSError, ValueError) as e:
        return None, f"not a readable safetensors file ({e})"


def snapshot_paths(folder: str | os.PathLike[str]) -> list[Path]:
    """The entries of ``folder`` (not recursive) that are snapshots: files ending in
    .safetensors/.pt/.ckpt and diffusers-style ``checkpoint-<step>/`` folders."""
    root = location(folder)
    if not root.is_dir():
        return []
    return [entry for entry in sorted(root.iterdir())
            if (entry.is_dir() and _CHECKPOINT_DIR.match(entry.name))
            or (entry.is_file() and entry.suffix in SNAPSHOT_SUFFIXES)]


def find_snapshots(folder: str | os.PathLike[str]) -> list[Snapshot]:
    """Every snapshot in ``folder``, described. Nothing is opened for writing."""
    return [describe(path) for path in snapshot_paths(folder)]


def describe(path: Path) -> Snapshot:
    """What a snapshot's name and (safetensors) header say about it."""
    if path.is_dir():
        m = _CHECKPOINT_DIR.match(path.name)
        return Snapshot(str(path), "checkpoint_dir", None, _int(m["step"]) if m else None, "name",
                        saved_at=path.stat().st_mtime, saved_at_source="mtime")
    return _describe(path)


def _by_trainer_name(path: Path, stem: str) -> Snapshot | None:
    """A snapshot named the way one of the trainers names its saves (lrwatch.trainers)."""
    for _trainer, pattern in SNAPSHOT_NAMES:
        if m := pattern.match(stem):
            found = m.groupdict()
            epoch = _int(found["epoch"]) if found.get("epoch") else None
            return Snapshot(str(path), "step", found.get("base"), _int(m["step"]), "name", epoch=epoch)
    return None


def _describe(path: Path) -> Snapshot:
    stem = path.stem
    if named := _by_trainer_name(path, stem):
        snap = named
    elif m := _EPOCH_NAME.match(stem):
        snap = Snapshot(str(path), "epoch", m["base"], epoch=_int(m["epoch"]))
    elif m := _LOOSE_STEP.search(stem):
        snap = Snapshot(str(path), "other", None, _int(m["step"]), "name")
    else:
        snap = Snapshot(str(path), "final", stem)
    snap.saved_at, snap.saved_at_source = path.stat().st_mtime, "mtime"
    if path.suffix == ".safetensors":
        meta, problem = read_header(path)
        snap.metadata, snap.problem = meta, problem
        if meta:
            if _int(meta.get("ss_steps")) is not None:
                snap.step, snap.step_source = _int(meta["ss_steps"]), "metadata"
            elif meta.get("ss_steps") is not None:  # there, but no step: neither the name's nor the time's guess
                snap.problem = f"its metadata's ss_steps {str(meta['ss_steps'])[:40]!r} is not a step number"
            if _int(meta.get("ss_epoch")) is not None and snap.epoch is None:
                snap.epoch = _int(meta["ss_epoch"])
            finished = _float(meta.get("ss_training_finished_at"))
            if finished is not None:
                snap.saved_at, snap.saved_at_source = finished, "ss_training_finished_at"
            if snap.base is None or snap.kind == "final":
                snap.base = meta.get("ss_output_name") or snap.base
    return snap


# No run takes a trillion steps: a larger number in a name or header is not a step, and judging
# "the run at that step" would read past its end and call the snapshot fried.
MAX_STEP = 10**12


def _int(x: object) -> int | None:
    """A whole number written in ASCII digits (``int`` also takes full-width and other
    scripts' digits, which no trainer writes), at most MAX_STEP; else None."""
    text = str(x).strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 13:
        return None
    value = int(text)
    return value if value <= MAX_STEP else None


def _float(x: object) -> float | None:
    try:
        v = float(str(x))
        return v if np.isfinite(v) else None
    except (TypeError, ValueError):
        return None


def steps_per_epoch_from(snapshots: list[Snapshot]) -> int | None:
    """From a snapshot that knows both its global step and its epoch (kohya's ss_steps, ss_epoch),
    saved at an epoch's end: the epoch-numbered files and the final one are."""
    for s in snapshots:
        if (s.kind == "epoch" and s.step_source == "metadata" and s.epoch and s.step is not None
                and s.step % s.epoch == 0):
            return s.step // s.epoch
    return None


def resolve_steps(snapshots: list[Snapshot], run: RunLike | None, steps_per_epoch: int | None) -> None:
    """Fill in steps the metadata did not give: epoch x steps per epoch, else the save time
    matched against the events' wall times."""
    spe = steps_per_epoch or steps_per_epoch_from(snapshots)
    walls = _wall_index(run) if run is not None else None
    for s in snapshots:
        if s.problem or s.step is not None:
            continue
        if s.epoch is not None and spe:
            s.step = s.epoch * spe
            s.step_source = f"epoch {s.epoch} x {spe} steps per epoch"
            continue
        if walls is not None and s.saved_at is not None:
            steps, wall = walls
            if len(steps) and wall[0] - 60 <= s.saved_at <= wall[-1] + 600:
                # kohya saves just before it logs the step: the first step logged at or after the save
                i = min(int(np.searchsorted(wall, s.saved_at)), len(steps) - 1)
                s.step, s.step_source = int(steps[i]), f"time ({s.saved_at_source})"


def _wall_index(run: RunLike) -> tuple[np.ndarray, np.ndarray] | None:
    best = None
    for tag in run.tags:
        series = run.series(tag)
        if series is not None and (best is None or len(series.steps) > len(best.steps)):
            best = series
    if best is None:
        return None
    order = np.argsort(best.wall_times, kind="stable")
    return best.steps[order], best.wall_times[order]


def _first_affected(analysis: Analysis, nonfinite_only: bool = False, confirmed_only: bool = False
                    ) -> tuple[int | None, str]:
    """The first snapshot step whose weights a blow-up reached (see the module docstring); with
    ``confirmed_only``, a blow-up the logs proved (a critical)."""
    first, why = None, ""
    for f in analysis.findings:
        what = str(f.values.get("what", ""))
        if f.kind != Kind.BLOWUP or (nonfinite_only and not what.startswith(("nonfinite_", "zero_"))):
            continue
        if confirmed_only and f.severity != CRITICAL:
            continue
        step = f.step - 1 if f.basis in (Basis.LOSS, Basis.VALIDATION) else f.step + 1
        begins = f.values.get("window_from_step")
        if confirmed_only and isinstance(begins, int):  # a loss level is its window's: the fry may start there
            step = begins
        if first is None or step < first:
            first, why = step, f"{f.message} (step {f.step})"
    return first, why


def _first_prediction(analysis: Analysis) -> tuple[int | None, str]:
    """The first strong prediction or critical runaway of d: weights saved after it are at risk
    where no loss tells otherwise."""
    for f in analysis.findings:
        if f.kind != Kind.BLOWUP and (f.severity == CRITICAL or f.values.get("strong")):
            return f.step, f"{f.kind} at step {f.step}"
    return None, ""


def _lr_of_last_update(group: GroupAnalysis, step: int, schedule: KnownSchedule | None = None,
                       lag: int = 1) -> tuple[float, float, float | None] | None:
    """(lr logged at step-lag, its cycle's peak so far, d then) for the group; None if not covered.
    ``lag`` is the trainer's (``Layout.save_lag``). Where that step was not logged (ai-toolkit
    logs every 100 steps) and the schedule is known, the schedule's lr there: a save one update
    past a restart must not borrow the lr of ten steps before."""
    steps = group.steps
    at = step - lag
    if group.lr is None or not len(steps) or at < steps[0] or at > steps[-1]:
        return None
    i = int(np.searchsorted(steps, at, side="right")) - 1
    if i < 0:
        return None
    d = float(group.d[i]) if np.isfinite(group.d[i]) else None
    if steps[i] != at and schedule is not None and schedule.lr_at is not None:
        lr = float(schedule.lr_at(np.asarray([at]))[0])
        return lr, max(float(group.cycle_peak[i]), lr), d
    return float(group.lr[i]), float(group.cycle_peak[i]), d


class Evidence:
    """What a run's own losses say of the weights saved at a step: the training loss's level
    over the LOSS_WINDOW steps before the save (at least LOSS_WINDOW losses: a trainer that logs
    every 10th step's loss is judged on the 250 steps before) against the best level the run
    reached before that window (the run's first losses, its base model, included, as in
    ``TrainingLossRule``), and the validation loss at the save against its best before. The
    validation loss judges where it was logged since before the training loss's best: a fry in
    the first validation interval leaves it no healthy point to compare with."""

    def __init__(self, run: RunLike, analysis: Analysis) -> None:
        self.loss: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.window, self.gap = 0, 1.0
        self.usable_until: int | None = None  # the step of the first non-finite or non-positive loss
        series = run.series(analysis.loss_tag) if analysis.loss_tag else None
        if series is not None and len(series.steps):
            self.gap = spacing(series.steps)
            self.window = w = samples(self.gap, LOSS_WINDOW)
            steps, values = series.steps, series.values
            usable = np.isfinite(values) & (values > 0)
            n = int(np.argmin(usable)) if not usable.all() else len(values)
            self.usable_until = int(steps[n]) if n < len(values) else None
            m = base_window(w)
            if n >= m + w:
                level, _ = levels(values[:n], w, w - 1)  # window ends w-1 .. n-1
                base = float(levels(values[:m], m, m - 1)[0][0])
                lowest = np.minimum.accumulate(level)
                where = np.maximum.accumulate(np.where(level == lowest, np.arange(len(level)), 0))
                best = np.full(len(level), np.nan)
                since = np.full(len(level), -1, np.int64)  # step of the best's first loss
                best[m:] = base
                since[m:] = steps[0]
                if len(level) > w:  # a window that ended before this one began, where lower than the base
                    later = lowest[: len(level) - w] < base
                    best[w:] = np.where(later, lowest[: len(level) - w], base)
                    since[w:] = np.where(later, steps[where[: len(level) - w]], steps[0])
                self.loss = (steps[w - 1 : n], level, best, since)
        self.validation: tuple[np.ndarray, np.ndarray] | None = None
        self.validation_gap = 1.0
        val = run.series(analysis.validation_tag) if analysis.validation_tag else None
        if val is not None and len(val.steps):
            self.validation = (val.steps, val.values)
            self.validation_gap = spacing(val.steps)

    @property
    def words(self) -> str:
        if self.gap <= 1:
            return f"{LOSS_WINDOW} steps"
        return f"{self.window} losses logged (one every {self.gap:g} steps)"

    def frozen_since(self, step: int) -> int | None:
        """The first step of the validation losses equal to the last one logged at or before
        ``step`` (at least ``FROZEN_POINTS`` of them, in a row), or None."""
        if self.validation is None:
            return None
        vsteps, values = self.validation
        j = int(np.searchsorted(vsteps, step, side="right")) - 1
        if j + 1 < FROZEN_POINTS or not math.isfinite(values[j]):
            return None
        k = j
        while k > 0 and values[k - 1] == values[j]:
            k -= 1
        return int(vsteps[k]) if j - k + 1 >= FROZEN_POINTS else None

    def at(self, snap: Snapshot) -> str | None:
        """Fill in the snapshot's loss level and validation loss, each with its ratio to the best
        before; return which of them judges it (``validation``, ``loss`` or None)."""
        step = snap.step
        assert step is not None
        since = None
        if self.loss is not None:
            steps, level, best, first = self.loss
            i = int(np.searchsorted(steps, step, side="right")) - 1
            if i >= 0 and step - steps[i] < 2 * self.gap:  # the window ends at the save (spacing is >= 1)
                snap.loss_level = float(level[i])
                if np.isfinite(best[i]):
                    snap.loss_ratio, since = float(level[i] / best[i]), int(first[i])
        if self.usable_until is not None and step >= self.usable_until:
            snap.loss_ratio = math.inf
        if self.validation is not None:
            vsteps, values = self.validation
            j = int(np.searchsorted(vsteps, step, side="right")) - 1
            if j >= 0 and step - vsteps[j] < self.validation_gap:  # logged at (or just before) the save
                snap.validation_loss = float(values[j])
                before = values[:j][np.isfinite(values[:j])]
                if not math.isfinite(values[j]):
                    snap.validation_ratio = math.inf
                elif len(before):
                    snap.validation_ratio = float(values[j] / before.min())
        if snap.validation_ratio is not None and (since is None or int(self.validation[0][0]) <= since):  # type: ignore[index]
            return "validation"
        return "loss" if snap.loss_ratio is not None else None


def judge(snapshots: list[Snapshot], analysis: Analysis | None, safe_lr: float = DEFAULT_SAFE_LR,
          run: RunLike | None = None, fried_loss: float = DEFAULT_FRIED_LOSS,
          fried_validation: float = DEFAULT_FRIED_VALIDATION) -> None:
    """Give every snapshot its verdict, lr multiplier, d, evidence and reason, then rank the safe
    ones (``rank_safe``). Where a validation loss can judge a snapshot (``Evidence.at``), the
    verdict follows it; else, where the run logged a loss, the loss's level before the save
    against the run's own best (a fry it recovered from does not spoil a later snapshot; a high
    predicted restart ratio alone does not either); otherwise, the findings before it."""
    nonfinite_from, nonfinite_why = _first_affected(analysis, nonfinite_only=True) if analysis else (None, "")
    fried_from, fried_why = _first_affected(analysis) if analysis else (None, "")
    confirmed_from, confirmed_why = _first_affected(analysis, confirmed_only=True) if analysis else (None, "")
    risky_after, risky_why = _first_prediction(analysis) if analysis else (None, "")
    evidence = Evidence(run, analysis) if run is not None and analysis is not None else None
    group = None
    layout = LAYOUTS.get(analysis.trainer or "") if analysis else None
    lag = layout.save_lag if layout else 1
    if analysis is not None and analysis.groups:
        group = next((g for g in analysis.groups if g.adaptive), analysis.groups[0])
    for s in snapshots:
        s.verdict, s.lr_multiplier, s.d, s.rank = UNKNOWN, None, None, None
        s.loss_level = s.loss_ratio = s.validation_loss = s.validation_ratio = None
        if s.problem:
            s.reason = s.problem
            continue
        if s.step is None:
            s.reason = "its step could not be found (no ss_steps, no step in the name, no matching save time)"
            continue
        if group is None:
            s.reason = "no lr data for its run"
            continue
        covered = _lr_of_last_update(group, s.step, analysis.schedule if analysis else None, lag)
        if covered is not None:
            lr, peak, s.d = covered
            s.lr_multiplier = round(lr / peak, 6) if peak > 0 and np.isfinite(lr) else None
        judged = evidence.at(s) if evidence is not None else None
        if nonfinite_from is not None and s.step >= nonfinite_from:
            s.verdict, s.reason = FRIED, f"saved after the blow-up: {nonfinite_why}"
            continue
        if judged == "loss" and s.validation_ratio is not None and s.validation_ratio >= fried_validation:
            judged = "validation"  # far above every validation loss before: worse than them, whatever they were
        said = _evidence_words(s, evidence, judged)
        if (judged == "validation" and s.validation_ratio >= fried_validation  # type: ignore[operator]
                or judged == "loss" and s.loss_ratio >= fried_loss):  # type: ignore[operator]
            s.verdict, s.reason = FRIED, said
            continue
        if not judged and fried_from is not None and s.step >= fried_from:
            s.verdict, s.reason = FRIED, f"saved after the blow-up: {fried_why} (no loss logged to judge it)"
            continue
        frozen_since = evidence.frozen_since(s.step) if evidence is not None else None
        if confirmed_from is not None and frozen_since is not None and frozen_since >= confirmed_from:
            # A validation loss at fixed timesteps and seed that repeats to the last digit while the lr is
            # not zero: the weights no longer change. After a blow-up, that is a broken run (its output
            # stuck), however good the level looks next to the levels since the blow-up.
            s.verdict = FRIED
            s.reason = (f"saved after the blow-up: {confirmed_why}; the validation loss has been exactly "
                        f"{_num(s.validation_loss)} since step {frozen_since}: the weights no longer change")
            continue
        if covered is None:
            s.reason = f"no lr logged for step {s.step - lag}, whose lr made its last update"
            continue
        if not judged and risky_after is not None and s.step > risky_after:
            s.verdict, s.reason = AT_RISK, f"saved after {risky_why}, before any blow-up (no loss logged to judge it)"
        elif s.lr_multiplier is not None and s.lr_multiplier <= safe_lr:
            s.verdict = SAFE
            s.reason = f"last update at {s.lr_multiplier:.3g} of the cycle's peak lr: at a cycle minimum"
            if said:
                s.reason += f"; {said}"
        else:
            mult = "unknown" if s.lr_multiplier is None else f"{s.lr_multiplier:.3g}"
            s.verdict, s.reason = HIGH_LR, f"last update at {mult} of the cycle's peak lr: mid-cycle"
    rank_safe(snapshots)


def _evidence_words(s: Snapshot, evidence: Evidence | None, judged: str | None) -> str:
    if judged == "validation":
        return f"validation loss {_num(s.validation_loss)} at its step is {s.validation_ratio:.3g}x its best before"
    if judged == "loss" and evidence is not None:
        return (f"the loss over the {evidence.words} before its save is {s.loss_ratio:.3g}x the run's best level "
                "before it")
    return ""


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _ranking(safe: list[Snapshot]) -> tuple[str, Callable[[Snapshot], tuple]]:
    """What the safe snapshots are ranked by, and the key: the steadiest evidence they all have."""
    if all(s.validation_loss is not None and math.isfinite(s.validation_loss) for s in safe):
        return "the validation loss at each save", lambda s: (s.validation_loss, -(s.step or 0))
    if all(s.loss_level is not None for s in safe):
        return f"the loss's level over the {LOSS_WINDOW} steps before each save", \
            lambda s: (s.loss_level, -(s.step or 0))
    return "the step, newest first (no loss at every safe save to rank by)", lambda s: (-(s.step or 0), s.path)


def rank_safe(snapshots: list[Snapshot]) -> None:
    """Rank the safe snapshots, best first (lower loss first; the later of a tie)."""
    safe = [s for s in snapshots if s.verdict == SAFE]
    if safe:
        for rank, s in enumerate(sorted(safe, key=_ranking(safe)[1]), 1):
            s.rank = rank


def ranking_basis(snapshots: list[Snapshot]) -> str | None:
    """What ``rank_safe`` went by, for the report."""
    safe = [s for s in snapshots if s.verdict == SAFE]
    return _ranking(safe)[0] if safe else None


def mostly_fried(snapshots: list[Snapshot]) -> bool:
    """Whether most of a run's judged snapshots are fried: such a run is not ok."""
    judged = [s for s in snapshots if s.verdict != UNKNOWN]
    return len(judged) >= 2 and 2 * sum(s.verdict == FRIED for s in judged) > len(judged)


def belongs_to(snapshot: Snapshot, run: RunLike, only_run: bool) -> bool:
    """By the run's logged output_name, else a run folder named <output name>[<YYYYMMDDHHMMSS>]
    (kohya's <log_prefix><timestamp>; ai-toolkit's <name>_<YYYYmmdd-HHMMSS>; OneTrainer's saves
    carry the run folder's name); the only run owns everything."""
    if only_run:
        return True
    base = snapshot.base
    if not base:
        return False
    if base == str(run.config.get("output_name") or ""):
        return True
    folder = re.compile(re.escape(base) + r"[-_]?(\d{14}|\d{8}-\d{6})?")  # kohya's, ai-toolkit's time stamps
    return any(folder.fullmatch(part) for part in run.path.parts)


def _covering(owners: list, snap: Snapshot):
    """Of the runs a snapshot's name matches (a run and its resumed part share the output name),
    the one whose logged steps reach its step; else the first."""
    if snap.step is not None:
        for state in reversed(owners):  # the latest part that reached it
            a = state.analysis
            first = min((int(g.steps[0]) for g in a.groups if len(g.steps)), default=None) if a else None
            if first is not None and a.last_step is not None and first <= snap.step <= a.last_step:
                return state
    return owners[0]


def best_snapshot(snapshots: list[Snapshot]) -> Snapshot | None:
    """The snapshot to keep: the best safe one by ``rank_safe``'s evidence; never a fried one."""
    safe = [s for s in snapshots if s.verdict == SAFE]
    return min(safe, key=_ranking(safe)[1]) if safe else None


def manifest_text(folder: Path, snapshots: list[Snapshot], run_names: dict[str, str]) -> str:
    return dumps({
        "written_by": "lrwatch", "written_at": time.time(), "folder": str(folder),
        "snapshots": [{**s.to_dict(), "run": run_names.get(s.path)} for s in snapshots],
        "best": (b.path if (b := best_snapshot(snapshots)) else None),
    }, indent=2)


class SnapshotBook:
    """The snapshots of some folders, assigned to runs and judged; headers are read once per
    file version (size, mtime), so the watcher can re-judge whenever anything changes."""

    def __init__(self, folders: list[str | os.PathLike[str]], steps_per_epoch: int | None = None,
                 safe_lr: float = DEFAULT_SAFE_LR, fried_loss: float = DEFAULT_FRIED_LOSS,
                 fried_validation: float = DEFAULT_FRIED_VALIDATION,
                 storage_options: dict | None = None) -> None:
        if not 0 < safe_lr <= 1:
            raise OptionError(f"safe_lr (--safe-lr) is a share of the cycle's peak lr, above 0 and at most 1, "
                             f"not {safe_lr}")
        if not (fried_loss > 1 and fried_validation > 1):
            raise OptionError(f"fried_loss and fried_validation (--fried-loss, --fried-validation) are ratios to the "
                             f"run's best, above 1, not {fried_loss} and {fried_validation}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise OptionError(f"steps_per_epoch (--steps-per-epoch) must be 1 or more, not {steps_per_epoch}")
        located = [location(f, storage_options) for f in folders]
        self.folders = [f if is_remote(f) else Path(os.path.abspath(f)) for f in located]
        self.steps_per_epoch = steps_per_epoch
        self.safe_lr = safe_lr
        self.fried_loss = fried_loss
        self.fried_validation = fried_validation
        self._cache: dict[Path, tuple[tuple[int, float], Snapshot]] = {}
        self.by_run: dict[Path, list[Snapshot]] = {}
        self.orphans: list[Snapshot] = []  # snapshots no run could be matched with

    def _scan(self) -> list[Snapshot]:
        out = []
        for folder in self.folders:
            for path in snapshot_paths(folder):
                try:
                    st = path.stat()
                except OSError:
                    continue  # removed since listed
                key = (st.st_size, st.st_mtime)
                cached = self._cache.get(path)
                if cached is None or cached[0] != key:  # new or rewritten: read its header (again)
                    cached = self._cache[path] = (key, describe(path))
                out.append(_fresh_copy(cached[1]))
        return out

    def judge(self, states: list) -> list[Snapshot]:
        """Assign every snapshot to a run (by kohya output name, else the only run) and judge it."""
        snaps = self._scan()
        runs = [s.run for s in states]
        self.by_run = {r.path: [] for r in runs}
        self.orphans = []
        for snap in snaps:
            owners = [s for s in states if belongs_to(snap, s.run, len(runs) == 1)]
            owner = _covering(owners, snap).run if owners else None
            if owner is None:
                snap.reason = "no watched run matches it (by output name); give one run's logs"
                self.orphans.append(snap)
            else:
                self.by_run[owner.path].append(snap)
        for state in states:
            mine = self.by_run[state.run.path]
            resolve_steps(mine, state.series_source, self.steps_per_epoch)
            judge(mine, state.analysis, self.safe_lr, state.series_source, self.fried_loss, self.fried_validation)
            _optimizer_hint(state.analysis, mine)
            mine.sort(key=lambda s: (s.step is None, s.step or 0, s.path))
        return snaps

    def write_manifests(self) -> list[str]:
        """Write each folder's manifest; return what could not be written (a read-only folder,
        a directory in the manifest's place): reported, never fatal."""
        problems = []
        names = {s.path: str(run) for run, snaps in self.by_run.items() for s in snaps}
        for folder in self.folders:
            if is_remote(folder):
                problems.append(f"{folder}: no manifest is written to remote storage (the verdicts are in the "
                                "report; --no-manifest skips this note)")
                continue
            if not folder.is_dir():
                continue
            mine = [s for snaps in self.by_run.values() for s in snaps if Path(s.path).parent == folder]
            mine += [s for s in self.orphans if Path(s.path).parent == folder]
            target = folder / MANIFEST
            try:
                write_atomic(target, manifest_text(folder, mine, names))
            except OSError as e:
                problems.append(f"could not write {target}: {e.strerror or e} (verdicts are in the report; "
                                "--no-manifest skips the file)")
        return problems


def _optimizer_hint(analysis: Analysis | None, snapshots: list[Snapshot]) -> None:
    """A run without d*lr whose snapshots say it trained with Prodigy or D-Adaptation: say why."""
    if analysis is None or any(g.adaptive for g in analysis.groups):
        return
    for snap in snapshots:
        optimizer = (snap.metadata or {}).get("ss_optimizer")
        hint = adaptive_optimizer_hint(optimizer, f"snapshot {Path(snap.path).name}") if optimizer else None
        if hint:
            if hint not in analysis.notes:
                analysis.notes.append(hint)
            return


def _fresh_copy(snap: Snapshot) -> Snapshot:
    """A shallow copy to judge: the cached one keeps only what was read from disk."""
    return replace(snap)
