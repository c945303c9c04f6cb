"""A stand-in trainer: replays a recorded run step by step through torch's SummaryWriter.

    python tests/replay_writer.py RUN_NAME LOGDIR [--delay S] [--output DIR]

Writes LOGDIR/<run name><stamp>/network_train/events.out.tfevents.<time>.<host>.<pid>.<n>
exactly as kohya would (this process is the writer named in the file), flushing every
step, and copies the run's snapshots into --output at their steps.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("logdir")
    ap.add_argument("--delay", type=float, default=0.01)
    ap.add_argument("--output")
    args = ap.parse_args()

    from conftest import FIXTURES, LABELS, fixture_run
    from torch.utils.tensorboard import SummaryWriter

    from lrwatch.runs import Run

    src = Run(fixture_run(args.run))
    src.refresh()
    series = {tag: src.series(tag) for tag in src.tags}
    steps = sorted({int(s) for x in series.values() for s in x.steps})
    snapshots = {snap["step"]: snap["file"] for snap in LABELS[args.run]["snapshots"]}
    log_dir = Path(args.logdir) / f"{args.run}20261124090000" / "network_train"
    writer = SummaryWriter(str(log_dir))
    index = {tag: dict(zip(x.steps.tolist(), x.values.tolist())) for tag, x in series.items()}
    for step in steps:
        if args.output and step in snapshots:  # kohya saves before it logs the step
            Path(args.output).mkdir(parents=True, exist_ok=True)
            shutil.copy(FIXTURES / args.run / "output" / snapshots[step], Path(args.output) / snapshots[step])
        for tag, values in index.items():
            if step in values:
                writer.add_scalar(tag, values[step], step)
        writer.flush()
        time.sleep(args.delay)
    writer.close()


if __name__ == "__main__":
    main()
