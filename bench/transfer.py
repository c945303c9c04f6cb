"""Does lrwatch's judgment transfer to a task it was not tuned on? Leave-one-task-out over the
tasks of ``fixtures/tasks.py`` (an MLP with epsilon prediction, a conv U-Net with attention and
v-prediction + min-SNR, a tiny DiT with flow matching; real Prodigy / D-Adaptation runs).

    python bench/transfer.py [--runs] [--task NAME]   # leave each task out in turn
    python bench/transfer.py --all                    # choose on every task: lrwatch's defaults
    python bench/transfer.py --defaults [--runs]      # lrwatch's defaults, task by task

For each task left out, every threshold is chosen on the other tasks only, then the real
``lrwatch.audit`` with those thresholds judges the left-out task's runs. Twice: with the
logs as written (a validation loss, kohya's ``--validation_split``) and with the validation
tags removed (a run that logs none). Ground truth is the eval loss of ``labels.json``,
never in the logs. The classes are the issue's:

- a clear fry: its eval reaches 2.5x its best before, stays fried to the end, or goes non-finite;
- a clear-healthy run: its eval never rises above 1.5x its best before;
- a catch in time: the first critical at most 25 steps after the first fried eval, and not
  earlier than half a cycle before it (25 steps here).

Chosen, in this order, on the training tasks:
1. without validation: the loss rule's window, chance allowance and ratio (``loss_window``,
   ``loss_noise_sigmas``, ``loss_over_best``; d's runaway rule off): no critical on a
   clear-healthy run, then the most clear fries caught in time, then the middle of the tied ones;
   then ``runaway_critical`` the same way, with that loss rule;
2. without validation: ``fried_loss``, the snapshot verdicts' ratio: the most verdicts right;
3. with validation: ``validation_over_best``: as 1; then ``fried_validation`` as 2.
The defaults shipped in lrwatch are the choice made on all tasks together.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lrwatch  # noqa: E402
from lrwatch.analysis import CRITICAL, Thresholds  # noqa: E402
from lrwatch.snapshots import (  # noqa: E402
    DEFAULT_FRIED_LOSS,
    DEFAULT_FRIED_VALIDATION,
    FRIED,
    SAFE,
    UNKNOWN,
    best_snapshot,
    judge,
)

TASKS = ROOT / "fixtures" / "tasks"
HALF_CYCLE = 25
LATE = 25
LOSS_WINDOWS = (25, 50)
LOSS_SIGMAS = (2.0, 3.0, 4.0)
LOSS_RATIOS = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0)
RUNAWAYS = (10.0, 30.0, 100.0)
FRIED_LOSSES = (1.5, 2.0, 2.5, 3.0, 4.0)
VALIDATION_RATIOS = (1.3, 1.5, 1.8, 2.0, 2.5)
FRIED_VALIDATIONS = (1.3, 1.5, 1.8, 2.0, 2.5)


@dataclass(frozen=True, eq=False)
class Case:
    task: str
    name: str
    label: dict

    @property
    def folder(self) -> Path:
        return TASKS / self.task / "runs" / self.name


def cases() -> list[Case]:
    out = []
    for task_dir in sorted(p for p in TASKS.iterdir() if (p / "labels.json").exists()):
        labels = json.loads((task_dir / "labels.json").read_text())
        out += [Case(task_dir.name, name, label) for name, label in sorted(labels.items())]
    return out


def without_validation(case: Case, dest: Path) -> Path:
    """The case's logs as a run without ``--validation_split`` writes them: every tag but the
    validation loss, in one event file written with tensorboard's RecordWriter, config beside."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    from lrwatch.runs import Run

    (tb,) = (case.folder / "logs").iterdir()
    run = Run(tb / "network_train")
    run.refresh()
    folder = dest / case.task / case.name / tb.name / "network_train"
    folder.mkdir(parents=True)
    shutil.copy(tb / "network_train" / "hparams.yml", folder / "hparams.yml")
    rows = sorted((int(step), tag, float(value), float(wall)) for tag in run.tags
                  if not tag.startswith("loss/validation") and (series := run.series(tag)) is not None
                  for step, value, wall in zip(series.steps, series.values, series.wall_times))
    with open(folder / f"events.out.tfevents.{int(time.time())}.tasks.1.0", "wb") as fh:
        writer = RecordWriter(fh)
        writer.write(Event(wall_time=rows[0][3], file_version="brain.Event:2").SerializeToString())
        for step, tag, value, wall in rows:
            writer.write(Event(wall_time=wall, step=step, summary=Summary(
                value=[Summary.Value(tag=tag, simple_value=value)])).SerializeToString())
    return dest / case.task / case.name


