"""Typed finding kinds: code that acts on findings (snapshot verdicts, stop policies, reports)
matches these, never a finding's message or a free-form string."""

from __future__ import annotations

from enum import Enum


class _Named(str, Enum):
    """A str enum that prints as its value (JSON, f-strings, equality with the plain string)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Kind(_Named):
    PREDICTED_RESTART_BLOWUP = "predicted_restart_blowup"  # a forecast: never critical by itself
    RUNAWAY_D = "runaway_d"  # d grew far within a window after its warm-up
    BLOWUP = "blowup"  # something already happened: a spike, a non-finite value, the loss far above its best


class Basis(_Named):
    """What a finding's evidence was measured on. A snapshot's weights are reached by an lr
    blow-up logged at B from snapshot B+1 on, but a loss logged bad at B already shows the
    weights after B-1 updates (``lrwatch.snapshots``)."""

    LR = "lr"  # lr, d*lr or d
    LOSS = "loss"  # the training loss
    VALIDATION = "validation"  # a validation loss at fixed timesteps and seed
