"""TFRecord framing: find the records in a buffer and verify their CRCs.

A record is ``uint64 length | uint32 masked crc32c(length) | data | uint32 masked crc32c(data)``.

The walk trusts lengths optimistically for a block of records, then checks that
block's CRCs in bulk. Where a check fails, nothing after the damage is trusted:
reading resynchronises on the next *valid record* (header and data CRCs both
right), searched for with numpy over the whole window, so garbage is skipped at
memory speed and a damaged length field can never swallow the intact records
behind it. A valid header whose record runs past the end of the buffer is a
record still being written, unless valid records follow it (then it is damage).

The state between two reads is just (offset, inside a damaged stretch?), so a
file read piece by piece gives exactly the records and damage of one read.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

HEADER = 12
FOOTER = 4
# A length beyond this is corruption, not a record still being written.
MAX_RECORD_BYTES = 256 * 1024 * 1024
BLOCK = 4096  # records walked optimistically before their CRCs are checked
RESYNC_WINDOW = 1 << 20  # header candidates checked per numpy pass while resynchronising


def _load_crc32c() -> Callable[[bytes | memoryview], int]:
    """The crc32c package's C function, loaded without the package's ``__init__``, which looks up
    the installed package's metadata (importlib.metadata) and imports argparse for its command
    line: 15 ms of every lrwatch start. Anything unexpected (another layout, a new version):
    the package, imported as usual."""
    import importlib.machinery
    import importlib.util
    import os

    try:
        spec = importlib.util.find_spec("crc32c")
        folder = (spec.submodule_search_locations or [])[0] if spec else ""
        name = next(n for n in os.listdir(folder) if n.startswith("_crc32c.")
                    and n.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)))
        path = os.path.join(folder, name)
        loader = importlib.machinery.ExtensionFileLoader("crc32c._crc32c", path)
        module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(loader.name, loader, origin=path))
        loader.exec_module(module)
        function = module.crc32c
        if function(b"123456789") == 0xE3069283:  # the CRC-32C check value
            return function
    except Exception:
        pass
    import crc32c

    return crc32c.crc32c


_crc = _load_crc32c()
_unpack_len = struct.Struct("<Q").unpack_from
_unpack_crc = struct.Struct("<I").unpack_from


def masked_crc(data: bytes | memoryview) -> int:
    crc = _crc(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One record as a writer frames it (lrwatch's own TensorBoard output)."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))


def _mask_array(crcs: np.ndarray) -> np.ndarray:
    c = crcs.astype(np.uint64)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _rotate(crc: np.ndarray) -> np.ndarray:
    return ((crc >> np.uint32(15)) | (crc << np.uint32(17))).astype(np.uint32)


def _pair_tables() -> tuple[np.ndarray, np.ndarray]:
    """CRC32C of 8 bytes is affine in the bytes: crc(m) = crc(0^8) ^ XOR_j T_j[m_j]. A length
    field that can be valid (below 2**32) has four zero high bytes, so its CRC is two lookups,
    one for bytes 0-1 and one for bytes 2-3 (the constant folded into the first). The mask's
    rotation is linear too, so the tables hold rotated CRCs: masked = LOW[b01] ^ HIGH[b23] + K."""
    zero = _crc(bytes(8))
    single = np.empty((4, 256), np.uint32)
    for j in range(4):
        for v in range(256):
            msg = bytearray(8)
            msg[j] = v
            single[j, v] = _crc(bytes(msg)) ^ zero
    low = (single[0][None, :] ^ single[1][:, None]).ravel() ^ np.uint32(zero)  # index b0 | b1 << 8
    high = (single[2][None, :] ^ single[3][:, None]).ravel()
    return _rotate(low), _rotate(high)


_LOW, _HIGH = _pair_tables()
_MASK_DELTA = np.uint32(0xA282EAD8)


def length_crcs(lengths: np.ndarray) -> np.ndarray:
    """Masked CRC32C of each little-endian length field in ``lengths`` (all below 2**32)."""
    low = (lengths & np.uint64(0xFFFF)).astype(np.intp)
    high = ((lengths >> np.uint64(16)) & np.uint64(0xFFFF)).astype(np.intp)
    return (_LOW[low] ^ _HIGH[high]) + _MASK_DELTA


@functools.cache
def _byte_tables() -> np.ndarray:
    """``T[d][v]``: what byte ``v`` at distance ``d`` from the end of a message adds (XOR) to its
    CRC32C. The CRC is affine in the message's bits, so two messages of one length differ in
    CRC by the XOR of these over the bytes in which they differ."""
    t0 = np.arange(256, dtype=np.uint32)
    for _ in range(8):  # the reflected CRC-32C table (polynomial 0x82F63B78)
        t0 = np.where(t0 & 1, (t0 >> 1) ^ np.uint32(0x82F63B78), t0 >> 1).astype(np.uint32)
    tables = np.empty((BULK_MAX_LENGTH, 256), np.uint32)
    tables[0] = t0
    for d in range(1, BULK_MAX_LENGTH):  # one zero byte more after the byte
        tables[d] = (tables[d - 1] >> 8) ^ t0[tables[d - 1] & 0xFF]
    return tables


BULK_FROM = 32  # records of one length: from this many, their CRCs are computed together
BULK_MAX_LENGTH = 512  # bytes: longer records get one crc32c call each
BULK_MAX_VARYING = 64  # byte positions in which records of one length differ: beyond this, a call each is cheaper


def data_crcs(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """CRC32C (unmasked) of ``buf[starts[i] : starts[i] + lengths[i]]`` for every i. Records of
    one length take one crc32c call together: the first's, then for the others only the bytes
    in which they differ from it are looked up (torch's scalars of one tag differ in their wall
    time, step and value: ~15 of ~35 bytes; tags of one length, ~10 more)."""
    out = np.empty(len(starts), np.uint32)
    rest = np.ones(len(starts), bool)
    mv = buf.data
    if len(starts) >= BULK_FROM:
        # (a count per length, not np.unique: numpy 2's unique imports numpy.ma, 14 ms, on first use)
        counts = np.bincount(lengths[(lengths > 0) & (lengths < BULK_MAX_LENGTH)])
        for length in np.flatnonzero(counts >= BULK_FROM).tolist():
            group = np.flatnonzero(lengths == length)
            block = np.lib.stride_tricks.sliding_window_view(buf, length)[starts[group]]  # one row per record
            first = block[0]
            varying = np.flatnonzero((block != first).any(axis=0))
            if len(varying) > BULK_MAX_VARYING:
                continue
            tables = _byte_tables()
            s0 = int(starts[group[0]])
            acc = np.full(len(group), _crc(mv[s0 : s0 + length]), np.uint32)
            columns = np.ascontiguousarray(block[:, varying].T)
            for pos, column in zip(varying.tolist(), columns):
                table = tables[length - 1 - pos]
                acc ^= table[column] ^ table[first[pos]]
            out[group] = acc
            rest[group] = False
    for i in np.flatnonzero(rest).tolist():
        s = int(starts[i])
        out[i] = _crc(mv[s : s + int(lengths[i])])
    return out


@dataclass(frozen=True)
class Damage:
    """A stretch of a file that could not be read; reading continued after it."""

    offset: int
    message: str


@dataclass
class Frames:
    """Records found in a buffer: data offsets and lengths, relative to the buffer."""

    starts: np.ndarray  # int64 offsets of each record's data
    lengths: np.ndarray  # int64
    end: int  # where the next read resumes
    damage: list[Damage]
    pending: int  # bytes after ``end`` kept for the next read (a record being written)
    in_garbage: bool  # ``end`` lies inside a damaged stretch: the next read resynchronises first
    need: int = 0  # bytes from ``end`` that the pending record needs (0: unknown)


class _Buffer:
    """One buffer with the views the walk needs."""

    def __init__(self, buf: bytes | memoryview) -> None:
        self.mv = memoryview(buf)
        self.n = len(self.mv)
        self.u8 = np.frombuffer(self.mv, dtype=np.uint8)
        # words[p] = the uint64 made of bytes p..p+7, for any p
        self.words = (np.ndarray((self.n - 7,), dtype="<u8", buffer=self.mv, offset=0, strides=(1,))
                      if self.n >= 8 else np.zeros(0, np.uint64))
        self.u16 = (np.ndarray((self.n - 1,), dtype="<u2", buffer=self.mv, offset=0, strides=(1,))
                    if self.n >= 2 else np.zeros(0, np.uint16))
        self.u32 = (np.ndarray((self.n - 3,), dtype="<u4", buffer=self.mv, offset=0, strides=(1,))
                    if self.n >= 4 else np.zeros(0, np.uint32))

    def length(self, pos: int) -> int:
        return int(_unpack_len(self.mv, pos)[0])

    def header_problem(self, pos: int) -> str | None:
        """Why the 12 bytes at ``pos`` are not a record header, or None if they are one."""
        if masked_crc(self.mv[pos : pos + 8]) != _unpack_crc(self.mv, pos + 8)[0]:
            return "bad length checksum"
        length = self.length(pos)
        return f"absurd record length {length}" if length > MAX_RECORD_BYTES else None

    def data_ok(self, pos: int, length: int) -> bool:
        end = pos + HEADER + length
        return masked_crc(self.mv[pos + HEADER : end]) == _unpack_crc(self.mv, end)[0]

    def fits(self, pos: int, length: int) -> bool:
        return pos + HEADER + length + FOOTER <= self.n

    def resync(self, start: int, complete_only: bool = False) -> tuple[int, bool] | None:
        """The first valid record at or after ``start``: (offset, True) for a complete record
        with both CRCs right. Failing that, (offset, False) for the first valid header whose
        record runs past the end (being written); never one that valid records follow."""
        first_open: int | None = None
        last = self.n - HEADER  # the last offset with room for a header
        a = start
        while a <= last:
            b = min(last + 1, a + RESYNC_WINDOW)
            u16 = self.u16
            hit = (_LOW[u16[a:b]] ^ _HIGH[u16[a + 2 : b + 2]]) == (self.u32[a + 8 : b + 8] - _MASK_DELTA)
            hit &= (u16[a + 4 : b + 4] == 0) & (u16[a + 6 : b + 6] == 0)
            for pos in (np.flatnonzero(hit) + a).tolist():
                length = self.length(pos)
                if length > MAX_RECORD_BYTES:
                    continue
                if self.fits(pos, length):
                    if self.data_ok(pos, length):
                        return pos, True
                elif first_open is None:
                    first_open = pos
            a = b
        if first_open is None or complete_only:
            return None
        return first_open, False


SMALL_BUFFER = 4096  # bytes: a watched run's latest step; walked in plain Python (numpy's setup costs more)


def whole_record(buf: bytes | memoryview, pos: int) -> int | None:
    """Where the record at ``pos`` ends (after its footer) if it is whole, with both checksums
    valid; None otherwise. A record walk in plain Python, for a watched step's few records."""
    n = len(buf)
    if n - pos < HEADER:
        return None
    (length,) = _unpack_len(buf, pos)
    end = pos + HEADER + length
    if (length > MAX_RECORD_BYTES or end + FOOTER > n or masked_crc(buf[pos : pos + 8]) != _unpack_crc(buf, pos + 8)[0]
            or masked_crc(buf[pos + HEADER : end]) != _unpack_crc(buf, end)[0]):
        return None
    return end + FOOTER


