"""One event file, read incrementally: each call returns what was appended since the last.

The same object serves a finished file (one call) and a file a trainer is still
writing (a call per change): an unfinished record at the end is left for the
next call, damage is reported with its file offset, and reading goes on after it.
Files are read in bounded chunks, so a huge damaged file never fills memory.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

import numpy as np

from lrwatch.events import NOT_A_SCALAR, Scalars, concat, decode, torch_scalar
from lrwatch.records import FOOTER, HEADER, MAX_RECORD_BYTES, SMALL_BUFFER, Damage, find_records, whole_record
from lrwatch.sources import GrowingFile, Reader, is_remote, location

CHUNK_BYTES = 16 * 1024 * 1024  # read at most this much at once (more only for one larger record)
TAIL_BYTES = 64  # bytes before the read offset compared when a file was replaced


Point = tuple[str, int, float, float]  # (tag, step, value, wall time)


@dataclass(slots=True)
class Batch:
    """What one read of one file produced: ``scalars``, or for a watched flush read in one pass
    its ``points`` (in file order; ``scalars`` then makes the columns from them on demand)."""

    points: list[Point] | None = None
    damage: list[Damage] = field(default_factory=list)
    pending: int = 0  # bytes of an unfinished record left for the next read
    restarted: bool = False  # the file shrank or was replaced, and was read again from the start
    error: str | None = None  # the file could not be read at all this time (permissions, gone)
    columns: Scalars | None = None
    more: bool = False  # the read stopped at its budget before the file's end (``read_new(budget=)``)

    @property
    def scalars(self) -> Scalars:
        if self.columns is None:
            self.columns = Scalars()
            if self.points:
                tags: dict[str, int] = {}
                ids = [tags.setdefault(tag, len(tags)) for tag, _, _, _ in self.points]
                _, steps, values, walls = zip(*self.points)
                self.columns = Scalars(list(tags), np.asarray(ids, np.int32), np.asarray(steps, np.int64),
                                       np.asarray(values, np.float64), np.asarray(walls, np.float64))
        return self.columns


class EventFile:
    """Follows one event file by byte offset."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = location(path)
        self.offset = 0
        self.in_garbage = False  # the offset lies inside a damaged stretch
        self._identity: tuple | None = None
        self._tail = b""  # the last bytes before ``offset``: a replaced file that still starts with them grew
        self.records_read = 0
        self.first_wall_time: float | None = None  # of the first scalar record: who wrote the file, and when
        self._growing = None if is_remote(self.path) else GrowingFile(self.path)  # a watched flush's read

    def read_new(self, budget: int | None = None) -> Batch:
        """Read and decode everything complete after the last read; with a ``budget`` (bytes),
        stop once that much was read (``Batch.more``: the rest is for the next call), so a
        long run is read and analysed in parts of bounded size."""
        try:
            if self._growing is not None and self._identity is not None and not self.in_garbage:  # a watched flush
                data = self._growing.appended(self.offset, self._identity, SMALL_BUFFER, self._tail)
                if data is not None:
                    if not data:
                        return Batch([])  # nothing new
                    step = whole_torch_step(data)
                    if step is not None:  # else (a record cut mid-write, damage) the Reader reads it again
                        return self._whole_step(data, *step, restarted=False)
            with Reader(self.path) as reader:
                return self._read(reader, budget)
        except FileNotFoundError:
            return Batch(error="file disappeared")
        except OSError as e:
            why = "permission denied" if e.errno in (errno.EACCES, errno.EPERM) else (e.strerror or str(e))
            return Batch(error=f"cannot read: {why}")

    def check_name(self) -> None:
        """The run's folder was listed: let go of the file if its path names another now."""
        if self._growing is not None:
            self._growing.check_name()

    def _read(self, reader: Reader, budget: int | None) -> Batch:
        parts: list[Scalars] = []
        damage: list[Damage] = []
        restarted = False
        pending = 0
        info = reader.info()
        # Truncated, replaced, or rewritten in place (same file, perhaps longer than before). A
        # sync tool re-uploads a growing file whole (object stores cannot append): if the file
        # still holds the last bytes read, go on from where the last read stopped; otherwise
        # read it again from the start.
        if self._identity is not None and not (info.size >= self.offset and self._tail_still_there(reader)):
            self.offset, self.in_garbage, restarted = 0, False, True
        self._identity = info.version
        size, want = info.size, CHUNK_BYTES
        if budget is not None:
            want = min(want, max(budget, HEADER + FOOTER))
        began, more = self.offset, False
        while self.offset < size:
            data = reader.read(self.offset, self.offset + min(want, size - self.offset))
            to_end = self.offset + len(data) >= size
            step = (whole_torch_step(data) if data and to_end and not self.in_garbage and len(data) <= SMALL_BUFFER
                    else None)
            if step is not None and not parts and not damage:  # the watched case: whole records, to the end
                return self._whole_step(data, *step, restarted=restarted)
            frames = find_records(data, self.offset, self.in_garbage)
            if len(frames.starts):
                scalars = decode(data, frames.starts, frames.lengths)
                if scalars.undecodable:
                    at = self.offset + (scalars.first_undecodable or HEADER) - HEADER  # the first such record's start
                    damage.append(Damage(at, f"{scalars.undecodable} record(s) with a valid "
                                             "checksum are not TensorBoard events"))
                parts.append(scalars)
            damage += frames.damage
            self.records_read += len(frames.starts)
            if frames.end:
                self._tail = data[max(0, frames.end - TAIL_BYTES) : frames.end]
            self.offset += frames.end
            self.in_garbage = frames.in_garbage
            # bytes kept inside a damaged stretch are not a record being written
            pending = 0 if frames.in_garbage and not frames.need else frames.pending
            if self.offset + frames.pending >= size:
                break  # read to the end of the file
            if frames.end == 0:  # one record larger than the chunk: read it whole
                if not frames.need or frames.need > MAX_RECORD_BYTES + 16 or frames.need <= len(data):
                    break
                want = frames.need
            elif budget is not None and self.offset - began >= budget:
                more = True
                break
            else:
                want = CHUNK_BYTES if budget is None else min(CHUNK_BYTES, budget)
        scalars = concat(parts)
        if self.first_wall_time is None and len(scalars):
            self.first_wall_time = float(scalars.wall_times.min())
        return Batch(None, damage, pending if not more else 0, restarted, columns=scalars, more=more)

    def _whole_step(self, data: bytes, points: list[Point], count: int, restarted: bool) -> Batch:
        """Take ``data``, whole records to the file's end, read from the offset."""
        self.records_read += count
        self._tail = data[-TAIL_BYTES:]
        self.offset += len(data)
        if self.first_wall_time is None and points:
            self.first_wall_time = min(p[3] for p in points)
        return Batch(points, restarted=restarted)

    def _tail_still_there(self, reader: Reader) -> bool:
        if self.offset == 0:
            return True
        start = self.offset - len(self._tail)
        return bool(self._tail) and reader.read(start, self.offset) == self._tail


def whole_torch_step(buf: bytes) -> tuple[list[Point], int] | None:
    """A watched flush as torch's writer makes it (whole, valid records in ``add_scalar``'s
    layout, perhaps the file's ``file_version`` record), walked, checked and decoded in one
    plain Python pass: (its points, its record count). None at anything else (a record cut
    or being written, damage, another layout), which ``find_records`` and ``decode`` then
    read. Either way the points are the same; this way a watched step's framing and
    decoding cost half as much (``bench/bench_flush.py``), and its points go to the run's
    series as they are, without columns made and taken apart again."""
    n, pos, count = len(buf), 0, 0
    points: list[Point] = []
    while pos < n:
        after = whole_record(buf, pos)
        if after is None:
            return None
        scalar = torch_scalar(buf, pos + HEADER, after - pos - HEADER - FOOTER)
        if scalar is None:
            return None
        if scalar is not NOT_A_SCALAR:
            points.append(scalar)
        count += 1
        pos = after
    return points, count
