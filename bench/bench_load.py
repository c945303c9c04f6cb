"""The watcher under load: many runs written at once.

N runs each get R steps per second (one step = 3 events: lr, d*lr and loss records, appended and
flushed as torch's writer does) for D seconds while lrwatch watches them; meanwhile, at
random moments, one run gets a non-finite d*lr and the time until lrwatch prints the
finding is measured. Prints lrwatch's CPU (share of one core) and the finding latency.

    python bench/bench_load.py [--runs 200] [--rate 5] [--seconds 20] [--poll 0.5] [--per-flush 1] [--history 20]
    python bench/bench_load.py --runs 1 --rate 1667 --per-flush 4   # one run at 5,000 events/s
    python bench/bench_load.py --history 10000   # 200 runs that are 10,000 steps long already
    python bench/bench_load.py --launched        # lrwatch launches a (sleeping) trainer and guards it
    python bench/bench_load.py --files 3         # each run has 2 more event files (a resume, kohya's config)
    python bench/bench_load.py --finite          # the injected finding is a finite restart spike: it waits its turn
"""

from __future__ import annotations

import argparse
import random
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
OUT = ROOT / "bench" / "out" / "load"


def record(step: int, tag: str, value: float) -> bytes:
    return Event(wall_time=time.time(), step=step,
                 summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)])).SerializeToString()


def step_bytes(step: int, dlr: float, steps: int = 1) -> bytes:
    """``steps`` steps from ``step`` on (the last with ``dlr``), as one flush."""
    import io

    buf = io.BytesIO()
    w = RecordWriter(buf)
    for s in range(step, step + steps):
        for tag, value in (("loss/current", 0.1), ("lr/unet", 1.0), ("lr/d*lr/unet", dlr if s == step + steps - 1
                                                                          else 0.01)):
            w.write(record(s, tag, value))
    return buf.getvalue()


def restart_spike_bytes(step: int) -> bytes:
    """Two steps as one flush: the lr at its low, then a restart whose d*lr is 10,000x the
    highest before: a finite finding (a warning), which waits for the run's analysis turn."""
    import io

    buf = io.BytesIO()
    w = RecordWriter(buf)
    for s, lr, dlr in ((step, 0.01, 0.0001), (step + 1, 1.0, 100.0)):
        for tag, value in (("loss/current", 0.1), ("lr/unet", lr), ("lr/d*lr/unet", dlr)):
            w.write(record(s, tag, value))
    return buf.getvalue()


