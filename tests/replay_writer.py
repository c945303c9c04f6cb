"""A stand-in trainer: replays a recorded run step by step through torch's SummaryWriter.

    python tests/replay_writer.py RUN_NAME LOGDIR [--delay S] [--output DIR] [--file NAME] [--go]

Writes LOGDIR/<run name><stamp>/network_train/events.out.tfevents.<time>.<host>.<pid>.<n>
exactly as kohya would (this process is the writer named in the file), flushing every
step, and copies the run's snapshots into --output at their steps. ``--file NAME`` writes
the same records under a name of its own instead: another host's, or one with no pid, as a
synced or shared log folder holds them. ``--go``: once imported (torch takes seconds on a
loaded machine), print "ready" and wait for a line on stdin before creating anything.
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
    ap.add_argument("--file")
    ap.add_argument("--go", action="store_true")
    args = ap.parse_args()

    from conftest import FIXTURES, LABELS, fixture_run
    from torch.utils.tensorboard import SummaryWriter

    from lrwatch.runs import Run

    src = Run(fixture_run(args.run))
    src.refresh()
    series = {tag: src.series(tag) for tag in src.tags}
    steps = sorted({int(s) for x in series.values() for s in x.steps})
    snapshots = {snap["step"]: snap["file"] for snap in LABELS[args.run]["snapshots"]}
    if args.go:
        print("ready", flush=True)
        sys.stdin.readline()
    log_dir = Path(args.logdir) / f"{args.run}20261124090000" / "network_train"
    writer = SummaryWriter(str(log_dir)) if args.file is None else _NamedWriter(log_dir / args.file)
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


class _NamedWriter:
    """SummaryWriter's records (TensorBoard's own record writer and protos) in a file named by hand."""

    def __init__(self, path: Path) -> None:
        from tensorboard.summary.writer.record_writer import RecordWriter

        path.parent.mkdir(parents=True, exist_ok=True)
        self.records = RecordWriter(open(path, "wb"))  # noqa: SIM115 (closed in close())
        self._write(wall_time=time.time(), file_version="brain.Event:2")

    def _write(self, **fields) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self.records.write(Event(**fields).SerializeToString())

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._write(wall_time=time.time(), step=step, summary=Summary(value=[Summary.Value(tag=tag,
                                                                                          simple_value=value)]))

    def flush(self) -> None:
        self.records.flush()

    def close(self) -> None:
        self.records.close()


if __name__ == "__main__":
    main()
