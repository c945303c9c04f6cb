"""What the trainer's logged configuration says about its schedule.

kohya with ``--log_config`` stores its arguments as hparams; from them the
restart steps are known before they happen and, past the last cycle, no restart
is coming at all.
"""

from __future__ import annotations

import ast
import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lrwatch.schedules import cosine_restart_steps, cyclic_restart_steps

# kohya/diffusers schedulers that never raise the lr again after warmup.
NO_RESTART_SCHEDULERS = {"constant", "constant_with_warmup", "linear", "cosine", "polynomial", "rex",
                         "inverse_sqrt", "warmup_stable_decay", "piecewise_constant", "adafactor"}


@dataclass(frozen=True)
class KnownSchedule:
    """Restart steps known from the config. ``restarts`` is None when the schedule is unknown."""

    name: str
    max_steps: int | None
    warmup: int
    restarts: tuple[int, ...] | None
    save_every: int | None
    problem: str | None = None  # why the logged schedule could not be used (restarts then unknown)
    # The lr at logged steps, for trainers that log only d×lr (rebuilt from their config or given).
    lr_at: Callable[[np.ndarray], np.ndarray] | None = field(default=None, compare=False, repr=False)
    source: str = "the logged config"

    def next_restart(self, step: int) -> int | None:
        """The first restart after ``step``; None if none is coming (or unknown: see ``restarts``)."""
        if self.restarts is None:
            return None
        i = bisect.bisect_right(self.restarts, step)
        return self.restarts[i] if i < len(self.restarts) else None


MAX_RESTARTS = 100_000  # more cycles than this is a mistyped setting, not a schedule


class _Unusable(ValueError):
    """A logged setting that cannot describe a schedule."""


def _int(config: dict, key: str) -> int | None:
    """A whole, non-negative number of steps (or cycles), or None when not logged."""
    return _whole(config.get(key), key)


def _whole(value: object, key: str, minimum: int = 0) -> int | None:
    if value in (None, "", "None"):
        return None
    try:
        number = float(str(value))
    except ValueError:
        raise _Unusable(f"{key}={value!r} is not a number") from None
    if not math.isfinite(number) or number != int(number) or number < minimum:
        raise _Unusable(f"{key}={value!r} is not a whole number of at least {minimum}")
    return int(number)


def _scheduler_args(raw: object) -> dict[str, object]:
    """kohya's ``--lr_scheduler_args key=value ...`` (values literal-evaluated), as logged."""
    if isinstance(raw, (list, tuple)):
        items = [str(x) for x in raw]
    elif isinstance(raw, str):
        text = raw.strip().strip("[]")
        items = [part.strip().strip("'\"") for part in text.replace(",", " ").split()]
    else:
        return {}
    out: dict[str, object] = {}
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
            try:
                out[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key] = value
    return out


def known_schedule(config: dict[str, object]) -> KnownSchedule | None:
    """The schedule the config describes, or None when nothing was logged. Settings that cannot
    describe a schedule (``first_cycle=auto``, ``cycle_mult=0.5``, more cycles than steps) leave
    the restarts unknown, with the reason in ``problem``."""
    if not config:
        return None
    try:
        return _known_schedule(config)
    except _Unusable as e:
        name = str(config.get("lr_scheduler_type") or config.get("lr_scheduler") or "")
        return KnownSchedule(name, None, 0, None, None, problem=str(e))


def _known_schedule(config: dict[str, object]) -> KnownSchedule:
    scheduler = str(config.get("lr_scheduler") or "")
    custom = str(config.get("lr_scheduler_type") or "")
    max_steps = _int(config, "max_train_steps")
    warmup = _int(config, "lr_warmup_steps") or 0
    save_every = _int(config, "save_every_n_steps")
    restarts: tuple[int, ...] | None = None
    if custom.endswith(("RexWithRestarts", "CosineWithRestarts")):
        args = _scheduler_args(config.get("lr_scheduler_args"))
        first = _whole(args.get("first_cycle"), "first_cycle", minimum=1)
        warmup = _whole(args.get("warmup"), "warmup") or 0
        try:
            mult = float(str(args.get("cycle_mult", 1.0)))
        except ValueError:
            raise _Unusable(f"cycle_mult={args.get('cycle_mult')!r} is not a number") from None
        if not (math.isfinite(mult) and mult >= 1):
            raise _Unusable(f"cycle_mult={mult!r}: cycles must not shrink (at least 1)")
        if first and max_steps:
            if max_steps - warmup > MAX_RESTARTS * first:
                raise _Unusable(f"first_cycle={first} over {max_steps} steps is more than {MAX_RESTARTS} cycles")
            restarts = tuple(cyclic_restart_steps(max_steps, first, mult, warmup))
        name = custom
    elif custom:
        name = custom  # some other custom scheduler: restarts unknown
    elif scheduler == "cosine_with_restarts":
        cycles = _int(config, "lr_scheduler_num_cycles") or 1
        if max_steps:
            if cycles > max(1, min(MAX_RESTARTS, max_steps - warmup)):
                raise _Unusable(f"lr_scheduler_num_cycles={cycles} is more cycles than the {max_steps - warmup} "
                                f"steps after warmup (or than {MAX_RESTARTS})")
            restarts = tuple(cosine_restart_steps(max_steps, warmup, cycles))
        name = scheduler
    else:
        name = scheduler
        if scheduler in NO_RESTART_SCHEDULERS:
            restarts = ()
    return KnownSchedule(name, max_steps, warmup, restarts, save_every)
