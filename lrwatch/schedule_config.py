"""What the trainer's logged configuration says about its schedule.

kohya with ``--log_config`` stores its arguments as hparams; from them the
restart steps are known before they happen and, past the last cycle, no restart
is coming at all.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

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

    def next_restart(self, step: int) -> int | None:
        """The first restart after ``step``; None if none is coming (or unknown: see ``restarts``)."""
        if self.restarts is None:
            return None
        return next((r for r in self.restarts if r > step), None)


def _int(config: dict, key: str) -> int | None:
    value = config.get(key)
    try:
        return int(value) if value not in (None, "", "None") else None
    except (TypeError, ValueError):
        return None


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
    """The schedule the config describes, or None when nothing was logged."""
    if not config:
        return None
    scheduler = str(config.get("lr_scheduler") or "")
    custom = str(config.get("lr_scheduler_type") or "")
    max_steps = _int(config, "max_train_steps")
    warmup = _int(config, "lr_warmup_steps") or 0
    save_every = _int(config, "save_every_n_steps")
    restarts: tuple[int, ...] | None = None
    if custom.endswith(("RexWithRestarts", "CosineWithRestarts")):
        args = _scheduler_args(config.get("lr_scheduler_args"))
        first = int(args.get("first_cycle", 0) or 0)
        warmup = int(args.get("warmup", 0) or 0)
        mult = float(args.get("cycle_mult", 1.0) or 1.0)
        if first > 0 and max_steps:
            restarts = tuple(cyclic_restart_steps(max_steps, first, mult, warmup))
        name = custom
    elif custom:
        name = custom  # some other custom scheduler: restarts unknown
    elif scheduler == "cosine_with_restarts":
        cycles = _int(config, "lr_scheduler_num_cycles") or 1
        if max_steps:
            restarts = tuple(cosine_restart_steps(max_steps, warmup, cycles))
        name = scheduler
    else:
        name = scheduler
        if scheduler in NO_RESTART_SCHEDULERS:
            restarts = ()
    return KnownSchedule(name, max_steps, warmup, restarts, save_every)
