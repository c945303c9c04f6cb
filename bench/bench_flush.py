"""The watcher's read of one flush: what a watched run costs per file event.

Appends one step at a time (3 add_scalar records, as bench_load's runs and torch's writer
flush them) to a run's event file and times ``Run.refresh`` of just that file after each,
the way the watcher reads a run a file event named. Times it with the one-pass read of a
flush (an fstat and a read of the file kept open, ``lrwatch.sources.GrowingFile``, and the
records walked and decoded at once, ``lrwatch.loader.whole_torch_step``) and without it (through a ``Reader``,
the records framed, then decoded), alternately in one process, and prints the medians and
their ratio.

    python bench/bench_flush.py [--flushes 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_load import new_event_file, step_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lrwatch.loader as loader  # noqa: E402
from lrwatch.runs import Run  # noqa: E402
from lrwatch.sources import GrowingFile  # noqa: E402


def per_flush(flushes: int) -> float:
    """Microseconds per ``Run.refresh`` of one appended step."""
    with tempfile.TemporaryDirectory(prefix="lrwatch-bench-") as tmp:
        folder = Path(tmp) / "network_train"
        path = new_event_file(folder, 0, step_bytes(1, 0.01, 20))
        run = Run(folder)
        run.refresh()
        steps = [step_bytes(21 + i, 0.01) for i in range(flushes)]
        spent = 0.0
        with open(path, "ab") as fh:
            for step in steps:
                fh.write(step)
                fh.flush()
                t = time.perf_counter()
                run.refresh(False, {path})
                spent += time.perf_counter() - t
        assert len(run.series("loss/current").steps) == 20 + flushes
        return spent / flushes * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flushes", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    one_pass, walked = [], []
    fused, appended = loader.whole_torch_step, GrowingFile.appended
    for _ in range(args.rounds):
        loader.whole_torch_step, GrowingFile.appended = fused, appended
        one_pass.append(per_flush(args.flushes))
        # every flush framed, then decoded (through the Reader: no fstat and read before it)
        loader.whole_torch_step, GrowingFile.appended = (lambda buf: None), (lambda *args: None)
        walked.append(per_flush(args.flushes))
    loader.whole_torch_step, GrowingFile.appended = fused, appended
    a, b = statistics.median(one_pass), statistics.median(walked)
    print(f"one flush (3 records) read, median of {args.rounds} rounds of {args.flushes}:")
    print(f"  one pass (this release)      {a:6.1f} us   (rounds {min(one_pass):.1f}-{max(one_pass):.1f})")
    print(f"  framed, then decoded         {b:6.1f} us   (rounds {min(walked):.1f}-{max(walked):.1f})")
    print(f"  ratio                        {b / a:6.2f}x")


if __name__ == "__main__":
    main()
