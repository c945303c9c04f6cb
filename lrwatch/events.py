"""Decode event records into scalar points (and the run's logged configuration).

torch's ``SummaryWriter.add_scalar`` writes every scalar as its own small Event
with one byte layout; those are decoded for all records at once with numpy.
Anything else (file_version, TF2 tensor scalars, hparams, images) goes through
tensorboard's compiled ``Event`` proto.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.types_pb2 import DT_BFLOAT16, DT_DOUBLE, DT_FLOAT, DT_HALF, DT_INT32, DT_INT64

_TENSOR_DTYPES = {DT_FLOAT: "<f4", DT_DOUBLE: "<f8", DT_HALF: "<f2", DT_INT32: "<i4", DT_INT64: "<i8"}
_TENSOR_FIELDS = {DT_FLOAT: "float_val", DT_DOUBLE: "double_val", DT_HALF: "half_val", DT_INT32: "int_val",
                  DT_INT64: "int64_val", DT_BFLOAT16: "half_val"}


@dataclass
class Scalars:
    """Scalar points of one read, columnar. ``tag_ids`` index into ``tags``."""

    tags: list[str] = field(default_factory=list)
    tag_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    wall_times: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    hparams: dict[str, object] = field(default_factory=dict)
    file_version: str | None = None
    undecodable: int = 0  # records that were not valid Event protos

    def __len__(self) -> int:
        return len(self.steps)


def decode(buf: bytes | memoryview, starts: np.ndarray, lengths: np.ndarray) -> Scalars:
    u8 = np.frombuffer(buf, dtype=np.uint8)
    fast, tag_slices = _fast_scalar_layout(u8, starts, lengths)
    out = Scalars()
    tag_index: dict[str, int] = {}
    chunks: list[tuple[np.ndarray, ...]] = []  # (record index, tag id, step, value, wall time)

    if fast.any():
        tstart, tlen = tag_slices
        try:
            tag_ids = _intern_tags(u8, tstart, tlen, out.tags, tag_index)
        except _HashCollision:  # astronomically rare; correctness over speed
            fast[:] = False
    if fast.any():
        s = starts[fast]
        wall = _gather(u8, s + 1, 8).view("<f8").ravel()
        steps = _varints(u8, s + 10)[0]
        values = _gather(u8, tstart + tlen + 1, 4).view("<f4").ravel().astype(np.float64)
        chunks.append((np.flatnonzero(fast), tag_ids, steps, values, wall))

    slow = np.flatnonzero(~fast)
    if len(slow):
        chunks.append(_decode_slow(buf, slow, starts[slow], lengths[slow], out, tag_index))

    if len(chunks) == 1:
        _, out.tag_ids, out.steps, out.values, out.wall_times = chunks[0]
    elif chunks:  # keep file order when both paths produced points
        record, tag_ids, steps, values, wall = (np.concatenate(c) for c in zip(*chunks))
        order = np.argsort(record, kind="stable")
        out.tag_ids, out.steps, out.values, out.wall_times = tag_ids[order], steps[order], values[order], wall[order]
    return out


def _gather(u8: np.ndarray, at: np.ndarray, width: int) -> np.ndarray:
    return u8[at[:, None] + np.arange(width)].copy()


def _varints(u8: np.ndarray, at: np.ndarray, max_bytes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Decode one varint at each offset: (values as int64, encoded lengths; 0 where unterminated).

    Byte column by byte column, stopping when every varint has ended (steps take 1-3 bytes)."""
    value = np.zeros(len(at), np.uint64)
    nbytes = np.zeros(len(at), np.int64)
    active = np.ones(len(at), bool)
    last = len(u8) - 1
    for j in range(max_bytes):
        byte = u8[np.minimum(at + j, last)].astype(np.uint64)
        value |= np.where(active, (byte & 0x7F) << np.uint64(7 * j), 0).astype(np.uint64)
        ended = active & (byte < 0x80)
        nbytes[ended] = j + 1
        active &= ~ended
        if not active.any():
            break
    return value.view(np.int64), nbytes


