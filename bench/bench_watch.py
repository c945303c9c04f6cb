"""Watcher latency and idle CPU.

Latency: the time from an event's bytes reaching the file (write + flush + close
returned) to lrwatch printing the finding it causes, over SAMPLES events. Each
sample appends one record (framed by tensorboard's own RecordWriter) with a
non-finite d*lr to its own pre-existing run, so each causes exactly one finding.
Idle CPU: lrwatch's CPU time over IDLE seconds with nothing changing, as a share
of one core. Native observer and polling, in one run.

    python bench/bench_watch.py [--samples 200] [--poll 0.25 1.0] [--idle 10]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "watch"
HEALTHY_STEPS = 50


def scalar_event(step: int, tag: str, value: float) -> bytes:
    return Event(wall_time=time.time(), step=step,
                 summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)])).SerializeToString()


def make_runs(n: int) -> list[Path]:
    shutil.rmtree(OUT, ignore_errors=True)
    files = []
    for i in range(n):
        run = OUT / f"run{i:04d}" / "network_train"
        run.mkdir(parents=True)
        path = run / f"events.out.tfevents.1700000000.bench.{i + 10}.0"
        with open(path, "wb") as fh:
            w = RecordWriter(fh)
            w.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
            for step in range(1, HEALTHY_STEPS + 1):
                w.write(scalar_event(step, "lr/unet", 1.0))
                w.write(scalar_event(step, "lr/d*lr/unet", 0.01))
        files.append(path)
    return files


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def measure(samples: int, poll: float | None, idle: float, gap: float) -> dict:
    files = make_runs(samples)
    args = [sys.executable, "-m", "lrwatch", str(OUT)] + (["--poll", str(poll)] if poll else [])
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    arrived: dict[int, float] = {}
    ready = threading.Event()
    pattern = re.compile(r"run(\d{4})/network_train step \d+: blowup")

    def read() -> None:
        for line in proc.stderr:
            now = time.time()
            m = pattern.search(line)
            if m:
                arrived[int(m.group(1))] = now
            elif "network_train: step" in line:
                ready.set()  # initial status lines: everything has been read once

    threading.Thread(target=read, daemon=True).start()
    ready.wait(60)
    time.sleep(1.0)
    watcher = psutil.Process(proc.pid)
    written: dict[int, float] = {}
    for i, path in enumerate(files):
        with open(path, "ab") as fh:
            RecordWriter(fh).write(scalar_event(HEALTHY_STEPS + 1, "lr/unet", 1.0))
            RecordWriter(fh).write(scalar_event(HEALTHY_STEPS + 1, "lr/d*lr/unet", float("nan")))
            fh.flush()
        written[i] = time.time()
        time.sleep(gap)
    deadline = time.time() + 10 + (poll or 0)
    while len(arrived) < samples and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    cpu0 = sum(watcher.cpu_times()[:2])
    t0 = time.monotonic()
    time.sleep(idle)
    cpu = (sum(watcher.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
    proc.terminate()
    proc.wait(10)
    lat = [(arrived[i] - written[i]) * 1000 for i in written if i in arrived]
    return {"n": len(lat), "lost": samples - len(lat), "p50": statistics.median(lat) if lat else float("nan"),
            "p95": percentile(lat, 95) if lat else float("nan"), "max": max(lat) if lat else float("nan"),
            "idle_cpu": cpu * 100}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--poll", type=float, nargs="+", default=[0.25, 1.0])
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument("--gap", type=float, default=0.03, help="seconds between appended events")
    args = ap.parse_args()
    print(f"{'mode':18s} {'events':>7s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s} {'idle CPU':>9s}")
    for mode, poll in [("native observer", None)] + [(f"polling {p:g} s", p) for p in args.poll]:
        r = measure(args.samples, poll, args.idle, args.gap)
        lost = f"  ({r['lost']} not seen)" if r["lost"] else ""
        print(f"{mode:18s} {r['n']:7d} {r['p50']:8.1f} {r['p95']:8.1f} {r['max']:8.1f} {r['idle_cpu']:8.2f}%{lost}")
    print("(latency: bytes flushed to the file -> finding line read from lrwatch's stderr; idle CPU: % of one core)")


if __name__ == "__main__":
    main()
