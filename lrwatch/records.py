"""TFRecord framing: find the records in a buffer and verify their CRCs.

A record is ``uint64 length | uint32 masked crc32c(length) | data | uint32 masked crc32c(data)``.
The walk trusts lengths optimistically and checks every CRC afterwards in bulk;
only when a check fails does it fall back to a careful walk that reports the
damage (file offset and what was wrong) and resynchronises on the next valid header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import crc32c
import numpy as np

HEADER = 12
FOOTER = 4
# A length beyond this is treated as corruption, not as a record still being written.
MAX_RECORD_BYTES = 256 * 1024 * 1024

_crc = crc32c.crc32c
_unpack_len = struct.Struct("<Q").unpack_from
_unpack_crc = struct.Struct("<I").unpack_from


def masked_crc(data: bytes | memoryview) -> int:
    crc = _crc(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _mask_array(crcs: np.ndarray) -> np.ndarray:
    c = crcs.astype(np.uint64)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


@dataclass(frozen=True)
class Damage:
    """A stretch of a file that could not be read; reading continued after it."""

    offset: int
    message: str


@dataclass
class Frames:
    """Records found in ``buf[start:]``: data offsets and lengths, relative to ``buf``."""

    starts: np.ndarray  # int64 offsets of each record's data
    lengths: np.ndarray  # int64
    end: int  # offset just past the last complete record (where the next read resumes)
    damage: list[Damage]
    pending: int  # bytes of an incomplete record at the end (still being written)


def find_records(buf: bytes | memoryview, start: int = 0, base_offset: int = 0) -> Frames:
    """Walk the records of ``buf`` from ``start``. ``base_offset`` is where ``buf`` sits in
    its file, so that damage is reported at true file offsets."""
    mv = memoryview(buf)
    end = len(mv)
    starts: list[int] = []
    append = starts.append
    pos = start
    limit = end - HEADER
    while pos <= limit:  # the hot loop: only the walk; checks come after, in bulk
        (length,) = _unpack_len(mv, pos)
        if length > MAX_RECORD_BYTES or pos + HEADER + length + FOOTER > end:
            break
        append(pos)
        pos += HEADER + length + FOOTER
    arr_pos = np.asarray(starts, dtype=np.int64)
    if len(arr_pos):
        u8 = np.frombuffer(mv, dtype=np.uint8)
        arr_len = np.diff(np.append(arr_pos, pos)) - (HEADER + FOOTER)
        data_end = arr_pos + HEADER + arr_len
        data_crcs = np.fromiter((_crc(mv[a:b]) for a, b in zip((arr_pos + HEADER).tolist(), data_end.tolist())),
                                dtype=np.uint64, count=len(arr_pos))
        bad = (_mask_array(crc32c_of_8(u8, arr_pos)) != _gather_u32(u8, arr_pos + 8)) | (
            _mask_array(data_crcs) != _gather_u32(u8, data_end)
        )
        if bad.any():
            first = int(np.argmax(bad))
            return _careful_walk(mv, arr_pos[:first] + HEADER, arr_len[:first], int(arr_pos[first]), base_offset)
    else:
        arr_len = arr_pos
    return _tail(mv, arr_pos + HEADER, arr_len, pos, base_offset)


def _crc32c_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint64)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ 0x82F63B78, table >> 1)
    return table


_TABLE = _crc32c_table()


def crc32c_of_8(u8: np.ndarray, at: np.ndarray) -> np.ndarray:
    """CRC32C of the 8 bytes at each offset, for all offsets at once (the length fields)."""
    crc = np.full(len(at), 0xFFFFFFFF, np.uint64)
    for j in range(8):
        crc = _TABLE[(crc ^ u8[at + j]) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _gather_u32(u8: np.ndarray, at: np.ndarray) -> np.ndarray:
    idx = at[:, None] + np.arange(4)
    return u8[idx].copy().view("<u4").ravel().astype(np.uint64)


def _header_problem(mv: memoryview, pos: int) -> str | None:
    """Why the 12 bytes at ``pos`` are not a record header, or None if they are one."""
    if masked_crc(mv[pos : pos + 8]) != _unpack_crc(mv, pos + 8)[0]:
        return "bad length checksum"
    (length,) = _unpack_len(mv, pos)
    return f"absurd record length {length}" if length > MAX_RECORD_BYTES else None


def _tail(mv: memoryview, starts: np.ndarray, lengths: np.ndarray, pos: int, base: int) -> Frames:
    """Decide what the bytes after the last good record are: an unfinished record or damage."""
    pending = len(mv) - pos
    if pending >= HEADER and _header_problem(mv, pos):
        return _careful_walk(mv, starts, lengths, pos, base)  # not a record being written: resynchronise
    return Frames(starts, lengths, pos, [], pending)


def _careful_walk(mv: memoryview, starts: np.ndarray, lengths: np.ndarray, pos: int, base: int) -> Frames:
    """Record-by-record walk from ``pos`` that reports damage and resynchronises."""
    damage: list[Damage] = []
    good_s, good_l = list(starts), list(lengths)
    end = len(mv)
    while pos + HEADER <= end:
        problem = _header_problem(mv, pos)
        if problem is None:
            (length,) = _unpack_len(mv, pos)
            nxt = pos + HEADER + length + FOOTER
            if nxt > end:
                break  # a record still being written
            if masked_crc(mv[pos + HEADER : pos + HEADER + length]) == _unpack_crc(mv, nxt - FOOTER)[0]:
                good_s.append(pos + HEADER)
                good_l.append(length)
            else:
                damage.append(Damage(base + pos, f"record data checksum mismatch ({length} bytes skipped)"))
            pos = nxt
            continue
        resync = _next_header(mv, pos + 1)
        if resync is None:
            # Nothing valid follows yet: keep the offset so a writer that is mid-record is not misread.
            damage.append(Damage(base + pos, f"{problem}; no valid record after it ({end - pos} bytes)"))
            return Frames(np.asarray(good_s, np.int64), np.asarray(good_l, np.int64), end, damage, 0)
        damage.append(Damage(base + pos, f"{problem}; skipped {resync - pos} bytes to the next valid record"))
        pos = resync
    return Frames(np.asarray(good_s, np.int64), np.asarray(good_l, np.int64), pos, damage, end - pos)


def _next_header(mv: memoryview, pos: int) -> int | None:
    """The next offset whose 12 bytes form a valid record header."""
    while pos + HEADER <= len(mv):
        if _header_problem(mv, pos) is None:
            return pos
        pos += 1
    return None