def new_event_file(folder: Path, index: int, past: bytes) -> Path:
    """A kohya-style run's event file in ``folder`` (made), as torch's writer starts it (the
    file_version record), holding ``past`` (steps written before the watch starts)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"events.out.tfevents.1700000000.bench.{index + 10}.0"
    with open(path, "wb") as fh:
        RecordWriter(fh).write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        fh.write(past)
    return path


def run_load(runs: int, rate: float, seconds: float, poll: float | None, profile: str | None = None,
             per_flush: int = 1, history: int = 20, launched: bool = False, files_per_run: int = 1,
             finite: bool = False) -> dict:
    shutil.rmtree(OUT, ignore_errors=True)
    files = []
    past = step_bytes(1, 0.01, history)  # the same past for every run
    for i in range(runs):
        folder = OUT / f"run{i:04d}" / "network_train"
        files.append(new_event_file(folder, i, past))
        for k in range(1, files_per_run):  # finished files that stay: a resume's earlier one, add_hparams' folder
            extra = folder / f"{1600000000 + k}.5" / f"events.out.tfevents.{1600000000 + k}.bench.{i + 10}.{k}"
            extra.parent.mkdir()
            with open(extra, "wb") as fh:
                RecordWriter(fh).write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
    args = [sys.executable, *(["-m", "cProfile", "-o", profile] if profile else []), "-m", "lrwatch", str(OUT),
            "--until-idle", "3"] + (["--poll", str(poll)] if poll else [])
    if launched:  # the design card's use: lrwatch starts the trainer, and follows its process tree
        args += ["--", sys.executable, "-c", "import time; time.sleep(3600)"]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen: dict[int, float] = {}
    ready = threading.Event()
    pattern = re.compile(r"run(\d{4})/network_train step \d+: blowup")

    def read() -> None:
        for line in proc.stderr:
            m = pattern.search(line)
            if m:
                seen.setdefault(int(m.group(1)), time.time())
            elif "network_train: step" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(60)
    time.sleep(1.0)
    watcher = psutil.Process(proc.pid)
    step = {i: history for i in range(runs)}
    injected: dict[int, float] = {}
    rng = random.Random(0)
    victims = rng.sample(range(runs), min(20, runs))
    inject_at = dict(zip(sorted(rng.uniform(2, seconds - 2) for _ in victims), victims))
    threads_before = {t.id: t.user_time + t.system_time for t in watcher.threads()}
    times0, t0 = watcher.cpu_times(), time.monotonic()
    tick = per_flush / rate
    next_tick = time.monotonic()
    while time.monotonic() - t0 < seconds:
        now = time.monotonic() - t0
        just_injected = set()
        for at in [a for a in inject_at if a <= now]:
            v = inject_at.pop(at)
            with open(files[v], "ab") as fh:
                fh.write(restart_spike_bytes(step[v] + 1) if finite else step_bytes(step[v] + 1, float("nan"), per_flush))
            step[v] += 2 if finite else per_flush
            injected[v] = time.time()
            just_injected.add(v)
        for i, path in enumerate(files):
            if i in just_injected:
                continue  # its step of this tick held the non-finite value; next tick it goes on, as kohya does
            with open(path, "ab") as fh:
                fh.write(step_bytes(step[i] + 1, 0.01, per_flush))
            step[i] += per_flush
        next_tick += tick
        time.sleep(max(0.0, next_tick - time.monotonic()))
    times1 = watcher.cpu_times()
    cpu = (times1.user + times1.system - times0.user - times0.system) / (time.monotonic() - t0)
    kernel = (times1.system - times0.system) / (time.monotonic() - t0)
    threads_after = {t.id: t.user_time + t.system_time for t in watcher.threads()}
    elapsed = time.monotonic() - t0
    main_cpu = (threads_after.get(proc.pid, 0.0) - threads_before.get(proc.pid, 0.0)) / elapsed
    trainer = watcher.children()
    proc.wait(30)  # it ends 3 s after the last write (--until-idle), leaving a launched trainer running
    for child in trainer:
        child.kill()
    lat = [(seen[v] - injected[v]) * 1000 for v in injected if v in seen]
    ordered = sorted(lat)
    return {"cpu": cpu * 100, "sys": kernel * 100, "main": main_cpu * 100, "n": len(lat), "lost": len(injected) - len(lat),
            "p50": statistics.median(lat) if lat else float("nan"),
            "p95": ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))] if lat else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--rate", type=float, default=5.0,
                    help="steps per second per run (a step is 3 events: 5 steps/s = 15 events/s)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--poll", type=float, nargs="*", default=[])
    ap.add_argument("--per-flush", type=int, default=1,
                    help="steps written at once (torch's SummaryWriter flushes every 10 events by default)")
    ap.add_argument("--history", type=int, default=20, help="steps each run has before the watch starts")
    ap.add_argument("--profile", metavar="FILE", help="run the watcher under cProfile, stats to FILE")
    ap.add_argument("--launched", action="store_true", help="lrwatch launches a trainer (one that sleeps) and guards it")
    ap.add_argument("--files", type=int, default=1, help="event files per run (all but one finished, as after a resume)")
    ap.add_argument("--finite", action="store_true",
                    help="inject a finite restart spike (a finding that waits its turn), not a non-finite d*lr")
    args = ap.parse_args()
    print(f"{args.runs} runs x {args.rate:g} steps/s ({3 * args.rate:g} events/s, {args.per_flush} step(s) per flush)"
          f" for {args.seconds:g} s, after {args.history} steps each" + (", a launched trainer" if args.launched else "")
          + (f", {args.files} event files per run" if args.files > 1 else "")
          + (", finite restart spikes injected" if args.finite else ""))
    print(f"{'mode':16s} {'CPU':>7s} {'kernel':>7s} {'main':>7s} {'findings':>9s} {'p50 ms':>8s} {'p95 ms':>8s}")
    for mode, poll in [("native observer", None)] + [(f"polling {p:g} s", p) for p in args.poll]:
        r = run_load(args.runs, args.rate, args.seconds, poll, args.profile, args.per_flush, args.history,
                     args.launched, args.files, args.finite)
        lost = f" ({r['lost']} not seen)" if r["lost"] else ""
        print(f"{mode:16s} {r['cpu']:6.1f}% {r['sys']:6.1f}% {r['main']:6.1f}% {r['n']:9d} {r['p50']:8.1f} {r['p95']:8.1f}{lost}")
    print("(CPU: lrwatch's share of one core while the runs are written, of it the kernel's (system time) and the "
          "main thread's (the rest is the file observer's threads); latency: " + ("a restart spike" if args.finite
          else "a non-finite d*lr") + " flushed -> its finding line on lrwatch's stderr)")


if __name__ == "__main__":
    main()
