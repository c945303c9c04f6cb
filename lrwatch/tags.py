"""Which scalar tags are lr, d*lr, d and loss, and how they pair up into param groups.

Patterns use ``{group}`` for one path segment (``lr/d*lr/{group}`` matches
``lr/d*lr/unet``); a pattern without it names a single tag. The defaults read
kohya sd-scripts and musubi-tuner; :mod:`lrwatch.trainers` holds the other
trainers' maps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_LR_TAGS = ("lr/{group}", "lr")
DEFAULT_DLR_TAGS = ("lr/d*lr/{group}", "lr/d*lr")
DEFAULT_LOSS_TAGS = ("loss/current", "loss/average", "loss")
# A validation loss at fixed timesteps and seed: kohya's --validation_split (train_network.py's step
# validation), OneTrainer's validation concepts (GenericTrainer: one tag per concept, and their
# total_average when there are several). kohya's epoch_average is logged at epoch numbers: not used.
DEFAULT_VALIDATION_TAGS = ("loss/validation/step_average", "loss/validation_step/total_average",
                           "loss/validation_step/{group}")
# A lone d*lr (older kohya) is group 0's: the text encoder's when it is trained, else the unet's.
LONE_DLR_PARTNERS = ("lr/textencoder", "lr/unet", "lr")


def _compile(pattern: str) -> re.Pattern[str]:
    parts = pattern.split("{group}")
    if len(parts) > 2:
        raise ValueError(f"tag pattern {pattern!r} may use {{group}} once")
    return re.compile("(?P<group>[^/]+)".join(re.escape(p) for p in parts) + r"\Z")


@dataclass(frozen=True)
class Group:
    """One param group: the tags of its lr, d*lr and d (any may be missing)."""

    name: str
    lr_tag: str | None
    dlr_tag: str | None
    d_tag: str | None = None


@dataclass
class TagMap:
    lr: tuple[str, ...] = DEFAULT_LR_TAGS
    dlr: tuple[str, ...] = DEFAULT_DLR_TAGS
    loss: tuple[str, ...] = DEFAULT_LOSS_TAGS
    d: tuple[str, ...] = ()
    validation: tuple[str, ...] = DEFAULT_VALIDATION_TAGS
    lr_is_d_when_d_logged: bool = False  # SimpleTuner puts Prodigy's d under its lr tag
    _compiled: dict[str, list[re.Pattern[str]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._compiled = {kind: [_compile(p) for p in getattr(self, kind)] for kind in ("lr", "dlr", "d", "validation")}

    def _match(self, kind: str, tag: str) -> str | None:
        for rx in self._compiled[kind]:
            m = rx.match(tag)
            if m:
                return m.groupdict().get("group") or ""
        return None

    def groups(self, tags: set[str] | list[str]) -> list[Group]:
        """Pair every d*lr (or d) tag with its lr tag; lr tags left over become groups of their own."""
        found: dict[str, dict[str, str]] = {"dlr": {}, "d": {}, "lr": {}}
        for tag in sorted(tags):
            for kind in ("dlr", "d", "lr"):  # a tag is taken as the first kind it matches
                g = self._match(kind, tag)
                if g is not None:
                    found[kind][g] = tag
                    break
        dlr, d, lr = found["dlr"], found["d"], found["lr"]
        out = []
        for g in [*dlr, *(k for k in d if k not in dlr)]:
            dlr_tag, d_tag = dlr.get(g), d.get(g)
            lr_tag = lr.pop(g, None)
            if d_tag is not None and self.lr_is_d_when_d_logged:
                lr_tag = None
            elif lr_tag is None and g == "" and dlr_tag is not None:
                lr_tag = next((t for t in LONE_DLR_PARTNERS if t in lr.values()), None)
                if lr_tag is None and len(lr) == 1:
                    lr_tag = next(iter(lr.values()))
            out.append(Group(g or _name_of(lr_tag) or ("all" if d_tag else "d*lr"), lr_tag, dlr_tag, d_tag))
        paired = {grp.lr_tag for grp in out}
        if not (d and self.lr_is_d_when_d_logged):
            out += [Group(g or "lr", t, None) for g, t in lr.items() if t not in paired]
        return out

    def loss_tag(self, tags: set[str] | list[str]) -> str | None:
        return next((t for t in self.loss if t in tags), None)

    def validation_tag(self, tags: set[str] | list[str]) -> str | None:
        """The first validation pattern that a tag matches (a ``{group}`` pattern: the first such
        tag by name, e.g. OneTrainer's only validation concept)."""
        ordered = sorted(tags)
        for rx in self._compiled["validation"]:
            found = next((t for t in ordered if rx.match(t)), None)
            if found is not None:
                return found
        return None


def _name_of(lr_tag: str | None) -> str | None:
    return None if lr_tag is None else lr_tag.rsplit("/", 1)[-1]
