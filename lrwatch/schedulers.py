"""Cyclic schedules with restarts for torch, and a guard against d blowing up.

The only lrwatch module that imports torch. kohya builds a custom scheduler as
``Class(optimizer, **kwargs)``::

    --lr_scheduler_type lrwatch.schedulers.RexWithRestarts
    --lr_scheduler_args first_cycle=500 warmup=0 d_guard=True

The guard (``d_guard=True``, or :class:`DGuard` around any other scheduler)
reads the adaptive optimizer's ``d`` from ``param_groups`` after every step and
lowers the lr so that ``d * lr`` never exceeds a reference: ``max_dlr`` when
given, else the highest ``d * lr`` each param group reached during the warmup
and first cycle (D-Adaptation keeps a ``d`` per group). The lowered lr is what
``get_last_lr()`` returns, so the trainer's ``lr/...`` curve shows every
intervention; ``scheduler.guard.reference`` (per group) and
``scheduler.guard.interventions`` say what it did.
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lrwatch.schedules import cycle_position, cyclic_multiplier

__all__ = ["RexWithRestarts", "CosineWithRestarts", "DGuard"]


class _Guard:
    """Caps each param group's lr so that its d*lr stays at or under that group's reference.
    State lives in plain attributes so that it travels with the scheduler's ``state_dict``."""

    def __init__(self, max_dlr: float | None) -> None:
        if max_dlr is not None and not (max_dlr > 0 and math.isfinite(max_dlr)):
            raise ValueError(f"max_dlr must be a positive finite number, got {max_dlr}")
        self.max_dlr = max_dlr
        self.reference: list[float | None] = []  # per param group: the ceiling on d*lr (None: not known yet)
        self.interventions = 0  # steps on which some group's lr was lowered

    @property
    def cap(self) -> list[float | None]:
        """The ceiling on d*lr now applied to each param group."""
        return list(self.reference)

    def apply(self, optimizer: Optimizer, lrs: list[float], learning: bool) -> list[float]:
        """Return ``lrs`` lowered where needed; while ``learning`` (warmup and first cycle, no
        user cap) each group's reference follows its highest d*lr instead."""
        if len(self.reference) != len(lrs):
            self.reference = [self.max_dlr] * len(lrs)
        out = []
        lowered = False
        for i, (group, lr) in enumerate(zip(optimizer.param_groups, lrs)):
            d = group.get("d")
            if d is None or not lr > 0:
                out.append(lr)
                continue
            d = float(d)
            ref = self.reference[i]
            if learning and self.max_dlr is None:
                self.reference[i] = max(ref or 0.0, d * lr)
            elif ref is not None and d * lr > ref:
                lr = ref / d
                lowered = True
            out.append(lr)
        self.interventions += lowered
        return out


class _CyclicScheduler(LRScheduler):
    _shape = "rex"

    def __init__(
        self,
        optimizer: Optimizer,
        first_cycle: int,
        cycle_mult: float = 1.0,
        min_lr_ratio: float = 0.0,
        warmup: int = 0,
        gamma: float = 1.0,
        d_guard: bool = False,
        max_dlr: float | None = None,
        last_epoch: int = -1,
        **shape_kwargs: Any,
    ) -> None:
        if int(first_cycle) < 1:
            raise ValueError(f"first_cycle must be a positive number of steps, got {first_cycle}")
        if not 0.0 <= min_lr_ratio < 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1), got {min_lr_ratio}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.first_cycle = int(first_cycle)
        self.cycle_mult = float(cycle_mult)
        self.min_lr_ratio = float(min_lr_ratio)
        self.warmup = int(warmup)
        self.gamma = float(gamma)
        self.shape_kwargs = shape_kwargs
        self.guard = _Guard(max_dlr) if (d_guard or max_dlr is not None) else None
        cycle_position(0, self.first_cycle, self.cycle_mult)  # validates cycle_mult early
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        return cyclic_multiplier(
            step,
            first_cycle=self.first_cycle,
            shape=self._shape,
            cycle_mult=self.cycle_mult,
            min_lr_ratio=self.min_lr_ratio,
            warmup=self.warmup,
            gamma=self.gamma,
            **self.shape_kwargs,
        )

    def get_lr(self) -> list[float]:  # type: ignore[override]
        step = self.last_epoch
        lrs = [float(base) * self.multiplier(step) for base in self.base_lrs]
        if self.guard is not None:
            in_first_cycle = cycle_position(step, self.first_cycle, self.cycle_mult, self.warmup).cycle <= 0
            lrs = self.guard.apply(self.optimizer, lrs, learning=in_first_cycle)
        return lrs

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["guard"] = None if self.guard is None else dict(vars(self.guard))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        guard = state.pop("guard", None)
        super().load_state_dict(state)
        if guard is not None:
            self.guard = _Guard(guard["max_dlr"])
            vars(self.guard).update(guard)


class RexWithRestarts(_CyclicScheduler):
    """REX decay (``z / ((1-rex_b) + rex_b*z)``, ``rex_b=0.5`` as in the paper) restarted every cycle."""

    _shape = "rex"

    def __init__(self, optimizer: Optimizer, first_cycle: int, rex_b: float = 0.5, **kwargs: Any) -> None:
        if not 0.0 <= rex_b < 1.0:
            raise ValueError(f"rex_b must be in [0, 1), got {rex_b}")
        super().__init__(optimizer, first_cycle, rex_b=rex_b, **kwargs)


class CosineWithRestarts(_CyclicScheduler):
    """Half-cosine decay restarted every cycle (SGDR with ``cycle_mult``)."""

    _shape = "cosine"


class DGuard:
    """Wraps any lr scheduler and caps ``d * lr`` like ``d_guard=True`` does.

    Without ``max_dlr``, the reference is learned until ``reference_steps``, the step of
    the first restart (warmup + first cycle): the restart itself is already guarded.
    """

    def __init__(self, scheduler: Any, reference_steps: int | None = None, max_dlr: float | None = None) -> None:
        if max_dlr is None and not reference_steps:
            raise ValueError("DGuard needs max_dlr or reference_steps (the length of the first cycle)")
        self.scheduler = scheduler
        self.optimizer = scheduler.optimizer
        self.reference_steps = reference_steps
        self.guard = _Guard(max_dlr)
        self._unguarded = list(scheduler.get_last_lr())
        self._apply()

    def _apply(self) -> None:
        learning = self.reference_steps is not None and self.scheduler.last_epoch < self.reference_steps
        lrs = self.guard.apply(self.optimizer, self._unguarded, learning)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs

    def step(self) -> None:
        # Chainable schedulers compute from the current lr: give them back the unguarded one.
        for group, lr in zip(self.optimizer.param_groups, self._unguarded):
            group["lr"] = lr
        self.scheduler.step()
        self._unguarded = list(self.scheduler.get_last_lr())
        self._apply()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    @property
    def last_epoch(self) -> int:
        return self.scheduler.last_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "guard": dict(vars(self.guard)),
                "unguarded": self._unguarded, "last_lr": self._last_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        vars(self.guard).update(state["guard"])
        self._unguarded = list(state["unguarded"])
        self._last_lr = list(state["last_lr"])
