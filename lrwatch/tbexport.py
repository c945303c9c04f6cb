"""lrwatch's analysis as a TensorBoard run of its own, next to each run: ``<run folder>/lrwatch/``.

TensorBoard shows it beside the trainer's run: ``lrwatch/d/<group>``, the predicted ratio of
the next restart (``lrwatch/restart_risk/<group>``) and its d×lr
(``lrwatch/predicted_restart_dlr/<group>``), ``lrwatch/findings`` (1 warning, 2 critical, at
each finding's step), and text entries: each finding's message at its step, the snapshot
verdicts and the run's verdict. Only lrwatch writes there (the trainer's files are never
touched), in one file with a fixed name: an audit rewrites it atomically (a new file moved
over the old), the watcher rewrites it once and then appends what is new, so no point is
ever written twice. lrwatch never reads it back as a run (its name ends in ``.lrwatch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary

from lrwatch.analysis import CRITICAL, Analysis, Finding
from lrwatch.output import write_atomic
from lrwatch.records import frame
from lrwatch.runs import OWN_EXPORT_SUFFIX
from lrwatch.sources import is_remote

EXPORT_DIR = "lrwatch"
EXPORT_FILE = f"events.out.tfevents.0000000000{OWN_EXPORT_SUFFIX}"  # fixed: a rewrite replaces it
SEVERITY_VALUE = {"warning": 1.0, CRITICAL: 2.0}


def export_path(run_path: Path) -> Path:
    """Where a run's export goes (a single-file run: a folder next to the file)."""
    base = run_path.parent if run_path.is_file() else run_path
    return base / EXPORT_DIR / EXPORT_FILE


@dataclass
class _Written:
    """What the export file already holds, so that the watcher appends only what is new."""

    last_step: dict[str, int] = field(default_factory=dict)  # scalar tag -> last step written
    findings: set[tuple] = field(default_factory=set)
    texts: dict[str, str] = field(default_factory=dict)  # text tag -> the last text written


def _scalar(tag: str, value: float, step: int, wall: float) -> bytes:
    event = Event(wall_time=wall, step=step, summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)]))
    return frame(event.SerializeToString())


def _text(tag: str, text: str, step: int, wall: float) -> bytes:
    # imported here: it pulls in tensorboard's gfile (and boto3 where installed), 0.1-0.2 s
    from tensorboard.plugins.text.summary_v2 import text_pb

    return frame(Event(wall_time=wall, step=step, summary=text_pb(tag, text)).SerializeToString())


def _walls(source, tags: list[str | None], steps: np.ndarray) -> np.ndarray:
    """The trainer's wall time at each step (so the export is the same bytes every time)."""
    for tag in tags:
        series = source.series(tag) if tag else None
        if series is not None and len(series.steps):
            i = np.clip(np.searchsorted(series.steps, steps, side="right") - 1, 0, len(series.steps) - 1)
            return series.wall_times[i]
    return np.zeros(len(steps))


def _finding_text(f: Finding) -> str:
    where = f" [{f.group}]" if f.group else ""
    return f"**{f.severity.upper()}** `{f.kind}`{where} at step {f.step}: {f.message}"


def _snapshot_table(snapshots: list) -> str:
    rows = ["| snapshot | step | verdict | lr × peak | reason |", "| --- | --- | --- | --- | --- |"]
    for s in snapshots:
        lr = "-" if s.lr_multiplier is None else f"{s.lr_multiplier:.3g}"
        rows.append(f"| {Path(s.path).name} | {s.step if s.step is not None else '-'} | **{s.verdict}** | {lr} | "
                    f"{s.reason.replace('|', '/')} |")
    return "\n".join(rows)


