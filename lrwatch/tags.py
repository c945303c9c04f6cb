"""Which scalar tags are lr, d*lr and loss, and how lr and d*lr pair up into groups.

Patterns use ``{group}`` for one path segment (``lr/d*lr/{group}`` matches
``lr/d*lr/unet``); a pattern without it names a single tag. The defaults read
kohya sd-scripts (and its forks, and musubi-tuner) out of the box.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_LR_TAGS = ("lr/{group}", "lr")
DEFAULT_DLR_TAGS = ("lr/d*lr/{group}", "lr/d*lr")
DEFAULT_LOSS_TAGS = ("loss/current", "loss/average", "loss")
# A lone d*lr (older kohya) is group 0's: the text encoder's when it is trained, else the unet's.
LONE_DLR_PARTNERS = ("lr/textencoder", "lr/unet", "lr")


def _compile(pattern: str) -> re.Pattern[str]:
    parts = pattern.split("{group}")
    if len(parts) > 2:
        raise ValueError(f"tag pattern {pattern!r} may use {{group}} once")
    return re.compile("(?P<group>[^/]+)".join(re.escape(p) for p in parts) + r"\Z")


@dataclass(frozen=True)
class Group:
    """One param group: the tag of its lr and of its d*lr (either may be missing)."""

    name: str
    lr_tag: str | None
    dlr_tag: str | None


@dataclass
class TagMap:
    lr: tuple[str, ...] = DEFAULT_LR_TAGS
    dlr: tuple[str, ...] = DEFAULT_DLR_TAGS
    loss: tuple[str, ...] = DEFAULT_LOSS_TAGS
    _compiled: dict[str, list[re.Pattern[str]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._compiled = {kind: [_compile(p) for p in getattr(self, kind)] for kind in ("lr", "dlr")}

    def _match(self, kind: str, tag: str) -> str | None:
        for rx in self._compiled[kind]:
            m = rx.match(tag)
            if m:
                return m.groupdict().get("group") or ""
        return None

    def groups(self, tags: set[str] | list[str]) -> list[Group]:
        """Pair every d*lr tag with its lr tag; lr tags without a d*lr become groups of their own."""
        dlr: dict[str, str] = {}
        lr: dict[str, str] = {}
        for tag in sorted(tags):
            g = self._match("dlr", tag)
            if g is not None:
                dlr[g] = tag
                continue
            g = self._match("lr", tag)
            if g is not None:
                lr[g] = tag
        out = []
        for g, dlr_tag in dlr.items():
            lr_tag = lr.pop(g, None)
            if lr_tag is None and g == "":
                lr_tag = next((t for t in LONE_DLR_PARTNERS if t in tags), None)
                if lr_tag is None and len(lr) == 1:
                    lr_tag = next(iter(lr.values()))
            out.append(Group(g or _name_of(lr_tag) or "d*lr", lr_tag, dlr_tag))
        paired = {grp.lr_tag for grp in out}
        out += [Group(g or "lr", t, None) for g, t in lr.items() if t not in paired]
        return out

    def loss_tag(self, tags: set[str] | list[str]) -> str | None:
        return next((t for t in self.loss if t in tags), None)


def _name_of(lr_tag: str | None) -> str | None:
    return None if lr_tag is None else lr_tag.rsplit("/", 1)[-1]