class Judged:
    """One audit of one case's logs with given thresholds; snapshot verdicts can be judged again
    with other snapshot thresholds without reading the run again."""

    def __init__(self, case: Case, logs: Path, thresholds: Thresholds) -> None:
        self.case = case
        result = lrwatch.audit([logs], thresholds=thresholds, snapshots=[case.folder / "output"], manifest=False,
                               workers=1)
        self.state = result.runs[0]
        self.snaps = result.monitor.snapshots.by_run.get(self.state.run.path, []) if result.monitor.snapshots else []
        findings = self.state.analysis.findings if self.state.analysis else []
        self.criticals = [f for f in findings if f.severity == CRITICAL]
        self.first_critical = min((f.step for f in self.criticals), default=None)
        self.first_strong = min((f.step for f in findings if f.values.get("strong")), default=None)

    def rejudge(self, fried_loss: float, fried_validation: float) -> None:
        judge(self.snaps, self.state.analysis, run=self.state.series_source, fried_loss=fried_loss,
              fried_validation=fried_validation)


_AUDITS: dict[tuple[int, Path, Thresholds], Judged] = {}


def judged(case: Case, logs: Path, thresholds: Thresholds) -> Judged:
    """``Judged``, once per case, logs and thresholds (each run is in two folds' training tasks)."""
    key = (id(case), logs, thresholds)
    if key not in _AUDITS:
        _AUDITS[key] = Judged(case, logs, thresholds)
    return _AUDITS[key]


def in_time(case: Case, step: int | None) -> bool:
    fried = case.label["first_fried_step"]
    return step is not None and fried is not None and fried - HALF_CYCLE <= step <= fried + LATE


def verdicts_right(j: Judged) -> tuple[int, int]:
    truth = {s["file"]: s["fried"] for s in j.case.label["snapshots"]}
    right = total = 0
    for snap in j.snaps:
        name = Path(snap.path).name
        if name not in truth:
            continue
        total += 1
        right += snap.verdict != UNKNOWN and (snap.verdict in (FRIED, "at_risk")) == truth[name]
    return right, total


def score_findings(judged: list[Judged], policy: str = "confirm") -> dict:
    fries = [j for j in judged if j.case.label["clear"] == "fry"]
    healthy = [j for j in judged if j.case.label["clear"] == "healthy"]

    def stop(j: Judged) -> int | None:
        steps = [s for s in (j.first_critical, j.first_strong if policy == "predict" else None) if s is not None]
        return min(steps, default=None)

    return {"caught": [j for j in fries if in_time(j.case, stop(j))],
            "missed": [j for j in fries if not in_time(j.case, stop(j))],
            "fries": fries, "healthy": healthy,
            "false": [j for j in healthy if stop(j) is not None]}


