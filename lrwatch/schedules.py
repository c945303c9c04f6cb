"""Learning-rate multipliers of cyclic schedules, as plain functions of the step.

Torch-free on purpose: the analysis and ``lrwatch plan`` use the same formulas as
the torch schedulers in :mod:`lrwatch.schedulers`, so what lrwatch predicts is
exactly what the trainer runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine_hard_restarts(step: int, warmup: int, total: int, cycles: float) -> float:
    """transformers/diffusers ``get_cosine_with_hard_restarts_schedule_with_warmup``.

    This is what kohya's ``--lr_scheduler cosine_with_restarts`` runs.
    """
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))


def cosine_restart_steps(total: int, warmup: int, cycles: int) -> list[int]:
    """Steps at which :func:`cosine_hard_restarts` jumps back to 1 (the first step of cycles 2..C)."""
    span = total - warmup
    return [warmup + math.ceil(k * span / cycles - 1e-9) for k in range(1, cycles)]


def rex_shape(remaining: float, rex_b: float = 0.5) -> float:
    """REX (Chen, Wolfe, Kyrillidis 2021): ``z / ((1-b) + b*z)``, z the remaining fraction."""
    return remaining / ((1.0 - rex_b) + rex_b * remaining)


def cosine_shape(remaining: float) -> float:
    """Half a cosine from 1 (z=1) down to 0 (z=0)."""
    return 0.5 * (1.0 + math.cos(math.pi * (1.0 - remaining)))


@dataclass(frozen=True)
class CyclePosition:
    cycle: int  # 0-based; -1 during warmup
    start: int  # first step of the cycle
    length: int  # steps in the cycle


def cycle_position(step: int, first_cycle: int, cycle_mult: float = 1.0, warmup: int = 0) -> CyclePosition:
    """Which cycle ``step`` falls in when cycles grow by ``cycle_mult`` (SGDR)."""
    if first_cycle < 1:
        raise ValueError(f"first_cycle must be at least 1 step, got {first_cycle}")
    if cycle_mult < 1:
        raise ValueError(f"cycle_mult must be >= 1, got {cycle_mult}")
    if step < warmup:
        return CyclePosition(-1, 0, warmup)
    if cycle_mult == 1:  # equal cycles: no walk (a step of cycle 50,000 costs what one of cycle 0 does)
        cycle = (step - warmup) // first_cycle
        return CyclePosition(cycle, warmup + cycle * first_cycle, first_cycle)
    start, cycle, length = warmup, 0, first_cycle  # growing cycles: a few dozen at most before they outgrow any run
    while step >= start + length:
        start += length
        cycle += 1
        length = max(1, round(first_cycle * cycle_mult**cycle))
    return CyclePosition(cycle, start, length)


def cyclic_multiplier(
    step: int,
    *,
    first_cycle: int,
    shape: str = "rex",
    cycle_mult: float = 1.0,
    min_lr_ratio: float = 0.0,
    warmup: int = 0,
    gamma: float = 1.0,
    rex_b: float = 0.5,
) -> float:
    """Multiplier of lrwatch's ``RexWithRestarts``/``CosineWithRestarts`` at ``step``.

    Each cycle decays from its peak (``gamma**cycle``) towards ``min_lr_ratio`` of
    that peak; the last step of a cycle is its minimum, the next step restarts.
    """
    if warmup and step < warmup:
        return step / warmup
    pos = cycle_position(step, first_cycle, cycle_mult, warmup)
    remaining = 1.0 - (step - pos.start) / pos.length
    if shape == "rex":
        decay = rex_shape(remaining, rex_b)
    elif shape == "cosine":
        decay = cosine_shape(remaining)
    else:
        raise ValueError(f"unknown shape {shape!r}: use 'rex' or 'cosine'")
    return gamma**pos.cycle * (min_lr_ratio + (1.0 - min_lr_ratio) * decay)


def cyclic_restart_steps(total: int, first_cycle: int, cycle_mult: float = 1.0, warmup: int = 0) -> list[int]:
    """Steps up to ``total`` at which :func:`cyclic_multiplier` starts a new cycle: one pass,
    O(cycles) (a logged config may ask for tens of thousands)."""
    steps: list[int] = []
    start, cycle, length = warmup, 0, first_cycle
    while start + length <= total:
        start += length
        steps.append(start)
        cycle += 1
        length = max(1, round(first_cycle * cycle_mult**cycle))
    return steps
