"""The watcher's work per flush with 200 runs, layer by layer, in one process.

Each round appends one step (3 add_scalar records, one write) to each of 200 runs' event
files, as bench_load's writer does, takes the file events (inotify; ``Watcher.wait``), then
reads the flushes through one layer, the layers taken in turn round by round so a slow spell
of the machine falls on all of them: ``floor`` (fstat and pread of the file kept open, and the
one-pass decode, nothing else), ``read_new`` (``EventFile.read_new``), ``refresh`` (``Run.refresh``: the
run's series too) and ``poll`` (``Monitor.poll``, with analyses put off: what the watch loop
does per file event besides analysing). Prints the median thread CPU time per flush of each,
and of taking the events. Linux (inotify).

    python bench/bench_pass.py [--rounds 400] [--runs 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_load import new_event_file, step_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lrwatch.monitor as monitor_module  # noqa: E402
from lrwatch.loader import whole_torch_step  # noqa: E402
from lrwatch.monitor import Monitor  # noqa: E402
from lrwatch.watching import Watcher  # noqa: E402

Written = dict[Path, set[Path]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    monitor_module.MAX_ANALYSIS_DELAY = 1e9  # analyses put off: only the first one runs
    with tempfile.TemporaryDirectory(prefix="lrwatch-bench-") as tmp:
        past = step_bytes(1, 0.01, 20)
        files = [new_event_file(Path(tmp) / f"run{i:04d}" / "network_train", i, past) for i in range(args.runs)]
        monitor = Monitor([tmp])
        monitor.analysis_budget, monitor.updates_analyses = 1e-9, True
        watcher = Watcher(monitor)
        watcher.start()
        monitor.poll()
        monitor.start_live()
        watcher.wait(0.01)

        held: dict[Path, int] = {}  # each file opened once and kept open, as lrwatch.sources.GrowingFile does

        def floor(written: Written) -> None:
            for run, paths in written.items():
                for path in paths:
                    loader = monitor.states[run].run.files[path]
                    fd = held.get(path)
                    if fd is None:
                        fd = held[path] = os.open(path, os.O_RDONLY)
                    size = os.fstat(fd).st_size
                    data = os.pread(fd, size - loader.offset, loader.offset)
                    loader.offset = size
                    whole_torch_step(data)

        def read_new(written: Written) -> None:
            for run, paths in written.items():
                for path in paths:
                    monitor.states[run].run.files[path].read_new()

        def refresh(written: Written) -> None:
            for run, paths in written.items():
                monitor.states[run].run.refresh(False, paths)

        def poll(written: Written) -> None:
            monitor.poll(rediscover=False, written=written)

        layers = [floor, read_new, refresh, poll]
        spent: dict[str, list[float]] = {f.__name__: [] for f in layers}
        spent["events"] = []
        for r in range(args.rounds):
            data = step_bytes(21 + r, 0.01)
            for path in files:
                with open(path, "ab") as fh:
                    fh.write(data)
            time.sleep(0.002)
            t0 = time.thread_time()
            written, _, _ = watcher.wait(0.0)
            t1 = time.thread_time()
            layer = layers[r % len(layers)]
            layer(written)
            t2 = time.thread_time()
            spent["events"].append((t1 - t0) / len(files) * 1e6)
            spent[layer.__name__].append((t2 - t1) / len(files) * 1e6)
        watcher.stop()
        for fd in held.values():
            os.close(fd)
    print(f"per flush, {args.runs} runs, medians of {args.rounds // len(layers)} rounds each (thread CPU time):")
    for name, values in spent.items():
        print(f"  {name:10s} {statistics.median(values):6.1f} us")


if __name__ == "__main__":
    main()
