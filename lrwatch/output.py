"""What lrwatch writes out, made safe: one JSON serializer for every consumer (``--json``,
``--events-out``, ``LRWATCH_JSON``, webhooks), and terminal text with the names taken
from logs (tags, folders, files) shown escaped, never as terminal commands."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path, PurePath
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """A structure that ``json.dumps(..., allow_nan=False)`` accepts. A non-finite number becomes
    null; in a mapping, ``<key>_text`` beside it says which ("nan", "inf", "-inf")."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = str(k)
            if _nonfinite(v):
                out[key] = None
                out[f"{key}_text"] = str(float(v))
            else:
                out[key] = jsonable(v)
        return out
    if isinstance(value, (list, tuple, set, np.ndarray)):
        return [None if _nonfinite(v) else jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, PurePath):
        return str(value)
    return str(value)


def _nonfinite(v: Any) -> bool:
    return isinstance(v, (float, np.floating)) and not math.isfinite(v)


def dumps(value: Any, indent: int | None = None) -> str:
    """Always valid JSON (no NaN or Infinity tokens)."""
    return json.dumps(jsonable(value), indent=indent, allow_nan=False)


def terminal_safe(text: str) -> str:
    """``text`` with control and format characters (escape sequences, bidi overrides) shown
    as escapes; line breaks are kept."""
    if text.isprintable():
        return text
    return "\n".join(line if line.isprintable() else "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in line)
        for line in text.split("\n"))


def write_atomic(path: Path, data: str | bytes) -> None:
    """Our own output files are written whole: a temp file beside the target (no "tfevents" in
    its name, so TensorBoard never reads it), flushed to disk, then renamed over the target.
    On failure nothing is left behind and the error is raised."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # an error, or a signal that ends the watch mid-write
        tmp.unlink(missing_ok=True)
        raise
    _remove_stale_temps(path)


def _remove_stale_temps(path: Path) -> None:
    """Temp files of writes to ``path`` by lrwatch processes that were killed mid-write (SIGKILL
    leaves them): only our own name pattern, and only when the pid in it is no longer running."""
    import psutil

    prefix = f".{path.name}."
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):-len(".tmp")]
        if pid.isascii() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            try:
                os.unlink(path.parent / name)
            except OSError:
                pass  # another lrwatch removed it first, or it is not ours to remove
