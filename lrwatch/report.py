"""What an audit says: a readable table per run, or JSON with a stable schema (README)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lrwatch import __version__
from lrwatch.analysis import CRITICAL, WARNING
from lrwatch.monitor import Monitor, RunState

SCHEMA_VERSION = 1

EXIT_OK = 0
EXIT_CRITICAL = 1
EXIT_UNREADABLE = 2


def run_problem(state: RunState) -> str | None:
    """Why a run gave nothing to analyse, if it did not."""
    run = state.run
    if run.tags:
        return None
    if run.damage and not any(f.records_read for f in run.files.values()):
        return "not a TensorBoard event file (no valid record in it)"
    if run.damage:
        return f"no readable scalar events ({len(run.damage)} damaged stretch(es))"
    if not run.files:
        return "no event files"
    return "no scalar events"


def exit_code(monitor: Monitor) -> int:
    states = monitor.runs
    if monitor.missing_roots() or not states or any(run_problem(s) for s in states):
        return EXIT_UNREADABLE
    if any(s.analysis and s.analysis.worst == CRITICAL for s in states):
        return EXIT_CRITICAL
    return EXIT_OK


def _num(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def run_dict(state: RunState, snapshots: list | None = None) -> dict[str, Any]:
    run, a = state.run, state.analysis
    out: dict[str, Any] = {
        "path": str(run.path),
        "name": run.name,
        "files": [str(p) for p in run.files],
        "problem": run_problem(state),
        "damage": [{"file": str(p), "offset": d.offset, "message": d.message} for p, d in run.damage],
        "pending_bytes": run.pending_bytes,
        "superseded_points": run.superseded_points,
        "config": run.config,
        "last_step": None,
        "schedule": None,
        "notes": [],
        "groups": [],
        "cycles": [],
        "findings": [],
        "worst": None,
    }
    if snapshots is not None:
        out["snapshots"] = [snap.to_dict() for snap in snapshots]
    if a is None:
        return out
    out["last_step"] = a.last_step
    out["notes"] = a.notes
    out["worst"] = a.worst
    if a.schedule is not None:
        s = a.schedule
        out["schedule"] = {"name": s.name, "max_steps": s.max_steps, "warmup": s.warmup,
                           "restarts": None if s.restarts is None else list(s.restarts), "save_every": s.save_every}
    for g in a.groups:
        out["groups"].append({
            "name": g.name, "lr_tag": g.lr_tag, "dlr_tag": g.dlr_tag, "adaptive": g.adaptive,
            "d_now": _num(g.d_now), "risk": _num(g.risk), "restarts": g.restarts, "next_restart": g.next_restart,
        })
        for c in g.cycles:
            out["cycles"].append({
                "group": g.name, "index": c.index, "start": c.start, "end": c.end, "complete": c.complete,
                "peak_lr": _num(c.peak_lr), "min_lr": _num(c.min_lr), "min_lr_step": c.min_lr_step,
                "d_start": _num(c.d_start), "d_end": _num(c.d_end), "d_growth": _num(c.d_growth),
                "peak_dlr": _num(c.peak_dlr),
            })
    out["findings"] = [
        {"kind": f.kind, "severity": f.severity, "group": f.group, "step": f.step, "message": f.message,
         "values": {k: (_num(v) if isinstance(v, float) else v) for k, v in f.values.items()}}
        for f in a.findings
    ]
    return out


def _snapshots_of(monitor: Monitor, state: RunState) -> list | None:
    return None if monitor.snapshots is None else monitor.snapshots.by_run.get(state.run.path, [])


def to_json(monitor: Monitor) -> str:
    doc: dict[str, Any] = {"lrwatch": __version__, "schema": SCHEMA_VERSION,
                           "missing": [monitor.as_given(p) for p in monitor.missing_roots()],
                           "runs": [run_dict(s, _snapshots_of(monitor, s)) for s in monitor.runs],
                           "exit_code": exit_code(monitor)}
    if monitor.snapshots is not None:
        doc["unassigned_snapshots"] = [snap.to_dict() for snap in monitor.snapshots.orphans]
    return json.dumps(doc, indent=2, allow_nan=False, default=str)


def _g(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3g}"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def render_snapshots(snapshots: list, indent: str = "  ") -> list[str]:
    if not snapshots:
        return [f"{indent}snapshots: none found"]
    rows = [["snapshot", "step", "from", "verdict", "lr x peak", "reason"]]
    for s in snapshots:
        rows.append([Path(s.path).name, "-" if s.step is None else str(s.step), s.step_source or "-", s.verdict,
                     _g(s.lr_multiplier), s.reason])
    return [f"{indent}snapshots:"] + _table(rows, indent + "  ")


def render_run(state: RunState, snapshots: list | None = None) -> str:
    run, a = state.run, state.analysis
    lines = [f"run {run.name}"]
    problem = run_problem(state)
    if problem:
        lines.append(f"  unreadable: {problem}")
    for path, d in run.damage:
        lines.append(f"  damaged: {path.name} at byte {d.offset}: {d.message}")
    if a is None or problem:
        return "\n".join(lines)
    files = f"{len(run.files)} event file{'s' if len(run.files) != 1 else ''}"
    extra = f", {run.superseded_points} points re-logged after a resume (later ones kept)" if run.superseded_points else ""
    sched = a.schedule.name if a.schedule else "not logged"
    lines.append(f"  {files}, last step {a.last_step}, schedule: {sched}{extra}")
    for note in a.notes:
        lines.append(f"  note: {note}")
    for g in a.groups:
        tags = ", ".join(t for t in (g.lr_tag, g.dlr_tag) if t)
        lines.append(f"  group {g.name} ({tags}): {len(g.restarts)} restart(s), d now {_g(g.d_now)}")
    rows = [["group", "cycle", "steps", "peak lr", "lowest lr @ step", "d start", "d end", "d growth", "peak d*lr"]]
    for g in a.groups:
        for c in g.cycles:
            rows.append([g.name, str(c.index), f"{c.start}-{c.end}{'' if c.complete else '…'}", _g(c.peak_lr),
                         f"{_g(c.min_lr)} @ {c.min_lr_step}", _g(c.d_start), _g(c.d_end),
                         "-" if c.d_growth is None else f"x{c.d_growth:.3g}", _g(c.peak_dlr)])
    if len(rows) > 1:
        lines += _table(rows)
    if a.findings:
        lines.append("  findings:")
        for f in a.findings:
            where = f" [{f.group}]" if f.group else ""
            lines.append(f"    {f.severity.upper():8s} step {f.step:<7d} {f.kind}{where}: {f.message}")
    else:
        lines.append("  findings: none")
    if snapshots is not None:
        lines += render_snapshots(snapshots)
    verdict = {CRITICAL: "CRITICAL", WARNING: "warnings only", None: "ok"}[a.worst]
    lines.append(f"  verdict: {verdict}")
    return "\n".join(lines)


def render(monitor: Monitor) -> str:
    parts = [f"lrwatch: {monitor.as_given(p)}: no such file or directory" for p in monitor.missing_roots()]
    if not monitor.runs and not parts:
        parts.append("lrwatch: no event files found under " + ", ".join(map(monitor.as_given, monitor.roots)))
    parts += [render_run(s, _snapshots_of(monitor, s)) for s in monitor.runs]
    if monitor.snapshots is not None and monitor.snapshots.orphans:
        parts.append("\n".join(["snapshots matching no run (by output name):",
                                *render_snapshots(monitor.snapshots.orphans)[1:]]))
    return "\n\n".join(parts)
