"""Logs and snapshots in object storage: a real S3 server (moto's server mode on a free
127.0.0.1 port, started and stopped here), runs uploaded whole or in growing parts the way
a sync tool re-uploads them (S3 objects are immutable)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("moto")
pytest.importorskip("s3fs")
pytest.importorskip("upath")

import lrwatch  # noqa: E402
from lrwatch import loader, snapshots, sources  # noqa: E402
from lrwatch.monitor import Monitor  # noqa: E402
from lrwatch.report import render  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "runs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server and the environment that points boto at it (what a user sets)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        deadline = time.monotonic() + 30
        while True:
            try:
                s3fs.S3FileSystem(skip_instance_cache=True).mkdir("lrwatch-test")
                break
            except Exception:
                assert time.monotonic() < deadline and server.poll() is None, "moto server did not start"
                time.sleep(0.2)
        yield env
    finally:
        server.kill()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3(s3_env):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    yield fs


def upload_run(fs, name: str, prefix: str) -> str:
    fs.put(str(FIXTURES / name), f"lrwatch-test/{prefix}/{name}", recursive=True)
    return f"s3://lrwatch-test/{prefix}/{name}"


def summary(result) -> list[tuple]:
    return [(s.run.name, [(f.kind, f.severity, f.step) for f in s.analysis.findings]) for s in result.runs]


def test_audit_of_an_s3_logdir_equals_the_local_audit_with_snapshot_headers_from_range_reads(s3, monkeypatch):
    url = upload_run(s3, "dadapt_sgd_blowup", "audit")
    ranges: list[tuple[str, int, int]] = []
    real = snapshots.read_range

    def recording(path, start, end):
        ranges.append((str(path), start, end))
        return real(path, start, end)

    monkeypatch.setattr(snapshots, "read_range", recording)
    remote = lrwatch.audit([f"{url}/logs"], snapshots=[f"{url}/output"], manifest=False)
    local = lrwatch.audit([FIXTURES / "dadapt_sgd_blowup" / "logs"], snapshots=[FIXTURES / "dadapt_sgd_blowup" / "output"],
                          manifest=False)
    assert remote.exit_code == local.exit_code == 1
    assert summary(remote) == summary(local)
    verdicts = [(Path(s.path).name, s.step, s.verdict) for snaps in remote.monitor.snapshots.by_run.values()
                for s in snaps]
    assert verdicts == [(Path(s.path).name, s.step, s.verdict) for snaps in local.monitor.snapshots.by_run.values()
                        for s in snaps]
    assert {Path(p).suffix for p, _, _ in ranges} == {".safetensors"}
    sizes = {Path(p).name: (FIXTURES / "dadapt_sgd_blowup" / "output" / Path(p).name).stat().st_size
             for p, _, _ in ranges}
    header_reads = [end for p, _, end in ranges]
    assert all(end < sizes[Path(p).name] for p, _, end in ranges), (header_reads, sizes)  # never the tensors


def test_a_synced_run_replaced_by_longer_and_shorter_uploads_is_read_from_where_it_stopped(s3, monkeypatch):
    (event,) = (FIXTURES / "prodigy_seed_bump" / "logs").rglob("events.out.tfevents.*")
    data = event.read_bytes()
    key = f"lrwatch-test/grow/run20261124083000/network_train/{event.name}"
    reads: list[tuple[int, int]] = []
    real = sources.read_range

    def recording(path, start, end):
        reads.append((start, end))
        return real(path, start, end)

    monkeypatch.setattr(sources, "read_range", recording)
    monitor = Monitor(["s3://lrwatch-test/grow"])
    s3.pipe(key, data[: len(data) // 3 + 7])  # cut mid-record, as a sync of a file being written would
    monitor.poll()
    (state,) = monitor.runs
    first_steps = int(state.run.series("lr/unet").steps[-1])
    read_to = max(end for _, end in reads)
    reads.clear()
    s3.pipe(key, data)  # the sync tool re-uploads the whole, longer file
    monitor.poll()
    assert int(state.run.series("lr/unet").steps[-1]) == 1000 > first_steps
    assert state.run.superseded_points == 0  # nothing read twice
    assert min(start for start, _ in reads) >= read_to - loader.TAIL_BYTES - 16  # only the new bytes (and a check)
    assert [(f.kind, f.step) for f in state.analysis.findings] == [("predicted_restart_blowup", 104), ("blowup", 200)]
    s3.pipe(key, data[: len(data) // 2])  # replaced by a shorter file: read again from the start
    monitor.poll()
    assert int(state.run.series("lr/unet").steps[-1]) == 501  # what the file holds now: the later contents win
    assert state.error is None and len(state.run.rewritten) == 1
    assert "was replaced, truncated or rewritten in place" in render(monitor)


def test_the_watcher_follows_an_s3_logdir_that_appears_and_grows(s3, s3_env, tmp_path):
    (event,) = (FIXTURES / "dadapt_sgd_blowup" / "logs").rglob("events.out.tfevents.*")
    data = event.read_bytes()
    key = f"lrwatch-test/live/logs/run20261124083000/network_train/{event.name}"
    watcher = subprocess.Popen([sys.executable, "-m", "lrwatch", "s3://lrwatch-test/live/logs", "--poll", "0.3",
                                "--until-idle", "3", "--runaway-critical", "10"], cwd=ROOT, env={**os.environ, **s3_env},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(watcher.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    deadline = time.monotonic() + 60  # the logdir appears once lrwatch says it waits (a slow start must not race it)
    while not any("waiting for s3://lrwatch-test/live/logs to appear" in line for line in lines):
        assert time.monotonic() < deadline and watcher.poll() is None, "".join(lines)
        time.sleep(0.05)
    for part in (4, 2, 1):
        s3.pipe(key, data[: len(data) // part])
        time.sleep(0.8)
    watcher.wait(timeout=60)
    reader.join(10)
    out, err = watcher.stdout.read(), "".join(lines)  # type: ignore[union-attr]
    assert watcher.returncode == 1, err
    assert "CRITICAL run20261124083000/network_train step 119: runaway_d" in err
    assert "verdict: CRITICAL" in out
    assert "stopping" not in err  # the writer is not a process here: nothing to stop


def test_storage_options_reach_fsspec_and_tensorboard_export_says_it_is_local_only(s3, s3_env):
    url = upload_run(s3, "prodigy_seed_bump", "options")
    env = {k: v for k, v in {**os.environ, **s3_env}.items() if k != "AWS_ENDPOINT_URL"}
    done = subprocess.run([sys.executable, "-m", "lrwatch", "audit", f"{url}/logs", "--tensorboard",
                           "--storage-option", f"endpoint_url={s3_env['AWS_ENDPOINT_URL']}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "predicted_restart_blowup" in done.stdout
    assert "--tensorboard writes next to local runs only" in done.stderr
    assert not s3.exists("lrwatch-test/options/prodigy_seed_bump/logs/prodigy_seed_bump20261124083000/"
                         "network_train/lrwatch")


def test_a_url_without_its_fsspec_package_is_a_clear_error():
    done = subprocess.run([sys.executable, "-m", "lrwatch", "audit", "gs://bucket/logs"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "gcsfs" in done.stderr or "lrwatch[gcs]" in done.stderr or "gs" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