def _find_small(buf: bytes | memoryview) -> Frames | None:
    """The records of a small, clean buffer, or None at the first thing that is not a whole
    valid record (the full walk then decides what it is: damage, or a record being written)."""
    mv = memoryview(buf)
    n, pos = len(mv), 0
    starts: list[int] = []
    lengths: list[int] = []
    while n - pos >= HEADER:
        after = whole_record(mv, pos)
        if after is None:
            return None
        starts.append(pos + HEADER)
        lengths.append(after - pos - HEADER - FOOTER)
        pos = after
    return Frames(np.asarray(starts, np.int64), np.asarray(lengths, np.int64), pos, [], n - pos, False)


def find_records(buf: bytes | memoryview, base_offset: int = 0, in_garbage: bool = False) -> Frames:
    """Walk the records of ``buf``. ``base_offset`` is where ``buf`` sits in its file, so that
    damage is reported at true file offsets; ``in_garbage`` carries the previous read's state."""
    if not in_garbage and len(buf) <= SMALL_BUFFER:
        small = _find_small(buf)
        if small is not None:
            return small
    b = _Buffer(buf)
    starts: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    damage: list[Damage] = []
    pos = 0

    def done(end: int, garbage: bool, need: int = 0) -> Frames:
        s = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        n = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        return Frames(s, n, end, damage, b.n - end, garbage, need)

    while True:
        if in_garbage:
            found = b.resync(pos)
            if found is None:  # keep the last bytes: a header may be starting there
                return done(max(pos, b.n - HEADER + 1), True)
            pos, complete = found
            if not complete:
                return done(pos, True, HEADER + b.length(pos) + FOOTER)
            in_garbage = False
        pos = _walk(b, pos, starts, lengths)
        if b.n - pos < HEADER:
            return done(pos, False)
        problem = b.header_problem(pos)
        if problem is None:
            length = b.length(pos)
            if b.fits(pos, length):
                if b.data_ok(pos, length):  # the walk stopped at a block boundary
                    continue
                problem = "record data checksum mismatch"
            else:
                after = b.resync(pos + 1, complete_only=True)
                if after is None:
                    return done(pos, False, HEADER + length + FOOTER)  # a record being written
                damage.append(Damage(base_offset + pos, f"record length {length} runs over valid records"))
                pos = after[0]
                continue
        damage.append(Damage(base_offset + pos, problem))
        pos, in_garbage = pos + 1, True


