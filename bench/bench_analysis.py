"""The watcher's analysis per change, against the run's length: updating a run's analysis
with its new points only (``lrwatch.analysis.Analyser``, what the watcher does) next to
analysing the whole run again (what it did before), one new step at a time.

Uses bench_reader's kohya-like file (6 scalars a step, cosine restarts every 500 steps,
written once with torch's SummaryWriter and cached in bench/out/), copied into a
temporary run folder; then appends STEPS steps, each flushed alone, and after each
times both on the same points (the series are merged first: that is reading's cost,
the same for both). Prints the medians, their ratio, and checks that both gave the
same findings.

    python bench/bench_analysis.py [--lengths 1000 10000 100000] [--steps 200]
"""

from __future__ import annotations

import argparse
import io
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_reader import TAGS, make_file
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lrwatch.analysis import Analyser, analyze  # noqa: E402
from lrwatch.runs import Run  # noqa: E402
from lrwatch.trainers import read_layout  # noqa: E402


def one_step(step: int) -> bytes:
    """A step as make_file writes it (d settled at its cap)."""
    lr = 0.5 * (1 + math.cos(math.pi * ((step % 500) / 500)))
    loss = 0.1 + 0.05 * math.sin(step)
    buf = io.BytesIO()
    writer = RecordWriter(buf)
    for tag, value in zip(TAGS, [loss, loss, lr, lr, 0.02 * lr, 0.02 * lr]):
        writer.write(Event(wall_time=time.time(), step=step, summary=Summary(
            value=[Summary.Value(tag=tag, simple_value=value)])).SerializeToString())
    return buf.getvalue()


def measure(length: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="lrwatch-bench-") as tmp:
        folder = Path(tmp) / "network_train"
        shutil.copytree(make_file(length), folder)
        (path,) = folder.glob("events.out.tfevents.*")
        run = Run(folder)
        run.refresh()
        analyser = Analyser()
        analyser.update(run, read_layout(run))
        updated, full = [], []
        for step in range(length + 1, length + steps + 1):
            with open(path, "ab") as fh:
                fh.write(one_step(step))
            run.refresh(relist=False)
            for tag in run.tags:
                run.series(tag)
            reading = read_layout(run)
            t0 = time.perf_counter()
            got = analyser.update(run, reading)
            t1 = time.perf_counter()
            want = analyze(run, reading=reading)
            t2 = time.perf_counter()
            updated.append(t1 - t0)
            full.append(t2 - t1)
        same = [f.to_dict() for f in got.findings] == [f.to_dict() for f in want.findings]
        return {"updated": statistics.median(updated), "full": statistics.median(full), "same": same,
                "fresh": analyser.fresh_starts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--steps", type=int, default=200, help="steps appended (and analysed) per length")
    args = ap.parse_args()
    print(f"{'run length':>10s} {'update ms':>10s} {'full ms':>9s} {'ratio':>7s}  same findings")
    for length in args.lengths:
        r = measure(length, args.steps)
        print(f"{length:10,d} {r['updated'] * 1e3:10.3f} {r['full'] * 1e3:9.3f} {r['full'] / r['updated']:6.0f}x  "
              f"{'yes' if r['same'] else 'NO'} (analysed from the start {r['fresh']} time(s))")
    print(f"(medians over {args.steps} appended steps, each one flush of 6 scalars; 2 param groups and the loss)")


if __name__ == "__main__":
    main()