def _fast_scalar_layout(u8: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
    """Which records are exactly ``Event{wall_time, step, summary{value{tag, simple_value}}}``.

    Layout: 09 <f8> 10 <varint step> 2a L1 0a L2 0a L3 <tag> 15 <f4>, with L1=L2+2, L2=L3+7.
    """
    n = len(starts)
    ok = lengths >= 21
    if not ok.any():
        return np.zeros(n, bool), (np.zeros(0, np.int64), np.zeros(0, np.int64))
    s = np.where(ok, starts, 0)
    end = s + lengths
    ok &= (u8[s] == 0x09) & (u8[np.minimum(s + 9, len(u8) - 1)] == 0x10)
    _, nvar = _varints(u8, np.minimum(s + 10, len(u8) - 1))
    p = s + 10 + nvar
    ok &= (nvar > 0) & (p + 7 <= end)
    p = np.where(ok, p, s)
    hdr = _gather(u8, np.minimum(p, len(u8) - 6), 6).astype(np.int64)
    l1, l2, l3 = hdr[:, 1], hdr[:, 3], hdr[:, 5]
    ok &= (hdr[:, 0] == 0x2A) & (hdr[:, 2] == 0x0A) & (hdr[:, 4] == 0x0A)
    ok &= (l1 < 0x80) & (l2 == l3 + 7) & (l1 == l2 + 2) & (p + 6 + l3 + 5 == end)
    tag_start = p + 6
    ok &= u8[np.where(ok, tag_start + l3, 0)] == 0x15
    ok &= lengths >= 21  # recheck after the where-clamps above
    return ok, (tag_start[ok], l3[ok])


def _intern_tags(u8: np.ndarray, tstart: np.ndarray, tlen: np.ndarray, tags: list[str], index: dict[str, int]):
    """Tag id per record, without building a string per record: hash the tag bytes (FNV-1a,
    vectorised), then check every record's bytes against its hash's tag so that a collision
    can never mislabel a point."""
    width = int(tlen.max())
    last = len(u8) - 1
    h = np.full(len(tstart), 0xCBF29CE484222325, np.uint64)
    prime = np.uint64(0x100000001B3)
    for j in range(width):
        byte = np.where(j < tlen, u8[np.minimum(tstart + j, last)], 0).astype(np.uint64)
        h = (h ^ byte) * prime
    h ^= tlen.astype(np.uint64)
    uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    rep = first[inverse]  # the record whose bytes name each record's bucket
    same = tlen == tlen[rep]
    for j in range(width):  # verify: every record carries exactly its bucket's tag bytes
        same &= (j >= tlen) | (u8[np.minimum(tstart + j, last)] == u8[np.minimum(tstart[rep] + j, last)])
    if not same.all():
        raise _HashCollision
    mapping = np.empty(len(uniq), np.int32)
    for i, row in enumerate(first.tolist()):
        a, n = int(tstart[row]), int(tlen[row])
        tag = bytes(u8[a : a + n]).decode("utf-8", "replace")
        mapping[i] = index.setdefault(tag, len(index))
        if mapping[i] == len(tags):
            tags.append(tag)
    return mapping[inverse]


class _HashCollision(Exception):
    """Two different tags hashed alike: the caller decodes those records the slow way."""


def _decode_slow(buf, records, starts, lengths, out: Scalars, index: dict[str, int]):
    record_of, tag_ids, steps, values, walls = [], [], [], [], []
    mv = memoryview(buf)
    for r, s, n in zip(records.tolist(), starts.tolist(), lengths.tolist()):
        try:
            event = Event.FromString(mv[s : s + n])
        except Exception:  # upb raises DecodeError; anything else is just as undecodable
            out.undecodable += 1
            continue
        kind = event.WhichOneof("what")
        if kind == "file_version":
            out.file_version = event.file_version
            continue
        if kind != "summary":
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
    return (np.asarray(record_of, np.int64), np.asarray(tag_ids, np.int32), np.asarray(steps, np.int64),
            np.asarray(values, np.float64), np.asarray(walls, np.float64))


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
        if dtype is None:
            return None
        return float(np.frombuffer(tensor.tensor_content, dtype=dtype)[0])
    field_name = _TENSOR_FIELDS.get(tensor.dtype)
    if field_name is None:
        return None
    vals = getattr(tensor, field_name)
    if not len(vals):
        return None
    if tensor.dtype == DT_HALF:
        return float(np.array([vals[0]], np.uint16).view(np.float16)[0])
    if tensor.dtype == DT_BFLOAT16:
        return float(np.array([vals[0] << 16], np.uint32).view(np.float32)[0])
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