def _chain(b: _Buffer, pos: int) -> np.ndarray | None:
    """The records from ``pos`` on within one window, found without a loop per record: every
    offset whose length field is a valid header for a record under 64 KiB (upper six bytes
    zero, length CRC right), kept while each record ends where the next such header begins
    and the record lies inside the buffer. None when ``pos`` itself is not one (a large record,
    damage or the buffer's end: the plain walk decides). Torch's scalars are ~50-byte records,
    so this is what reads a finished file; a header-like pattern inside a record's data only
    cuts the chain short there."""
    last = min(b.n - HEADER, pos + RESYNC_WINDOW)
    if last - pos < CHAIN_FROM:
        return None
    cand = np.flatnonzero(b.u32[pos + 4 : last + 5] == 0) + pos
    if not len(cand) or cand[0] != pos:
        return None
    cand = cand[b.u16[cand + 2] == 0]
    lens = b.u16[cand].astype(np.int64)
    valid = length_crcs(lens.astype(np.uint64)) == b.u32[cand + 8]
    cand, lens = cand[valid], lens[valid]
    if not len(cand) or cand[0] != pos:
        return None
    nxt = cand + (HEADER + FOOTER) + lens
    broken = np.flatnonzero((cand[1:] != nxt[:-1]) | (nxt[:-1] > b.n))
    k = int(broken[0]) + 1 if len(broken) else len(cand)  # records 0..k-1 follow one another
    if nxt[k - 1] > b.n:
        k -= 1
    return cand[:k]


