"""What an audit says: a readable table per run, or JSON with a stable schema (README)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lrwatch import __version__
from lrwatch.analysis import CRITICAL, WARNING
from lrwatch.monitor import Monitor, RunState
from lrwatch.output import dumps
from lrwatch.snapshots import best_snapshot, mostly_fried, ranking_basis

SCHEMA_VERSION = 1

# Exit codes, most urgent first when several apply (the README's table).
EXIT_OK = 0  # every run was checked and none has a critical finding
EXIT_CRITICAL = 1  # a run has a critical finding
EXIT_INTERNAL = 4  # lrwatch itself failed on a run (reported with the run); others were still checked
EXIT_UNREADABLE = 2  # bad usage, a missing path, or a run with nothing readable
EXIT_NOT_CHECKED = 3  # a run had data but no tag lrwatch recognised: nothing in it was checked


def run_problem(state: RunState) -> str | None:
    """Why a run gave nothing to analyse, if it did not."""
    run = state.run
    if run.tags:
        return None
    if run.file_errors and len(run.file_errors) == len(run.files):
        return "; ".join(f"{p.name}: {why}" for p, why in run.file_errors.items())
    if run.damage and not any(f.records_read for f in run.files.values()):
        return "not a TensorBoard event file (no valid record in it)"
    if run.damage:
        return f"no readable scalar events ({len(run.damage)} damaged stretch(es))"
    if not run.files:
        return "no event files"
    return "no scalar events"


def not_checked(state: RunState) -> bool:
    """The run had scalars, but none that lrwatch recognised as lr, d*lr or loss."""
    return state.analysis is not None and not state.analysis.checked and run_problem(state) is None


def verdict(state: RunState, snapshots: list | None) -> str | None:
    """The run's verdict: its worst finding, and critical where most of its judged snapshots are
    fried whatever the findings say (a run whose saves are mostly fried is not ok)."""
    worst = state.analysis.worst if state.analysis else None
    return CRITICAL if snapshots and mostly_fried(snapshots) else worst


def exit_code(monitor: Monitor) -> int:
    states = monitor.runs
    if any(verdict(s, _snapshots_of(monitor, s)) == CRITICAL for s in states):
        return EXIT_CRITICAL
    if any(s.error for s in states):
        return EXIT_INTERNAL
    if monitor.missing_roots() or monitor.root_errors or not states or any(run_problem(s) for s in states):
        return EXIT_UNREADABLE
    if any(not_checked(s) for s in states):
        return EXIT_NOT_CHECKED
    return EXIT_OK


def mapping_hint(analysis_tags: dict[str, int]) -> list[str]:
    """For a run where nothing was recognised: the tags seen, and how to map them."""
    lines = ["not checked: no lr, d*lr or loss tag recognised. Scalar tags seen (points):"]
    lines += [f"  {tag} ({count})" for tag, count in sorted(analysis_tags.items())[:40]]
    if len(analysis_tags) > 40:
        lines.append(f"  ... and {len(analysis_tags) - 40} more")
    lines.append("map them with --lr-tag PATTERN, --dlr-tag PATTERN (d*lr) and --loss-tag TAG, "
                 "e.g. --lr-tag 'train/lr/{group}' --dlr-tag 'train/dlr/{group}' --loss-tag train/loss")
    return lines


def run_dict(state: RunState, snapshots: list | None = None) -> dict[str, Any]:
    run, a = state.run, state.analysis
    out: dict[str, Any] = {
        "path": str(run.path),
        "name": run.name,
        "files": [str(p) for p in run.files],
        "problem": run_problem(state),
        "error": state.error,
        "checked": None if state.analysis is None else state.analysis.checked,
        "earlier_run": state.earlier,
        "file_errors": {str(p): why for p, why in run.file_errors.items()},
        "damage": [{"file": str(p), "offset": d.offset, "message": d.message} for p, d in run.damage],
        "pending_bytes": run.pending_bytes,
        "superseded_points": run.superseded_points,
        "rewritten_files": sorted(str(p) for p in run.rewritten),
        "trainer": None,
        "trainer_detected_from": None,
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
        kept = best_snapshot(snapshots)
        out["keep"] = None if kept is None else kept.path
        out["keep_ranked_by"] = ranking_basis(snapshots)
        out["snapshots_mostly_fried"] = mostly_fried(snapshots)
    out["verdict"] = verdict(state, snapshots)
    if a is None:
        return out
    out["last_step"] = a.last_step
    out["trainer"] = a.trainer
    out["trainer_detected_from"] = a.trainer_why
    out["notes"] = a.notes
    out["unrecognised_tags"] = a.unrecognised
    out["worst"] = a.worst
    if a.schedule is not None:
        s = a.schedule
        out["schedule"] = {"name": s.name, "max_steps": s.max_steps, "warmup": s.warmup,
                           "restarts": None if s.restarts is None else list(s.restarts), "save_every": s.save_every,
                           "problem": s.problem, "source": s.source}
    for g in a.groups:
        out["groups"].append({
            "name": g.name, "lr_tag": g.lr_tag, "dlr_tag": g.dlr_tag, "d_tag": g.d_tag, "adaptive": g.adaptive,
            "d_now": g.d_now, "risk": g.risk, "restarts": g.restarts, "next_restart": g.next_restart,
        })
        for c in g.cycles:
            out["cycles"].append({
                "group": g.name, "index": c.index, "start": c.start, "end": c.end, "complete": c.complete,
                "peak_lr": c.peak_lr, "min_lr": c.min_lr, "min_lr_step": c.min_lr_step,
                "d_start": c.d_start, "d_end": c.d_end, "d_growth": c.d_growth, "peak_dlr": c.peak_dlr,
            })
    out["findings"] = [f.to_dict() for f in a.findings]
    return out


def _snapshots_of(monitor: Monitor, state: RunState) -> list | None:
    return None if monitor.snapshots is None else monitor.snapshots.by_run.get(state.run.path, [])


def run_json(state: RunState, snapshots: list | None = None) -> str:
    """One run's entry as it stands in ``to_json``'s document (indented for its place there)."""
    return dumps(run_dict(state, snapshots), indent=2).replace("\n", "\n    ")


_RUNS = "\u0000runs\u0000"  # where the runs go in the document's text


def to_json(monitor: Monitor) -> str:
    """The JSON report. Each run's entry is its own piece of text: one rendered in a worker
    process (an audit of many runs) is used as it is, unless snapshots were judged since."""
    doc: dict[str, Any] = {"lrwatch": __version__, "schema": SCHEMA_VERSION,
                           "missing": [monitor.as_given(p) for p in monitor.missing_roots()],
                           "unreadable": {monitor.as_given(p): why for p, why in monitor.root_errors.items()},
                           "runs": _RUNS,
                           "exit_code": exit_code(monitor)}
    if monitor.snapshots is not None:
        doc["unassigned_snapshots"] = [snap.to_dict() for snap in monitor.snapshots.orphans]
    runs = [s.rendered if s.rendered is not None and monitor.snapshots is None
            else run_json(s, _snapshots_of(monitor, s)) for s in monitor.runs]
    listed = "[\n    " + ",\n    ".join(runs) + "\n  ]" if runs else "[]"
    return dumps(doc, indent=2).replace(dumps(_RUNS), listed, 1)


def _g(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3g}"


def table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def render_snapshots(snapshots: list, indent: str = "  ") -> list[str]:
    if not snapshots:
        return [f"{indent}snapshots: none found"]
    kept = best_snapshot(snapshots)
    rows = [["snapshot", "step", "from", "verdict", "rank", "lr x peak", "reason"]]
    for s in snapshots:
        rank = "-" if s.rank is None else f"{s.rank}{' keep' if s is kept else ''}"
        rows.append([Path(s.path).name, "-" if s.step is None else str(s.step), s.step_source or "-", s.verdict,
                     rank, _g(s.lr_multiplier), s.reason])
    lines = [f"{indent}snapshots:"] + table(rows, indent + "  ")
    if kept is not None:
        lines.append(f"{indent}keep: {Path(kept.path).name} (safe snapshots ranked by {ranking_basis(snapshots)})")
    else:
        lines.append(f"{indent}keep: none (no snapshot is judged safe)")
    if mostly_fried(snapshots):
        lines.append(f"{indent}most snapshots are fried: the run is not ok whatever its findings say")
    return lines


def render_run(state: RunState, snapshots: list | None = None) -> str:
    run, a = state.run, state.analysis
    lines = [f"run {run.name}"]
    if state.earlier:
        lines.append("  earlier run: no new data while lrwatch watched; its findings never led to a stop")
    problem = run_problem(state)
    if problem:
        lines.append(f"  unreadable: {problem}")
    for path, why in run.file_errors.items():
        if not problem:
            lines.append(f"  not read: {path.name}: {why}")
    for path, d in run.damage:
        lines.append(f"  damaged: {path.name} at byte {d.offset}: {d.message}")
    if state.error:
        lines.append(f"  internal error (lrwatch could not analyse this run; please report it): {state.error}")
    if a is None or problem:
        return "\n".join(lines)
    if not a.checked:
        lines += ["  " + line for line in mapping_hint(a.unrecognised)]
        lines.append("  verdict: NOT CHECKED")
        return "\n".join(lines)
    files = f"{len(run.files)} event file{'s' if len(run.files) != 1 else ''}"
    extra = (f", {run.superseded_points} points re-logged after a resume (later ones kept)"
             if run.superseded_points else "")
    sched = a.schedule.name if a.schedule else "not logged"
    if a.schedule and a.schedule.source != "the logged config":
        sched += f" (from {a.schedule.source})"
    lines.append(f"  trainer: {a.trainer} ({a.trainer_why})")
    lines.append(f"  {files}, last step {a.last_step}, schedule: {sched}{extra}")
    for path in sorted(run.rewritten, key=str):
        lines.append(f"  note: {path.name} was replaced, truncated or rewritten in place (the bytes before where "
                     "the last read stopped changed) and read again from its start: its later contents win")
    for note in a.notes:
        lines.append(f"  note: {note}")
    for g in a.groups:
        tags = ", ".join(t for t in (g.lr_tag, g.dlr_tag, g.d_tag) if t)
        if g.lr is not None and not g.lr_tag and g.dlr_tag and not g.d_tag:
            tags += ", lr from the schedule"
        lines.append(f"  group {g.name} ({tags}): {len(g.restarts)} restart(s), d now {_g(g.d_now)}")
    rows = [["group", "cycle", "steps", "peak lr", "lowest lr @ step", "d start", "d end", "d growth", "peak d*lr"]]
    for g in a.groups:
        for c in g.cycles:
            rows.append([g.name, str(c.index), f"{c.start}-{c.end}{'' if c.complete else '…'}", _g(c.peak_lr),
                         f"{_g(c.min_lr)} @ {c.min_lr_step}", _g(c.d_start), _g(c.d_end),
                         "-" if c.d_growth is None else f"x{c.d_growth:.3g}", _g(c.peak_dlr)])
    if len(rows) > 1:
        lines += table(rows)
    if a.findings:
        lines.append("  findings:")
        for f in a.findings:
            where = f" [{f.group}]" if f.group else ""
            lines.append(f"    {f.severity.upper():8s} step {f.step:<7d} {f.kind}{where}: {f.message}")
    else:
        lines.append("  findings: none")
    if snapshots is not None:
        lines += render_snapshots(snapshots)
    worst = verdict(state, snapshots)
    lines.append(f"  verdict: {({CRITICAL: 'CRITICAL', WARNING: 'warnings only', None: 'ok'})[worst]}")
    return "\n".join(lines)


def render(monitor: Monitor) -> str:
    """The report (stdout); missing paths are errors, said on stderr by the caller."""
    parts = [render_run(s, _snapshots_of(monitor, s)) for s in monitor.runs]
    if monitor.snapshots is not None and monitor.snapshots.orphans:
        parts.append("\n".join(["snapshots matching no run (by output name):",
                                *render_snapshots(monitor.snapshots.orphans)[1:]]))
    return "\n\n".join(parts)
