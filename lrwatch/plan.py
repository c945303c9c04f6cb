"""Plan cycles so that every save lands on a cycle minimum (the snapshot-ensemble recipe).

Torch-free: the same formulas as the schedulers. A save at step N holds the weights
after update N, which used the lr logged at N-1, so a save is "at a minimum" when
the multiplier at N-1 is at most ``safe_lr`` (the snapshot verdicts' rule).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from lrwatch.schedules import cosine_hard_restarts, cosine_restart_steps, cyclic_multiplier, cyclic_restart_steps
from lrwatch.snapshots import DEFAULT_SAFE_LR


@dataclass
class Save:
    step: int
    multiplier: float  # of the lr that made the save's last update
    at_minimum: bool


@dataclass
class Plan:
    schedule: str  # cosine | rex
    max_steps: int
    save_every: int
    warmup: int
    cycles: int
    cycle_length: float
    restarts: list[int]
    minima: list[int]  # save steps that hold a cycle minimum (the step before each restart is the lowest lr)
    saves: list[Save]
    ok: bool
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    kohya_args: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def multiplier(schedule: str, step: int, max_steps: int, warmup: int, cycles: int, cycle_length: int) -> float:
    if schedule == "cosine":  # kohya's cosine_with_restarts (diffusers' hard restarts)
        return cosine_hard_restarts(step, warmup, max_steps, cycles)
    return cyclic_multiplier(step, first_cycle=cycle_length, warmup=warmup)


def make_plan(max_steps: int, save_every: int, warmup: int = 0, schedule: str = "cosine",
              cycles: int | None = None, safe_lr: float = DEFAULT_SAFE_LR) -> Plan:
    if max_steps < 1 or save_every < 1 or warmup < 0:
        raise ValueError("max steps and save cadence must be positive, warmup not negative")
    if warmup >= max_steps:
        raise ValueError("warmup must be shorter than the run")
    if schedule not in ("cosine", "rex"):
        raise ValueError("schedule is 'cosine' or 'rex'")
    if cycles is None:
        cycles = max(1, max_steps // save_every)  # the snapshot-ensemble arithmetic: one cycle per save
    if cycles < 1 or cycles > max_steps - warmup:
        raise ValueError("cycles must be at least 1 and at most the steps after warmup")
    span = max_steps - warmup
    length = span / cycles
    int_length = max(1, round(length))
    if schedule == "cosine":
        restarts = cosine_restart_steps(max_steps, warmup, cycles)
    else:  # the last cycle ends the run: no restart at max_steps
        restarts = [r for r in cyclic_restart_steps(max_steps, int_length, warmup=warmup)
                    if r < max_steps][: cycles - 1]
    saves = []
    for step in range(save_every, max_steps + 1, save_every):
        m = multiplier(schedule, step - 1, max_steps, warmup, cycles, int_length)
        saves.append(Save(step, round(m, 6), m <= safe_lr))
    minima = restarts + [max_steps]
    # A save during or at the end of the warmup holds the warmup's lr: never a minimum, and not a schedule flaw.
    plan = Plan(schedule, max_steps, save_every, warmup, cycles, length, restarts, minima, saves,
                ok=all(s.at_minimum for s in saves if s.step > warmup))
    _diagnose(plan, safe_lr)
    plan.kohya_args = kohya_args(plan)
    return plan


def _diagnose(plan: Plan, safe_lr: float) -> None:
    n = plan.save_every
    in_warmup = [s.step for s in plan.saves if s.step <= plan.warmup]
    if in_warmup:
        plan.notes.append(f"save(s) at {', '.join(map(str, in_warmup))} fall in the warmup, at its lr: skip them")
    missed = [s for s in plan.saves if not s.at_minimum and s.step > plan.warmup]
    if missed:
        shown = ", ".join(f"{s.step} (lr at {s.multiplier:.2g} of peak)" for s in missed[:6])
        more = f" and {len(missed) - 6} more" if len(missed) > 6 else ""
        plan.problems.append(f"{len(missed)} of {len(plan.saves)} saves miss a cycle minimum: {shown}{more}")
    if plan.ok:
        return
    if plan.warmup:
        plan.problems.append(f"the {plan.warmup} warmup steps shift the minima to {plan.warmup} + k x "
                             f"{plan.cycle_length:g}, away from multiples of {n}")
        plan.fixes.append("no warmup: --lr_warmup_steps 0 (Prodigy and D-Adaptation warm d up themselves; "
                          f"Prodigy's safeguard_warmup=True helps) -> {plan.max_steps // n} cycles of {n}")
        w = math.ceil(plan.warmup / n) * n
        if w + n <= plan.max_steps:
            plan.fixes.append(f"warmup of whole save intervals: --lr_warmup_steps {w} with "
                              f"{(plan.max_steps - w) // n} cycles (the save at step {w} ends the warmup, at the "
                              "peak: skip that one)")
    elif plan.max_steps % n:
        plan.problems.append(f"{plan.max_steps} steps are not a whole number of {n}-step cycles: "
                             f"the cycles are {plan.cycle_length:g} steps long")
        plan.fixes.append(f"--max_train_steps {plan.max_steps // n * n}: {plan.max_steps // n} whole cycles of {n}")


def kohya_args(plan: Plan) -> str:
    n, cycles = plan.save_every, plan.cycles
    common = f"--max_train_steps {plan.max_steps} --save_every_n_steps {n}"
    if plan.schedule == "cosine":
        warm = f" --lr_warmup_steps {plan.warmup}" if plan.warmup else ""
        return f"--lr_scheduler cosine_with_restarts --lr_scheduler_num_cycles {cycles}{warm} {common}"
    length = max(1, round(plan.cycle_length))
    return (f"--lr_scheduler_type lrwatch.schedulers.RexWithRestarts --lr_scheduler_args first_cycle={length} "
            f"warmup={plan.warmup} d_guard=True {common}")


def render_plan(plan: Plan) -> str:
    lines = [
        f"{plan.schedule} with restarts: {plan.max_steps} steps, a save every {plan.save_every}"
        + (f", {plan.warmup} warmup steps" if plan.warmup else ""),
        f"  cycles: {plan.cycles} of {plan.cycle_length:g} steps; restarts at "
        + _list(plan.restarts),
        f"  saves holding a cycle minimum would be at: {_list(plan.minima)}",
    ]
    judged = [s for s in plan.saves if s.step > plan.warmup]
    if plan.ok:
        after = " after the warmup" if len(judged) < len(plan.saves) else ""
        lines.append(f"  every save{after} lands on a cycle minimum ({len(judged)} saves)")
    for note in plan.notes:
        lines.append(f"  note: {note}")
    for p in plan.problems:
        lines.append(f"  problem: {p}")
    for f in plan.fixes:
        lines.append(f"  fix: {f}")
    lines.append("  kohya arguments:")
    lines.append(f"    {plan.kohya_args}")
    return "\n".join(lines)


def _list(steps: list[int], limit: int = 8) -> str:
    if len(steps) <= limit:
        return ", ".join(map(str, steps)) or "none"
    return ", ".join(map(str, steps[:limit])) + f", ... {steps[-1]} ({len(steps)} in all)"