def choose_rule(training: list[Case], logs: dict, grid: list[Thresholds]) -> Thresholds:
    """The thresholds with no critical on a clear-healthy run and the most fries caught in time;
    among equals, the middle one in ``grid``'s order (the farthest from both edges of the plateau)."""
    keys = []
    for th in grid:
        s = score_findings([judged(c, logs[c], th) for c in training])
        keys.append((len(s["false"]) == 0, len(s["caught"]) - len(s["false"])))
    tied = [th for th, key in zip(grid, keys) if key == max(keys)]
    return tied[len(tied) // 2]


def choose_verdicts(judged: list[Judged], grid: list[tuple[float, float]]) -> tuple[float, float]:
    best, best_right = grid[0], -1
    for fried_loss, fried_validation in grid:
        right = 0
        for j in judged:
            j.rejudge(fried_loss, fried_validation)
            right += verdicts_right(j)[0]
        if right > best_right:
            best, best_right = (fried_loss, fried_validation), right
    return best


def last_before_fry_safe(j: Judged) -> bool | None:
    """Whether the last snapshot saved before the first fried eval (not itself fried) is safe."""
    fried = j.case.label["first_fried_step"]
    if fried is None:
        return None
    truth = {s["file"]: s for s in j.case.label["snapshots"]}
    before = [s for s in j.snaps if s.step is not None and s.step < fried and Path(s.path).name in truth
              and not truth[Path(s.path).name]["fried"]]
    if not before:
        return None
    return max(before, key=lambda s: s.step).verdict == SAFE


def best_within(j: Judged, factor: float = 1.05) -> bool | None:
    """Whether --best's pick has a validation loss within ``factor`` of the lowest at any save."""
    known = [s for s in j.snaps if s.validation_loss is not None and math.isfinite(s.validation_loss)]
    pick = best_snapshot(j.snaps)
    if not known or pick is None or pick.validation_loss is None:
        return None
    return pick.validation_loss <= factor * min(s.validation_loss for s in known)


def first_fried_validation(j: Judged) -> int | None:
    """The first validation point in the logs above 2x its best before (the eval's fry factor)."""
    tag = j.state.analysis.validation_tag if j.state.analysis else None
    series = j.state.run.series(tag) if tag else None
    if series is None:
        return None
    best = math.inf
    for step, value in zip(series.steps.tolist(), series.values.tolist()):
        if not math.isfinite(value) or value > 2.0 * best:
            return step
        best = min(best, value)
    return None


def choose(training: list[Case], plain: dict, validated: dict) -> tuple[Thresholds, Thresholds, float, float]:
    """Every threshold, chosen on ``training`` (the module docstring's order)."""
    base = replace(Thresholds(), runaway_critical=1e9)  # the loss rule first, on its own
    loss_grid = [replace(base, loss_window=w, loss_noise_sigmas=k, loss_over_best=r)
                 for w in LOSS_WINDOWS for k in LOSS_SIGMAS for r in LOSS_RATIOS]
    th = choose_rule(training, plain, loss_grid)
    th = choose_rule(training, plain, [replace(th, runaway_critical=x) for x in RUNAWAYS])
    fried_loss, _ = choose_verdicts([judged(c, plain[c], th) for c in training],
                                    [(x, DEFAULT_FRIED_VALIDATION) for x in FRIED_LOSSES])
    th_val = choose_rule(training, validated, [replace(th, validation_over_best=r) for r in VALIDATION_RATIOS])
    _, fried_validation = choose_verdicts([judged(c, validated[c], th_val) for c in training],
                                          [(fried_loss, x) for x in FRIED_VALIDATIONS])
    return th, th_val, fried_loss, fried_validation


def summary(judged_runs: list[Judged], fried: tuple[float, float], with_validation: bool) -> dict[str, tuple[int, int]]:
    """The issue's measures, as (count, out of)."""
    for j in judged_runs:
        j.rejudge(*fried)
    s, p = score_findings(judged_runs), score_findings(judged_runs, "predict")
    right = [verdicts_right(j) for j in judged_runs]
    last = [v for j in judged_runs if (v := last_before_fry_safe(j)) is not None]
    out = {"caught": (len(s["caught"]), len(s["fries"])), "healthy_critical": (len(s["false"]), len(s["healthy"])),
           "predict_caught": (len(p["caught"]), len(p["fries"])),
           "predict_healthy_stopped": (len(p["false"]), len(p["healthy"])),
           "verdicts": (sum(r for r, _ in right), sum(t for _, t in right)), "last_safe": (sum(last), len(last))}
    if with_validation:
        with_point = [j for j in s["fries"] if first_fried_validation(j) is not None]
        at_first = [j for j in with_point if j.first_critical is not None
                    and j.first_critical <= first_fried_validation(j)]  # type: ignore[operator]
        picks = [v for j in judged_runs if (v := best_within(j)) is not None]
        out["at_first_validation"] = (len(at_first), len(with_point))
        out["best_within_5"] = (sum(picks), len(picks))
    return out


def report(label: str, th: Thresholds, fried: tuple[float, float], judged_runs: list[Judged],
           with_validation: bool, show_runs: bool) -> None:
    got = summary(judged_runs, fried, with_validation)
    s = score_findings(judged_runs)

    def of(key: str) -> str:
        return f"{got[key][0]}/{got[key][1]}"

    right, total = got["verdicts"]
    print(f"  {label}: loss_window {th.loss_window}, loss_noise_sigmas {th.loss_noise_sigmas:g}, "
          f"loss_over_best {th.loss_over_best:g}, runaway_critical {th.runaway_critical:g}, "
          f"validation_over_best {th.validation_over_best:g}, fried_loss {fried[0]:g}, fried_validation {fried[1]:g}")
    print(f"    clear fries caught in time (--kill-at confirm): {of('caught')}"
          + (f"  missed: {', '.join(j.case.name for j in s['missed'])}" if s["missed"] else ""))
    print(f"    clear-healthy runs with a critical: {of('healthy_critical')}"
          + (f" ({', '.join(j.case.name for j in s['false'])})" if s["false"] else ""))
    print(f"    --kill-at predict: fries stopped in time {of('predict_caught')}, healthy runs stopped "
          f"{of('predict_healthy_stopped')}")
    print(f"    snapshot verdicts right: {right}/{total} ({100 * right / max(total, 1):.1f}%)")
    print(f"    last snapshot before a fry judged safe: {of('last_safe')}")
    if with_validation:
        print(f"    clear fries caught at their first fried validation point: {of('at_first_validation')}")
        print(f"    --best within 5% of the lowest validation loss: {of('best_within_5')}")
    if show_runs:
        for j in judged_runs:
            lab = j.case.label
            r, t = verdicts_right(j)
            first = next((f.values.get("what") or f.kind for f in j.criticals if f.step == j.first_critical), "")
            print(f"      {j.case.name:24s} {lab['clear']:8s} fried at {lab['first_fried_step']!s:5s} "
                  f"first critical {j.first_critical!s:5s} {first!s:24s} verdicts {r}/{t}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", action="store_true", help="one line per run")
    ap.add_argument("--task", help="only this left-out task")
    ap.add_argument("--all", action="store_true", help="choose every threshold on all tasks (lrwatch's defaults)")
    ap.add_argument("--defaults", action="store_true", help="lrwatch's defaults, reported task by task")
    args = ap.parse_args()
    all_cases = cases()
    tasks = sorted({c.task for c in all_cases})
    if len(tasks) < 3:
        print(f"need at least 3 tasks under {TASKS} (python fixtures/tasks.py); found {tasks}")
        return 2
    scratch = tempfile.TemporaryDirectory(prefix="lrwatch-transfer-")
    plain = {c: without_validation(c, Path(scratch.name)) for c in all_cases}
    validated = {c: c.folder / "logs" for c in all_cases}
    if args.all:
        th, th_val, fried_loss, fried_validation = choose(all_cases, plain, validated)
        print(f"chosen on every task: loss_window {th.loss_window}, loss_noise_sigmas {th.loss_noise_sigmas:g}, "
              f"loss_over_best {th.loss_over_best:g}, runaway_critical {th.runaway_critical:g}, "
              f"validation_over_best {th_val.validation_over_best:g}, fried_loss {fried_loss:g}, "
              f"fried_validation {fried_validation:g}")
        scratch.cleanup()
        return 0
    for left_out in ([args.task] if args.task else tasks):
        training = [c for c in all_cases if c.task != left_out]
        held = [c for c in all_cases if c.task == left_out]
        if args.defaults:
            th = th_val = Thresholds()
            fried_loss, fried_validation = DEFAULT_FRIED_LOSS, DEFAULT_FRIED_VALIDATION
        else:
            th, th_val, fried_loss, fried_validation = choose(training, plain, validated)
        counts = {k: sum(c.label["clear"] == k for c in held) for k in ("fry", "healthy", "unclear")}
        print(f"{'task' if args.defaults else 'left out'}: {left_out} ({len(held)} runs: {counts['fry']} clear fries, "
              f"{counts['healthy']} clear-healthy, {counts['unclear']} in between); "
              + ("lrwatch's defaults" if args.defaults else f"chosen on {', '.join(t for t in tasks if t != left_out)}"))
        report("without a validation loss", th, (fried_loss, fried_validation),
               [judged(c, plain[c], th) for c in held], False, args.runs)
        report("with a validation loss", th_val, (fried_loss, fried_validation),
               [judged(c, validated[c], th_val) for c in held], True, args.runs)
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
