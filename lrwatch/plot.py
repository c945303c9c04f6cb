"""A picture of each run, and a self-contained HTML post-mortem (``lrwatch plot``).

Needs matplotlib (``pip install 'lrwatch[plot]'``); nothing else in lrwatch imports it.
Per run, four panels share the step axis: the lr per group with its restarts; d×lr with
its running maximum and the predicted d×lr of the next restart; d on a log axis; the
loss, raw (faint) and smoothed (bold). Findings are markers coloured by severity on the
d×lr panel; snapshots are vertical lines coloured by their verdict on every panel. The
title says the run's verdict.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import numpy as np

from lrwatch.analysis import CRITICAL, WARNING, Analysis, points, spacing, trailing_mean
from lrwatch.output import write_atomic
from lrwatch.report import render_run

SEVERITY_COLORS = {WARNING: "#ff9900", CRITICAL: "#e00000"}
VERDICT_COLORS = {"safe": "#00a050", "high_lr": "#3070ff", "at_risk": "#d4b000", "fried": "#9400d3",
                  "unknown": "#909090"}  # none shared with a finding's colour
VERDICT_TITLES = {CRITICAL: "CRITICAL", WARNING: "warnings only", None: "ok"}
_GROUP_COLORS = ["#1f4e79", "#7b3294", "#008080", "#8c564b"]
PANEL_HEIGHT = 1.9  # inches per panel
SMOOTHING = 25  # optimizer steps in the bold loss line (diffusion loss swings ~30x step to step)


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("lrwatch plot needs matplotlib: pip install 'lrwatch[plot]'") from None
    return plt


def draw_run(axes, state, snapshots: list | None) -> None:
    """Draw one run on four axes (lr, d×lr, d, loss) that share the step axis."""
    a: Analysis = state.analysis
    source = state.series_source
    ax_lr, ax_dlr, ax_d, ax_loss = axes
    for k, g in enumerate(a.groups):
        color = _GROUP_COLORS[k % len(_GROUP_COLORS)]
        if g.lr is not None:
            ax_lr.plot(g.steps, g.lr, color=color, lw=1.2, label=f"lr {g.name}")
        if g.dlr is not None:
            ax_dlr.plot(g.steps, g.dlr, color=color, lw=1.2, label=f"d×lr {g.name}")
            best = np.maximum.accumulate(np.where(np.isfinite(g.dlr), g.dlr, -np.inf))
            ax_dlr.plot(g.steps, np.where(np.isfinite(best), best, np.nan), color=color, lw=0.8, ls="--",
                        label="highest so far")
            if g.risk_series is not None:
                with np.errstate(invalid="ignore", over="ignore"):
                    predicted = np.where(np.isfinite(g.risk_series), g.d * g.cycle_peak, np.nan)
                ax_dlr.plot(g.steps, predicted, color="#b05000", lw=0.9, ls=":", label="predicted next restart")
        if np.isfinite(g.d).any():
            ax_d.plot(g.steps, np.where(g.d > 0, g.d, np.nan), color=color, lw=1.2, label=f"d {g.name}")
            ax_d.set_yscale("log")
        for restart in g.restarts:
            ax_lr.axvline(restart, color="#bbbbbb", lw=0.6, ls="--", zorder=0)
    loss = source.series(a.loss_tag) if a.loss_tag else None
    if loss is not None and len(loss.steps):
        ax_loss.plot(loss.steps, loss.values, color="#888888", lw=0.5, alpha=0.35, label=a.loss_tag)
        smooth = trailing_mean(loss.values, points(spacing(loss.steps), SMOOTHING))
        ax_loss.plot(loss.steps, smooth, color="#222222", lw=1.8, label=f"mean of {SMOOTHING} steps")
        finite = loss.values[np.isfinite(loss.values)]
        if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 50:
            ax_loss.set_yscale("log")
    for snap in snapshots or []:
        if snap.step is None:
            continue
        for ax in axes:
            ax.axvline(snap.step, color=VERDICT_COLORS.get(snap.verdict, "#909090"), lw=1.6, zorder=1)
    _findings(ax_dlr, a)
    verdicts = sorted({s.verdict for s in snapshots or [] if s.step is not None}, key=list(VERDICT_COLORS).index)
    if verdicts:  # a key for the snapshot lines, on the lr panel's right
        from matplotlib.lines import Line2D

        ax_lr.add_artist(ax_lr.legend(
            [Line2D([], [], color=VERDICT_COLORS[v], lw=1.6) for v in verdicts],
            [f"snapshot {v}" for v in verdicts], loc="upper right", fontsize=7, frameon=False))
    ax_lr.set_ylabel("lr")
    ax_dlr.set_ylabel("d×lr")
    ax_d.set_ylabel("d (log)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_xlabel("step")
    for ax in axes:
        ax.grid(True, color="#eeeeee", lw=0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=7, frameon=False)
    verdict = VERDICT_TITLES[a.worst]
    ax_lr.set_title(f"{state.run.name} — {verdict}  ({a.trainer}, last step {a.last_step})", fontsize=9,
                    color=SEVERITY_COLORS.get(a.worst or "", "#000000"), loc="left")


def _findings(ax, a: Analysis) -> None:
    """Markers at each finding's step, on the d×lr curve where it has one, else at the top."""
    curve = next((g for g in a.groups if g.dlr is not None), None)
    top = ax.get_ylim()[1]
    for severity in (WARNING, CRITICAL):  # criticals drawn last, on top
        xs, ys = [], []
        for f in a.findings:
            if f.severity != severity:
                continue
            y = top
            if curve is not None and curve.dlr is not None and len(curve.steps):
                i = min(int(np.searchsorted(curve.steps, f.step)), len(curve.steps) - 1)
                if np.isfinite(curve.dlr[i]):
                    y = float(curve.dlr[i])
            xs.append(f.step)
            ys.append(y)
        if xs:
            ax.scatter(xs, ys, s=70, marker="v" if severity == WARNING else "X", color=SEVERITY_COLORS[severity],
                       edgecolors="none", zorder=5, label=f"{severity} finding")


