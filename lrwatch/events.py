"""Decode event records into scalar points (and the run's logged configuration).

torch's ``SummaryWriter.add_scalar`` writes every scalar as its own small Event
with one byte layout; those are decoded for all records at once with numpy, or, for
the few records of a watched step, one by one in plain Python. Anything else
(file_version, TF2 tensor scalars, hparams, images) goes through tensorboard's
compiled ``Event`` proto.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# tensorboard's protos are imported only when a record needs them (an audit of torch's scalars
# never does: a tenth of a second saved on every command). TensorFlow's DataType numbers:
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_INT64, DT_BFLOAT16, DT_HALF = 1, 2, 3, 9, 14, 19
_TENSOR_DTYPES = {DT_FLOAT: "<f4", DT_DOUBLE: "<f8", DT_HALF: "<f2", DT_INT32: "<i4", DT_INT64: "<i8"}
_TENSOR_FIELDS = {DT_FLOAT: "float_val", DT_DOUBLE: "double_val", DT_HALF: "half_val", DT_INT32: "int_val",
                  DT_INT64: "int64_val", DT_BFLOAT16: "half_val"}


def _empty(dtype: type) -> np.ndarray:
    a: np.ndarray = np.zeros(0, dtype)
    a.flags.writeable = False
    return a


# An empty Scalars' columns are read-only views of these (the watcher makes one per flush
# before filling it in: a view costs a fifth of a new empty array).
_NO_IDS, _NO_STEPS, _NO_FLOATS = _empty(np.int32), _empty(np.int64), _empty(np.float64)


@dataclass
class Scalars:
    """Scalar points of one read, columnar. ``tag_ids`` index into ``tags``."""

    tags: list[str] = field(default_factory=list)
    tag_ids: np.ndarray = field(default_factory=_NO_IDS.view)
    steps: np.ndarray = field(default_factory=_NO_STEPS.view)
    values: np.ndarray = field(default_factory=_NO_FLOATS.view)
    wall_times: np.ndarray = field(default_factory=_NO_FLOATS.view)
    hparams: dict[str, object] = field(default_factory=dict)
    undecodable: int = 0  # records that were not valid Event protos
    first_undecodable: int | None = None  # where the first of them starts (its data), in the buffer decoded

    def __len__(self) -> int:
        return len(self.steps)


def concat(parts: list[Scalars]) -> Scalars:
    """One Scalars from several reads, in order (tag ids renumbered into one list)."""
    if len(parts) == 1:
        return parts[0]
    out = Scalars()
    index: dict[str, int] = {}
    ids, steps, values, walls = [], [], [], []
    for part in parts:
        remap = np.asarray([index.setdefault(t, len(index)) for t in part.tags] or [0], np.int32)
        ids.append(remap[part.tag_ids])
        steps.append(part.steps)
        values.append(part.values)
        walls.append(part.wall_times)
        out.hparams.update(part.hparams)
        out.undecodable += part.undecodable
    out.tags = list(index)
    if ids:
        out.tag_ids, out.steps = np.concatenate(ids), np.concatenate(steps)
        out.values, out.wall_times = np.concatenate(values), np.concatenate(walls)
    return out


# Fewer records than this (a trainer's latest step, as the watcher reads it) are decoded one by
# one with the compiled proto: numpy's fixed cost per call outweighs its speed on a few records.
VECTORISE_FROM = 64


def decode(buf: bytes | memoryview, starts: np.ndarray, lengths: np.ndarray) -> Scalars:
    out = Scalars()
    tag_index: dict[str, int] = {}
    if len(starts) < VECTORISE_FROM:
        _, out.tag_ids, out.steps, out.values, out.wall_times = _decode_each(
            buf, None, starts, lengths, out, tag_index)
        return out
    u8 = np.frombuffer(buf, dtype=np.uint8)
    chunks: list[tuple[np.ndarray, ...]] = []  # (record index, tag id, step, value, wall time)

    fast = np.zeros(len(starts), bool)
    if len(u8) >= 16:
        words = _words(buf, len(u8))
        layout = _fast_scalar_layout(u8, words, starts, lengths)
        fast = layout.ok
        if fast.any():
            try:
                tag_ids = _intern_tags(u8, words, layout.tag_start, layout.tag_len, out.tags, tag_index)
            except _HashCollision:  # astronomically rare; correctness over speed
                fast[:] = False
        if fast.any():
            wall = words[starts[fast] + 1].view("<f8")
            values = (words[layout.tag_start + layout.tag_len + 1] & 0xFFFFFFFF).astype(np.uint32).view("<f4")
            chunks.append((np.flatnonzero(fast), tag_ids, layout.step, values.astype(np.float64), wall))

    slow = np.flatnonzero(~fast)
    if len(slow):
        each = _decode_each(buf, slow.tolist(), starts[slow], lengths[slow], out, tag_index)
        if len(each[0]):  # not only the file_version record: the two are merged in file order below
            chunks.append(each)

    if len(chunks) == 1:
        _, out.tag_ids, out.steps, out.values, out.wall_times = chunks[0]
    elif chunks:  # keep file order when both paths produced points
        record, tag_ids, steps, values, wall = (np.concatenate(c) for c in zip(*chunks))
        order = np.argsort(record, kind="stable")
        out.tag_ids, out.steps, out.values, out.wall_times = tag_ids[order], steps[order], values[order], wall[order]
    return out


def _words(buf: bytes | memoryview, size: int) -> np.ndarray:
    """``words[p]`` is the little-endian uint64 made of bytes p..p+7: one gather reads 8 bytes
    at any offset. The last 7 offsets are not addressable; the layout check never needs them
    because every record is followed by at least its 4-byte CRC and a record reaches 8 bytes."""
    return np.ndarray((size - 7,), dtype="<u8", buffer=buf, offset=0, strides=(1,))


class _Layout:
    __slots__ = ("ok", "tag_start", "tag_len", "step")
    ok: np.ndarray
    tag_start: np.ndarray
    tag_len: np.ndarray
    step: np.ndarray


def _byte(word: np.ndarray, j: int) -> np.ndarray:
    return (word >> np.uint64(8 * j)) & np.uint64(0xFF)


def _fast_scalar_layout(u8: np.ndarray, words: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> _Layout:
    """Which records are exactly ``Event{wall_time, step, summary{value{tag, simple_value}}}``
    (what torch's add_scalar writes), and where their tags, steps and values are.

    Layout: 09 <f8 wall> 10 <varint step, 1-7 bytes> 2a L1 0a L2 0a L3 <tag> 15 <f4>,
    with L1 = L2+2, L2 = L3+7 (all < 128), and nothing after the float.
    """
    res = _Layout()
    n_words = len(words)
    ok = (lengths >= 21) & (starts + 24 <= len(u8))  # every word read below stays inside the framed record + CRC
    s = np.where(ok, starts, 0)
    end = s + lengths
    head = words[s + 8]  # byte 8 of wall time, then 0x10 and the step varint
    ok &= (u8[s] == 0x09) & (_byte(head, 1) == 0x10)
    # Step varint: up to 7 bytes (steps below 2**49), read for every record at once from one word
    # (no pass per byte): its last byte is the first without the high bit; the 7-bit groups up
    # to it are then packed together in three steps of shifts and masks.
    var = (head >> np.uint64(16)) | (words[s + 16] << np.uint64(48))  # bytes 0-6: the varint's
    last = ~var & np.uint64(0x0080808080808080)  # the high bits of bytes that can end it
    last &= ~last + np.uint64(1)  # the lowest: bit 8k+7 of its last byte k (0: none in 7 bytes)
    nvar = np.frexp(last.astype(np.float64))[1].astype(np.int64) >> 3  # 2**(8k+7) has exponent 8k+8
    x = var & ((last << np.uint64(1)) - np.uint64(1)) & np.uint64(0x007F7F7F7F7F7F7F)
    x = (x & np.uint64(0x007F007F007F007F)) | ((x & np.uint64(0x7F007F007F007F00)) >> np.uint64(1))
    x = (x & np.uint64(0x00003FFF00003FFF)) | ((x & np.uint64(0x3FFF00003FFF0000)) >> np.uint64(2))
    step = (x & np.uint64(0x000000000FFFFFFF)) | ((x & np.uint64(0x0FFFFFFF00000000)) >> np.uint64(4))
    ok &= nvar > 0
    p = np.where(ok, s + 10 + nvar, s)
    hdr = words[np.minimum(p, n_words - 1)]
    l1, l2, l3 = (_byte(hdr, 1).astype(np.int64), _byte(hdr, 3).astype(np.int64), _byte(hdr, 5).astype(np.int64))
    ok &= (_byte(hdr, 0) == 0x2A) & (_byte(hdr, 2) == 0x0A) & (_byte(hdr, 4) == 0x0A)
    ok &= (l1 < 0x80) & (l2 == l3 + 7) & (l1 == l2 + 2) & (p + 6 + l3 + 5 == end) & (l3 > 0)
    tag_start = p + 6
    ok &= u8[np.where(ok, tag_start + l3, 0)] == 0x15
    res.ok = ok
    res.tag_start, res.tag_len, res.step = tag_start[ok], l3[ok], step[ok].view(np.int64)
    return res


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


_KEEP_BYTES = np.array([(1 << (8 * n)) - 1 for n in range(9)], np.uint64)  # [n]: a word's first n bytes


def _tag_words(words: np.ndarray, tstart: np.ndarray, tlen: np.ndarray, k: int) -> np.ndarray:
    """The k-th 8-byte word of each tag, with bytes past the tag's end zeroed."""
    w = words[np.minimum(tstart + 8 * k, len(words) - 1)]
    return w & _KEEP_BYTES[np.clip(tlen - 8 * k, 0, 8)]


def _intern_tags(u8: np.ndarray, words: np.ndarray, tstart: np.ndarray, tlen: np.ndarray,
                 tags: list[str], index: dict[str, int]) -> np.ndarray:
    """Tag id per record without building a string per record: hash the tag's words, then
    compare every record's words with its bucket's first record, so a hash collision can
    never mislabel a point."""
    tag_words = [_tag_words(words, tstart, tlen, k) for k in range((int(tlen.max()) + 7) // 8)]
    h = _FNV_OFFSET ^ tlen.astype(np.uint64)
    for word in tag_words:
        h = (h ^ word) * _FNV_PRIME
        h ^= h >> np.uint64(29)
    uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    same = tlen == tlen[first][inverse]
    for word in tag_words:
        same &= word == word[first][inverse]
    if not same.all():
        raise _HashCollision
    mapping = np.empty(len(uniq), np.int32)
    for i, row in enumerate(first.tolist()):
        a, n = int(tstart[row]), int(tlen[row])
        tag = bytes(u8[a : a + n]).decode("utf-8", "backslashreplace")  # as torch_scalar: both paths agree
        mapping[i] = index.setdefault(tag, len(index))
        if mapping[i] == len(tags):
            tags.append(tag)
    return mapping[inverse]


class _HashCollision(Exception):
    """Two different tags hashed alike: the caller decodes those records the slow way."""


_F8 = struct.Struct("<d").unpack_from
_F4 = struct.Struct("<f").unpack_from


NOT_A_SCALAR = ("", 0, 0.0, 0.0)  # a file_version record: nothing to decode


def torch_scalar(buf: bytes, s: int, n: int) -> tuple[str, int, float, float] | None:
    """(tag, step, value, wall time) of a record in add_scalar's layout (see
    ``_fast_scalar_layout``), read with a few byte look-ups; ``NOT_A_SCALAR`` for a file's
    ``file_version`` record (09 <f8> 1a L <text>, then perhaps 52 L <writer>); None for anything else (the proto decides
    those). Cheaper than the proto for the few records of a watched step."""
    end = s + n
    if n < 11 or buf[s] != 0x09:
        return None
    if buf[s + 9] == 0x1A and buf[s + 10] < 0x80:  # file_version, perhaps then source_metadata (field 10)
        p = s + 11 + buf[s + 10]
        if p == end or (p + 2 <= end and buf[p] == 0x52 and buf[p + 1] < 0x80 and p + 2 + buf[p + 1] == end):
            return NOT_A_SCALAR
    if n < 21 or buf[s + 9] != 0x10:
        return None
    p, step, shift = s + 10, 0, 0
    while True:  # the step varint (negative steps take 10 bytes)
        b = buf[p]
        step |= (b & 0x7F) << shift
        p, shift = p + 1, shift + 7
        if b < 0x80:
            break
        if shift >= 70 or p >= end:
            return None
    if p + 6 > end:
        return None
    l1, l2, l3 = buf[p + 1], buf[p + 3], buf[p + 5]
    t = p + 6
    if (buf[p] != 0x2A or buf[p + 2] != 0x0A or buf[p + 4] != 0x0A or l1 >= 0x80 or l2 != l3 + 7 or l1 != l2 + 2
            or l3 == 0 or t + l3 + 5 != end or buf[t + l3] != 0x15):
        return None
    # A tag that is not UTF-8 keeps its point, its bad bytes shown as \xNN (two different bad tags
    # stay two): the vectorised decode does the same, so a watch and an audit of a file agree.
    tag = buf[t : t + l3].decode("utf-8", "backslashreplace")
    step &= 0xFFFFFFFFFFFFFFFF
    return tag, step - (1 << 64) if step >= 1 << 63 else step, _F4(buf, t + l3 + 1)[0], _F8(buf, s + 1)[0]


def _event_proto() -> Any:
    from tensorboard.compat.proto.event_pb2 import Event

    return Event


def _decode_each(buf, records, starts, lengths, out: Scalars, index: dict[str, int]):
    """Record by record: add_scalar's layout in plain Python, anything else with the proto.
    ``records`` numbers the records for the caller that merges them in file order; None when
    it does not (then the record numbers returned are None too)."""
    record_of: list[int] = []
    tag_ids: list[int] = []
    steps: list[int] = []
    values: list[float] = []
    walls: list[float] = []
    data = bytes(buf)
    mv = memoryview(data)
    event_proto: Any = None
    for r, s, n in zip(range(len(starts)) if records is None else records, starts.tolist(), lengths.tolist()):
        scalar = torch_scalar(data, s, n)
        if scalar is NOT_A_SCALAR:
            continue
        if scalar is not None:
            tag = scalar[0]
            if tag not in index:
                index[tag] = len(index)
                out.tags.append(tag)
            record_of.append(r)
            tag_ids.append(index[tag])
            steps.append(scalar[1])
            values.append(scalar[2])
            walls.append(scalar[3])
            continue
        if event_proto is None:
            event_proto = _event_proto()
        try:
            event = event_proto.FromString(mv[s : s + n])
        except Exception:  # upb raises DecodeError; anything else is just as undecodable
            out.undecodable += 1
            if out.first_undecodable is None:
                out.first_undecodable = s
            continue
        if event.WhichOneof("what") != "summary":  # file_version, graphs, session logs
            continue
        for value in event.summary.value:
            plugin = value.metadata.plugin_data.plugin_name
            if plugin == "hparams":
                out.hparams.update(_hparams(value.metadata.plugin_data.content))
                continue
            number = _scalar_of(value)
            if number is None:
                continue
            if value.tag not in index:
                index[value.tag] = len(index)
                out.tags.append(value.tag)
            record_of.append(r)
            tag_ids.append(index[value.tag])
            steps.append(event.step)
            values.append(number)
            walls.append(event.wall_time)
    return (None if records is None else np.asarray(record_of, np.int64), np.asarray(tag_ids, np.int32),
            np.asarray(steps, np.int64), np.asarray(values, np.float64), np.asarray(walls, np.float64))


def _scalar_of(value) -> float | None:
    which = value.WhichOneof("value")
    if which == "simple_value":
        return value.simple_value
    if which != "tensor":
        return None
    tensor = value.tensor
    if any(d.size != 1 for d in tensor.tensor_shape.dim):
        return None  # not a scalar
    if tensor.tensor_content:
        dtype = _TENSOR_DTYPES.get(tensor.dtype)
        if dtype is None or len(tensor.tensor_content) < np.dtype(dtype).itemsize:
            return None  # too short to hold one value: not a scalar we can read
        return float(np.frombuffer(tensor.tensor_content, dtype=dtype, count=1)[0])
    field_name = _TENSOR_FIELDS.get(tensor.dtype)
    if field_name is None:
        return None
    vals = getattr(tensor, field_name)
    if not len(vals):
        return None
    if tensor.dtype in (DT_HALF, DT_BFLOAT16):
        bits = int(vals[0])
        if not 0 <= bits <= 0xFFFF:
            return None  # half_val holds 16-bit patterns; anything else is damage
        if tensor.dtype == DT_HALF:
            return float(np.array([bits], np.uint16).view(np.float16)[0])
        return float(np.array([bits << 16], np.uint32).view(np.float32)[0])
    return float(vals[0])


def _hparams(content: bytes) -> dict[str, object]:
    """The values of a ``session_start_info`` (what ``add_hparams`` and accelerate log)."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    try:
        data = HParamsPluginData.FromString(content)
    except Exception:
        return {}
    if data.WhichOneof("data") != "session_start_info":
        return {}
    out: dict[str, object] = {}
    for key, v in data.session_start_info.hparams.items():
        kind = v.WhichOneof("kind")
        if kind == "number_value":
            num = v.number_value
            out[key] = int(num) if math.isfinite(num) and num == int(num) else num
        elif kind == "string_value":
            out[key] = v.string_value
        elif kind == "bool_value":
            out[key] = v.bool_value
    return out
