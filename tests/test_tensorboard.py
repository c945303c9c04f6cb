"""lrwatch's analysis shown in TensorBoard: a sibling run <run folder>/lrwatch/, read back with
tensorboard's own EventAccumulator and served by a real TensorBoard server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import as_a_normal_user
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lrwatch
from lrwatch.cli import main
from lrwatch.tbexport import EXPORT_DIR, EXPORT_FILE

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "runs"
REPLAY = [sys.executable, str(ROOT / "tests" / "replay_writer.py")]


def copy_fixture(tmp_path: Path, name: str) -> tuple[Path, Path]:
    shutil.copytree(FIXTURES / name, tmp_path / name)
    logs = tmp_path / name / "logs"
    (run,) = [p.parent for p in logs.rglob("events.out.tfevents.*")]
    return logs, run


def load(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / EXPORT_DIR), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def texts(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]


def test_the_audit_writes_the_analysis_as_a_tensorboard_run(tmp_path):
    logs, run = copy_fixture(tmp_path, "dadapt_sgd_blowup")
    before = sorted(p.name for p in run.iterdir())
    assert main(["audit", str(logs), "--tensorboard", "--snapshots", str(tmp_path / "dadapt_sgd_blowup" / "output"),
                 "--no-manifest", "--runaway-critical", "10"]) == 1  # the toy's fry: d's runaway x11
    analysis = lrwatch.audit([logs], thresholds=lrwatch.Thresholds(runaway_critical=10)).runs[0].analysis
    (group,) = analysis.groups
    acc = load(run)
    d = acc.Scalars("lrwatch/d/unet")
    assert [e.step for e in d] == group.steps.tolist()
    np.testing.assert_allclose([e.value for e in d], group.d, rtol=1e-6)
    risk = acc.Scalars("lrwatch/restart_risk/unet")
    finite = np.isfinite(group.risk_series)
    np.testing.assert_allclose([e.value for e in risk], group.risk_series[finite], rtol=1e-6)
    assert acc.Scalars("lrwatch/predicted_restart_dlr/unet")
    severities = {e.step: e.value for e in acc.Scalars("lrwatch/findings")}
    assert severities[119] == 2.0 and severities[67] == 1.0  # critical runaway_d, the warned restart
    messages = texts(acc, "lrwatch/finding")
    assert "runaway_d" in dict(messages)[119] and dict(messages)[119].startswith("**CRITICAL**")
    assert len(messages) == len(analysis.findings)
    (snap_step, table), = texts(acc, "lrwatch/snapshots")
    assert "| snapshot | step | verdict |" in table and "**fried**" in table
    (_, verdict), = texts(acc, "lrwatch/verdict")
    assert verdict.startswith("**CRITICAL**")
    assert sorted(p.name for p in run.iterdir()) == sorted([*before, EXPORT_DIR])  # the trainer's files untouched


def test_a_second_audit_rewrites_the_export_and_never_reads_it_as_a_run(tmp_path):
    logs, run = copy_fixture(tmp_path, "prodigy_seed_bump")
    assert main(["audit", str(logs), "--tensorboard"]) == 0
    first = (run / EXPORT_DIR / EXPORT_FILE).read_bytes()
    assert main(["audit", str(logs), "--tensorboard", "--json"]) == 0  # not exit code 3: no extra run
    assert (run / EXPORT_DIR / EXPORT_FILE).read_bytes() == first  # the same bytes: no point twice
    assert os.listdir(run / EXPORT_DIR) == [EXPORT_FILE]  # no temporary file left behind
    assert len(lrwatch.audit([logs]).runs) == 1
    assert len(load(run).Scalars("lrwatch/d/unet")) == 1000


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_a_run_folder_lrwatch_may_not_write_into_is_said_and_the_audit_goes_on(tmp_path):
    prefix = as_a_normal_user()
    logs, run = copy_fixture(tmp_path, "prodigy_seed_bump")
    run.chmod(0o555)
    try:
        done = subprocess.run([*prefix, sys.executable, "-m", "lrwatch", "audit", str(logs), "--tensorboard"],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
    finally:
        run.chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert "could not write" in done.stderr and "Permission denied" in done.stderr
    assert "verdict: warnings only" in done.stdout
    assert not (run / EXPORT_DIR).exists()


def test_the_watcher_appends_as_the_run_grows_without_duplicating_points(tmp_path):
    logs = tmp_path / "logs"
    watcher = subprocess.Popen([sys.executable, "-m", "lrwatch", str(logs), "--tensorboard", "--",
                                *REPLAY, "prodigy_seed_bump", str(logs), "--delay", "0.004"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sizes = []
    deadline = time.monotonic() + 60
    while watcher.poll() is None and time.monotonic() < deadline:
        found = list(logs.rglob(EXPORT_FILE)) if logs.exists() else []
        if found:
            sizes.append(found[0].stat().st_size)
        time.sleep(0.2)
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err
    assert len(set(sizes)) >= 3 and sizes == sorted(sizes)  # it grew while the trainer wrote
    (export,) = logs.rglob(EXPORT_FILE)
    acc = load(export.parent.parent)
    for tag in ("lrwatch/d/unet", "lrwatch/restart_risk/unet"):
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)) and steps[-1] == 1000, tag  # every step once, in order
    assert [s for s, _ in texts(acc, "lrwatch/finding")] == [104, 200]
    live = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert main(["audit", str(logs), "--tensorboard"]) == 0
    acc = load(export.parent.parent)
    assert {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]} == live


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, **query: str):
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_a_real_tensorboard_server_shows_the_lrwatch_run(tmp_path):
    logs, run = copy_fixture(tmp_path, "dadapt_sgd_blowup")
    assert main(["audit", str(logs), "--tensorboard"]) == 1
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logs), "--host", "127.0.0.1",
                               "--port", str(port), "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ours = f"{run.relative_to(logs).as_posix()}/{EXPORT_DIR}"
        deadline = time.monotonic() + 60
        while True:
            try:
                tags = _get(port, "/data/plugin/scalars/tags")
                if ours in tags:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "TensorBoard did not serve the run"
            time.sleep(0.5)
        assert run.relative_to(logs).as_posix() in tags  # next to the trainer's own run
        assert ours in _get(port, "/data/runs")
        assert {"lrwatch/restart_risk/unet", "lrwatch/d/unet", "lrwatch/findings"} <= set(tags[ours])
        points = _get(port, "/data/plugin/scalars/scalars", run=ours, tag="lrwatch/restart_risk/unet")
        assert len(points) > 100 and all(len(p) == 3 for p in points)  # [wall time, step, value]
        text_runs = _get(port, "/data/plugin/text/tags")
        assert "lrwatch/finding" in text_runs.get(ours, [])
    finally:
        server.kill()
        server.wait()