CHAIN_FROM = 16384  # bytes left: below this the plain walk is as fast
PROBE = 64  # records walked one by one to find a file's repeating pattern of record lengths
PATTERN_AFTER = 3  # records before the pattern begins, at most


def _periodic(b: _Buffer, pos: int) -> np.ndarray | None:
    """The records from ``pos`` on within one window, when their lengths repeat: a trainer logs
    the same tags in the same order at every step, so record lengths repeat with a period of
    one step until a step's digits grow or another record comes between (an epoch's loss).
    The first PROBE records are walked one by one to find the period (it may begin a few
    records in); then every later record is predicted (row m of the pattern starts m periods'
    bytes later) and kept while each predicted record's length field holds exactly the
    pattern's length, so each kept record ends where the next begins: the chain a walk would
    find, at a gather per record instead of a check of every byte offset (``_chain``). None
    when no pattern holds for two periods."""
    end = min(b.n, pos + RESYNC_WINDOW)
    offs: list[int] = []
    lens: list[int] = []
    p = pos
    while len(offs) < PROBE and p + HEADER <= end:
        (length,) = _unpack_len(b.mv, p)
        if length > 0xFFFF or p + HEADER + length + FOOTER > end:
            break
        offs.append(p)
        lens.append(length)
        p += HEADER + length + FOOTER
    # the pattern may begin after a few other records (a file's first record, an epoch's loss)
    found = next(((j, k) for j in range(PATTERN_AFTER + 1) for k in range(1, (len(lens) - j) // 2 + 1)
                  if lens[j + k :] == lens[j : len(lens) - k]), None)
    if found is None:
        return None
    j, period = found
    first = offs[j]
    stride = offs[j + period] - first
    rows = (end - first) // stride
    rel = np.asarray(offs[j : j + period], np.int64) - first
    want = np.asarray(lens[j : j + period], np.uint64)
    at = (first + np.arange(rows, dtype=np.int64)[:, None] * stride + rel).ravel()  # each row ends by `end`
    held = b.words[at] == np.tile(want, rows)
    k = int(np.argmin(held)) if not held.all() else len(at)
    if k < 2 * period:
        return None
    return np.concatenate([np.asarray(offs[:j], np.int64), at[:k]])


def _walk(b: _Buffer, pos: int, starts: list[np.ndarray], lengths: list[np.ndarray]) -> int:
    """Walk blocks of records trusting their lengths, verify each block's CRCs in bulk, and
    keep the records up to the first bad one; return where the walk stopped."""
    unpack, mv, n = _unpack_len, b.mv, b.n
    limit = n - HEADER
    chain_next = True
    while True:
        periodic = _periodic(b, pos) if chain_next else None
        chained = periodic if periodic is not None else _chain(b, pos) if chain_next else None
        if chained is not None and len(chained):
            at = chained
            p = int(at[-1]) + HEADER + b.length(int(at[-1])) + FOOTER
            # Cut short of its window (a large record, damage, a header-like pattern in data):
            # the plain walk takes the next block, so odd data never costs a window scan per record.
            # A pattern that stopped holding is looked for again at once: finding it costs PROBE records.
            chain_next = periodic is not None or p > min(limit, pos + RESYNC_WINDOW)
            full = True
        else:
            chain_next = True
            offs: list[int] = []
            append = offs.append
            p = pos
            while p <= limit and len(offs) < BLOCK:  # the hot loop: only the walk
                (length,) = unpack(mv, p)
                if length > MAX_RECORD_BYTES or p + HEADER + length + FOOTER > n:
                    break
                append(p)
                p += HEADER + length + FOOTER
            if not offs:
                return pos
            at = np.asarray(offs, dtype=np.int64)
            full = len(offs) == BLOCK
        lens = np.diff(np.append(at, p)) - (HEADER + FOOTER)
        data_end = at + HEADER + lens
        crcs = data_crcs(b.u8, at + HEADER, lens)
        bad = (length_crcs(b.words[at]) != b.u32[at + 8]) | (_mask_array(crcs) != b.u32[data_end])
        good = int(np.argmax(bad)) if bad.any() else len(at)
        starts.append(at[:good] + HEADER)
        lengths.append(lens[:good])
        if good < len(at):
            return int(at[good])
        pos = p
        if not full:
            return pos
