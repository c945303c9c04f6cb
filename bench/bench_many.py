"""Many finished runs: `lrwatch audit` over a sweep's logdir next to a loop of EventAccumulator loads.

Writes (once, cached in bench/out/) RUNS kohya-style runs of STEPS steps each: one run is
written with torch's SummaryWriter (loss/current, loss/average, lr/unet, lr/d*lr/unet at
every step; a cosine schedule with restarts and a growing d) and copied under RUNS folder
names. Then times, each in a fresh process, with the peak memory of the whole process tree:

- ``lrwatch audit --json LOGS --workers 1`` (one core) and ``--workers N`` (every core);
- a loop of ``EventAccumulator(run).Reload()`` reading every scalar of the first EA_RUNS runs
  (the loop's time grows linearly with the runs; with EA_RUNS < RUNS its loads are scaled
  up, its imports are not, and the output says so).

lrwatch runs with its bytecode compiled, as pip leaves an installed package (bench/installed.py).

    python bench/bench_many.py [--runs 1000] [--steps 2000] [--ea-runs 100] [--repeat 2]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import installed
import psutil

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
TAGS = ["loss/current", "loss/average", "lr/unet", "lr/d*lr/unet"]


def make_logs(runs: int, steps: int) -> Path:
    logs = OUT / f"many_{runs}x{steps}"
    if (logs / "done").exists():
        return logs
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(logs, ignore_errors=True)
    first = logs / "lora_0000" / "network_train"
    writer = SummaryWriter(str(first))
    d, cycle = 1e-6, max(1, steps // 20)
    for step in range(1, steps + 1):
        lr = 0.5 * (1 + math.cos(math.pi * ((step - 1) % cycle) / cycle))
        d = min(d * 1.05, 1e-4)
        loss = 0.1 * (1.5 + math.sin(step * 0.7))
        for tag, value in zip(TAGS, [loss, loss, lr, d * lr]):
            writer.add_scalar(tag, value, step)
    writer.close()
    for i in range(1, runs):
        shutil.copytree(first, logs / f"lora_{i:04d}" / "network_train")
    (logs / "done").write_text("ok")
    return logs


def timed(args: list[str], env: dict[str, str] | None = None, output: bool = False) -> tuple[float, float, str]:
    """Wall seconds, peak resident memory (MB) of a command and all its children together, and
    its output if asked for (a short one: it is read once the command has ended)."""
    t0 = time.perf_counter()
    proc = psutil.Popen(args, cwd=ROOT, stdout=subprocess.PIPE if output else subprocess.DEVNULL, env=env, text=True)
    peak = 0.0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                tree = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20)
            except psutil.Error:
                pass
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if code not in (0, 1):  # 1: a finding (the runs' d*lr curves raise warnings, not errors)
        raise SystemExit(f"{' '.join(args)} exited {code}")
    return seconds, peak, proc.stdout.read() if output else ""


EA_LOOP = """
import sys, time
t0 = time.perf_counter()
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
print(time.perf_counter() - t0)
n = 0
for run in sorted(Path(sys.argv[1]).iterdir())[: int(sys.argv[2])]:
    if not run.is_dir():
        continue
    acc = EventAccumulator(str(run / "network_train"), size_guidance={"scalars": 0})
    acc.Reload()
    n += sum(len(acc.Scalars(t)) for t in acc.Tags()["scalars"])
print(n)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--ea-runs", type=int, default=100, help="runs the EventAccumulator loop reads (scaled up)")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    t0 = time.perf_counter()
    logs = make_logs(args.runs, args.steps)
    size = sum(f.stat().st_size for f in logs.rglob("events.out.tfevents.*"))
    cores = os.cpu_count() or 1
    print(f"{args.runs} runs x {args.steps} steps x {len(TAGS)} scalars, {size / 1e6:.0f} MB "
          f"(ready in {time.perf_counter() - t0:.0f} s); {cores} cores")
    lrwatch = [sys.executable, "-m", "lrwatch", "audit", "--json", str(logs)]
    env = installed.env()
    rows: dict[str, tuple[float, float]] = {}
    for name, cmd in [("lrwatch audit, one core (--workers 1)", [*lrwatch, "--workers", "1"]),
                      (f"lrwatch audit, every core (--workers {cores})", [*lrwatch, "--workers", str(cores)])]:
        results = [timed(cmd, env) for _ in range(args.repeat)]
        rows[name] = (statistics.median(r[0] for r in results), statistics.median(r[1] for r in results))
    ea_runs = min(args.ea_runs, args.runs)
    seconds, peak, out = timed([sys.executable, "-c", EA_LOOP, str(logs), str(ea_runs)], output=True)
    imports = float(out.split()[0])
    scale = args.runs / ea_runs
    ea_name = "EventAccumulator loop" + (f" ({ea_runs} runs' loads x{scale:g})" if scale != 1 else "")
    rows[ea_name] = (imports + (seconds - imports) * scale, peak)
    base = rows[ea_name][0]
    print(f"{'reader':44s} {'seconds':>8s} {'peak MB':>8s} {'x EventAcc':>10s}")
    for name, (secs, mb) in rows.items():
        print(f"{name:44s} {secs:8.1f} {mb:8.0f} {base / secs:9.1f}x")
    print(f"(whole processes, imports included; lrwatch: medians of {args.repeat}; peak memory of the process "
          "tree, workers included)")


if __name__ == "__main__":
    main()