def _records(analysis: Analysis, source, snapshots: list | None, written: _Written) -> list[bytes]:
    """The events not in the file yet, in step order per series; ``written`` is updated."""
    out: list[bytes] = []
    for g in analysis.groups:
        walls = _walls(source, [g.dlr_tag, g.lr_tag, g.d_tag], g.steps)
        risk = g.risk_series if g.risk_series is not None else np.full(len(g.steps), np.nan)
        with np.errstate(invalid="ignore", over="ignore"):
            predicted = np.where(np.isfinite(risk), g.d * g.cycle_peak, np.nan)
        for name, values in (("d", g.d), ("restart_risk", risk), ("predicted_restart_dlr", predicted)):
            tag = f"lrwatch/{name}/{g.name}"
            after = written.last_step.get(tag, -math.inf)
            keep = np.flatnonzero(np.isfinite(values) & (g.steps > after))
            for i in keep.tolist():
                out.append(_scalar(tag, float(values[i]), int(g.steps[i]), float(walls[i])))
            if len(g.steps):
                written.last_step[tag] = int(g.steps[-1])
    wall_at = _walls(source, [analysis.loss_tag] + [g.dlr_tag or g.lr_tag for g in analysis.groups],
                     np.asarray([f.step for f in analysis.findings] + [analysis.last_step or 0], np.int64))
    for f, wall in zip(analysis.findings, wall_at.tolist()):
        if f.key() in written.findings:
            continue
        written.findings.add(f.key())
        out.append(_scalar("lrwatch/findings", SEVERITY_VALUE.get(f.severity, 0.0), f.step, wall))
        out.append(_text("lrwatch/finding", _finding_text(f), f.step, wall))
    last, last_wall = analysis.last_step or 0, float(wall_at[-1])
    verdict = {CRITICAL: "CRITICAL", "warning": "warnings only", None: "ok"}[analysis.worst]
    texts = {"lrwatch/verdict": f"**{verdict}** at step {last} (trainer: {analysis.trainer})"
             + "".join(f"\n\n- {note}" for note in analysis.notes)}
    if snapshots:
        texts["lrwatch/snapshots"] = _snapshot_table(snapshots)
    for tag, text in texts.items():
        if written.texts.get(tag) != text:
            written.texts[tag] = text
            out.append(_text(tag, text, last, last_wall))
    return out


def _header() -> bytes:
    return frame(Event(wall_time=0.0, file_version="brain.Event:2").SerializeToString())


def write_export(path: Path, analysis: Analysis, source, snapshots: list | None = None) -> _Written:
    """Write the whole export atomically (a temporary file, then moved over the old one)."""
    written = _Written()
    data = _header() + b"".join(_records(analysis, source, snapshots, written))
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, data)
    return written


class Exporter:
    """Keeps each run's export current: rewritten the first time a run is seen in this process,
    then appended to (whole records in one write, flushed) as its analysis changes."""

    def __init__(self) -> None:
        self.written: dict[Path, _Written] = {}
        # run -> (the analysis exported, its snapshot table): held, so a new analysis is never taken
        # for the old one (as a reused id() could be)
        self.seen: dict[Path, tuple[Analysis, str]] = {}
        self.problems: dict[Path, str] = {}

    def update(self, states: list, snapshots_by_run: dict | None = None) -> list[str]:
        """Export every run whose analysis or snapshot verdicts changed; return new problems."""
        said = []
        for state in states:
            a = state.analysis
            if a is None or not a.checked:
                continue
            snaps = (snapshots_by_run or {}).get(state.run.path)
            table = _snapshot_table(snaps) if snaps else ""
            seen = self.seen.get(state.run.path)
            if seen is not None and seen[0] is a and seen[1] == table:
                continue
            if is_remote(state.run.path):
                why = f"{state.run.name}: --tensorboard writes next to local runs only; this one is remote"
                if self.problems.get(state.run.path) != why:
                    self.problems[state.run.path] = why
                    said.append(why)
                continue
            path = export_path(state.run.path)
            try:
                if state.run.path not in self.written or not path.exists():
                    self.written[state.run.path] = write_export(path, a, state.series_source, snaps)
                else:
                    records = _records(a, state.series_source, snaps, self.written[state.run.path])
                    if records:
                        with open(path, "ab") as fh:
                            fh.write(b"".join(records))
                self.seen[state.run.path] = (a, table)
                self.problems.pop(state.run.path, None)
            except OSError as e:
                why = f"{state.run.name}: could not write {path}: {e.strerror or e}"
                if self.problems.get(state.run.path) != why:
                    self.problems[state.run.path] = why
                    said.append(why)
        return said
