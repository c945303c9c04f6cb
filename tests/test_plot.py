"""Pictures of runs: valid PNG and HTML files, with the colours of findings and verdicts
exactly where the run has them (pixels read back from the rendered figure)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest

import lrwatch
from lrwatch.cli import main

pytest.importorskip("matplotlib")
from lrwatch import plot  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "runs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rgb(hex_color: str) -> np.ndarray:
    return np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)], np.int16)


def pixels_like(image: np.ndarray, hex_color: str, tolerance: int = 6) -> np.ndarray:
    return (np.abs(image[..., :3].astype(np.int16) - rgb(hex_color)) <= tolerance).all(axis=-1)


def rendered(name: str, snapshots: bool = True):
    run = FIXTURES / name
    result = lrwatch.audit([run / "logs"], snapshots=[run / "output"] if snapshots else None, manifest=False)
    book = result.monitor.snapshots
    fig = plot.figure(result.runs, book.by_run if book else None)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())
    return result.runs[0], fig, image


def at(fig, ax, step: float, y: float) -> tuple[int, int]:
    """The pixel (row, column) of a data point on an axis, in the rendered image."""
    x_px, y_px = ax.transData.transform((step, y))
    return int(round(fig.bbox.height - y_px)), int(round(x_px))


def column_colors(image: np.ndarray, ax, fig, step: float) -> np.ndarray:
    """The pixels of one axis's column at ``step`` (the whole height of the axis)."""
    box = ax.get_window_extent()
    _, col = at(fig, ax, step, 0)
    top, bottom = int(fig.bbox.height - box.y1) + 2, int(fig.bbox.height - box.y0) - 2
    return image[top:bottom, col - 1 : col + 2]


def test_verdicts_and_findings_are_drawn_in_their_colours_where_the_run_has_them():
    state, fig, image = rendered("dadapt_sgd_blowup")
    ax_lr, ax_dlr, ax_d, ax_loss = fig.axes[:4]
    snaps = {s.step: s.verdict for s in lrwatch.audit([FIXTURES / "dadapt_sgd_blowup" / "logs"],
                                                        snapshots=[FIXTURES / "dadapt_sgd_blowup" / "output"],
                                                        manifest=False).monitor.snapshots.by_run.popitem()[1]}
    assert snaps[100] == "safe" and snaps[300] == "fried"
    for step, verdict in snaps.items():
        if step is None or step >= 600:
            continue
        column = column_colors(image, ax_d, fig, step)
        assert pixels_like(column, plot.VERDICT_COLORS[verdict]).sum() > 20, (step, verdict)
    assert not pixels_like(column_colors(image, ax_d, fig, 250), plot.VERDICT_COLORS["fried"]).any()  # no save there
    (group,) = state.analysis.groups
    for f in state.analysis.findings:
        i = min(int(np.searchsorted(group.steps, f.step)), len(group.steps) - 1)
        row, col = at(fig, ax_dlr, f.step, float(group.dlr[i]))
        patch = image[row - 3 : row + 4, col - 3 : col + 4]
        assert pixels_like(patch, plot.SEVERITY_COLORS[f.severity]).sum() >= 4, f
    title = fig.axes[0].get_title(loc="left")
    assert "CRITICAL" in title and "dadapt_sgd_blowup" in title


def test_a_healthy_run_has_no_finding_colours():
    state, fig, image = rendered("prodigy_cosine_healthy", snapshots=False)
    assert state.analysis.findings == []
    for color in plot.SEVERITY_COLORS.values():
        assert pixels_like(image, color).sum() == 0
    assert "— ok" in fig.axes[0].get_title(loc="left")


def test_plot_writes_a_png_per_call_and_a_self_contained_html(tmp_path, capsys):
    png, page = tmp_path / "run.png", tmp_path / "report.html"
    run = FIXTURES / "dadapt_sgd_blowup"
    assert main(["plot", str(run / "logs"), str(FIXTURES / "prodigy_seed_bump" / "logs"), "-o", str(png),
                 "--html", str(page), "--snapshots", str(run / "output"), "--no-manifest"]) == 1  # as audit
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and 30_000 < len(data) < 3_000_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 1000 and height > 500  # two runs side by side, four panels each
    text = page.read_text()
    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    assert "class='v-fried'" in text and "runaway_d" in text and "http" not in text  # nothing fetched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "run.png"]  # no temporary file left


def test_plot_needs_an_output(capsys):
    assert main(["plot", str(FIXTURES / "prodigy_seed_bump" / "logs")]) == 2
    assert "-o FILE.png" in capsys.readouterr().err


def test_without_matplotlib_plot_says_how_to_get_it(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['matplotlib'] = None; from lrwatch.cli import main; "
            f"sys.exit(main(['plot', {str(FIXTURES / 'prodigy_seed_bump' / 'logs')!r}, '-o', {str(tmp_path / 'x.png')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "pip install 'lrwatch[plot]'" in done.stderr, done.stderr
    assert not (tmp_path / "x.png").exists()
