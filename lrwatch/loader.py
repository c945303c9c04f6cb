"""One event file, read incrementally: each call returns what was appended since the last.

The same object serves a finished file (one call) and a file a trainer is still
writing (a call per change): an unfinished record at the end is left for the
next call, damage is reported with its file offset, and reading goes on after it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lrwatch.events import Scalars, decode
from lrwatch.records import Damage, find_records


@dataclass
class Batch:
    """What one read of one file produced."""

    scalars: Scalars
    damage: list[Damage] = field(default_factory=list)
    pending: int = 0  # bytes of an unfinished record left for the next read
    restarted: bool = False  # the file shrank or was replaced, and was read again from the start


class EventFile:
    """Follows one event file by byte offset."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.offset = 0
        self._identity: tuple[int, int] | None = None
        self.records_read = 0

    def read_new(self) -> Batch:
        """Read and decode everything complete after the last read."""
        restarted = False
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                identity = (st.st_dev, st.st_ino)
                if self._identity is not None and (identity != self._identity or st.st_size < self.offset):
                    self.offset, restarted = 0, True  # truncated or replaced: never read past the new end
                self._identity = identity
                if st.st_size <= self.offset:
                    return Batch(Scalars(), restarted=restarted)
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return Batch(Scalars(), [Damage(self.offset, "file disappeared")])
        frames = find_records(data, 0, base_offset=self.offset)
        scalars = decode(data, frames.starts, frames.lengths) if len(frames.starts) else Scalars()
        if scalars.undecodable:
            frames.damage.append(Damage(self.offset, f"{scalars.undecodable} record(s) with a valid checksum "
                                                     "are not TensorBoard events"))
        self.offset += frames.end
        self.records_read += len(frames.starts)
        return Batch(scalars, frames.damage, frames.pending, restarted)
