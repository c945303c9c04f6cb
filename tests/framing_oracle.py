"""Mutated event files with a known truth, for the damage-recovery tests and bench/fuzz.py.

A file is built from real records; mutations (bit flips, inserts, deletes, splices,
absurd but checksummed lengths, zero runs) are applied while every byte's origin is
tracked, so the records that survived intact (their exact bytes, untouched) are known.
Recovery must read every one of them, and reading the file piece by piece must give
exactly the records and damage offsets of one read.
"""

from __future__ import annotations

import random
import struct

import numpy as np

from lrwatch.records import HEADER, find_records, masked_crc


def records_of(data: bytes) -> list[bytes]:
    """The framed records of a healthy file, each whole (header, data, footer)."""
    frames = find_records(data)
    return [data[s - HEADER : s + n + 4] for s, n in zip(frames.starts.tolist(), frames.lengths.tolist())]


class Mutated:
    def __init__(self, records: list[bytes]) -> None:
        self.records = records
        self.data = bytearray(b"".join(records))
        self.origin = np.arange(len(self.data), dtype=np.int64)  # original offset of each byte, -1: new
        self.dirty = np.zeros(len(self.data), bool)
        offsets = np.cumsum([0] + [len(r) for r in records])
        self.spans = list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))

    def _splice(self, at: int, remove: int, insert: bytes) -> None:
        self.data[at : at + remove] = insert
        self.origin = np.concatenate([self.origin[:at], np.full(len(insert), -1), self.origin[at + remove :]])
        self.dirty = np.concatenate([self.dirty[:at], np.ones(len(insert), bool), self.dirty[at + remove :]])
        if at > 0:
            self.dirty[at - 1] = True  # the record the cut goes through is no longer intact
        if at + len(insert) < len(self.dirty):
            self.dirty[at + len(insert)] = True

    def mutate(self, rng: random.Random) -> str:
        n = len(self.data)
        kind = rng.choice(["flip", "insert", "delete", "splice", "absurd", "zeros", "truncate"])
        at = rng.randrange(max(1, n))
        if kind == "flip" and n:
            self.data[at] ^= 1 << rng.randrange(8)
            self.dirty[at] = True
        elif kind == "insert":
            self._splice(at, 0, rng.randbytes(rng.choice([1, 3, 12, 40, 300])))
        elif kind == "delete":
            self._splice(at, min(n - at, rng.choice([1, 4, 12, 30, 200])), b"")
        elif kind == "splice":  # a piece of the file itself, elsewhere (valid-looking headers)
            src = rng.randrange(max(1, n))
            self._splice(at, 0, bytes(self.data[src : src + rng.choice([8, 16, 60, 200])]))
        elif kind == "absurd":  # a checksummed header with an impossible or overlong length
            length = rng.choice([2**40, 2**28 + 1, 10**6, n * 2, rng.randrange(1, 5000)])
            head = struct.pack("<Q", length)
            self._splice(at, 0, head + struct.pack("<I", masked_crc(head)))
        elif kind == "zeros":
            self._splice(at, 0, bytes(rng.choice([12, 100, 5000])))
        elif kind == "truncate":
            self._splice(at, n - at, b"")
        return kind

    def intact_starts(self) -> list[int]:
        """Data offsets (in the mutated file) of the original records that survived untouched."""
        out = []
        for s, e in self.spans:
            where = np.flatnonzero(self.origin == s)
            for q in where.tolist():
                if q + (e - s) <= len(self.origin) and not self.dirty[q : q + e - s].any() and (
                        self.origin[q : q + e - s] == np.arange(s, e)).all():
                    out.append(q + HEADER)
        return out


def read_in_pieces(data: bytes, cuts: list[int]) -> tuple[list[int], list[int]]:
    """Record starts and damage offsets when ``data`` arrives in pieces ending at ``cuts``."""
    offset, garbage = 0, False
    starts: list[int] = []
    damage: list[int] = []
    for cut in [*sorted(c for c in cuts if 0 < c < len(data)), len(data)]:
        if cut <= offset:
            continue
        frames = find_records(data[offset:cut], offset, garbage)
        starts += (frames.starts + offset).tolist()
        damage += [d.offset for d in frames.damage]
        offset += frames.end
        garbage = frames.in_garbage
    return starts, damage