def figure(states: list, snapshots_by_run: dict | None = None, columns: int = 3):
    """One figure: a run, or a grid of runs (up to ``columns`` side by side)."""
    plt = _pyplot()
    states = [s for s in states if s.analysis is not None and s.analysis.checked]
    if not states:
        raise ValueError("no run with data to draw")
    cols = min(columns, len(states))
    rows = -(-len(states) // cols)
    fig, axes = plt.subplots(4 * rows, cols, figsize=(7.5 * cols, PANEL_HEIGHT * 4 * rows), squeeze=False,
                             layout="constrained")
    for k, state in enumerate(states):
        r, c = divmod(k, cols)
        column = [axes[4 * r + i][c] for i in range(4)]
        for ax in column[1:]:
            ax.sharex(column[0])
        draw_run(column, state, (snapshots_by_run or {}).get(state.run.path))
    for k in range(len(states), rows * cols):
        r, c = divmod(k, cols)
        for i in range(4):
            axes[4 * r + i][c].set_visible(False)
    return fig


def png_bytes(states: list, snapshots_by_run: dict | None = None, dpi: int = 100) -> bytes:
    plt = _pyplot()
    fig = figure(states, snapshots_by_run)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def write_png(path: str | os.PathLike[str], states: list, snapshots_by_run: dict | None = None) -> None:
    write_atomic(Path(path), png_bytes(states, snapshots_by_run))


def html_report(states: list, snapshots_by_run: dict | None = None) -> str:
    """One self-contained page: each run's audit and its picture (a PNG inlined as base64)."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>lrwatch report</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}pre{background:#f6f6f6;padding:1em;"
             "overflow-x:auto;font-size:12px}h2{margin-top:2em}img{max-width:100%}"
             + "".join(f".v-{k}{{color:{c};font-weight:bold}}" for k, c in VERDICT_COLORS.items())
             + "</style></head><body><h1>lrwatch report</h1>"]
    for state in states:
        a = state.analysis
        snaps = (snapshots_by_run or {}).get(state.run.path)
        verdict = VERDICT_TITLES[a.worst] if a is not None else "not analysed"
        parts.append(f"<h2>{html.escape(state.run.name)} — {html.escape(verdict)}</h2>")
        if a is not None and a.checked:
            image = base64.b64encode(png_bytes([state], snapshots_by_run)).decode()
            parts.append(f"<img alt='{html.escape(state.run.name)}' src='data:image/png;base64,{image}'>")
        if snaps:
            rows = "".join(
                f"<tr><td>{html.escape(Path(s.path).name)}</td><td>{s.step if s.step is not None else '-'}</td>"
                f"<td class='v-{html.escape(s.verdict)}'>{html.escape(s.verdict)}</td>"
                f"<td>{html.escape(s.reason)}</td></tr>"
                for s in snaps)
            parts.append(f"<table><tr><th>snapshot</th><th>step</th><th>verdict</th><th>reason</th></tr>{rows}</table>")
        parts.append(f"<pre>{html.escape(render_run(state, snaps))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(path: str | os.PathLike[str], states: list, snapshots_by_run: dict | None = None) -> None:
    write_atomic(Path(path), html_report(states, snapshots_by_run))
