"""A stand-in OneTrainer: replays fixtures/trainers/onetrainer/<run> into a workspace, step by step.

    python tests/replay_onetrainer.py RUN WORKSPACE [--delay S]

Like OneTrainer, it saves its config to WORKSPACE/config/ first, writes lr/<group> (= d x lr)
and loss/train_step to WORKSPACE/tensorboard/<name>/ through torch's SummaryWriter, saves
WORKSPACE/save/<name>-save-<step>-<epoch>-0.safetensors at each epoch's end, and on Ctrl-C
(SIGINT: its scripts/train.py catches KeyboardInterrupt and calls trainer.end()) saves the
current weights as <name>-interrupted.safetensors before it exits.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("workspace")
    ap.add_argument("--delay", type=float, default=0.005)
    args = ap.parse_args()

    from torch.utils.tensorboard import SummaryWriter

    from lrwatch.runs import Run

    source = ROOT / "fixtures" / "trainers" / "onetrainer" / args.run / "workspace"
    workspace = Path(args.workspace)
    shutil.copytree(source / "config", workspace / "config")
    (log_dir,) = (source / "tensorboard").iterdir()
    src = Run(log_dir)
    src.refresh()
    saves = {int(p.name.split("-save-")[1].split("-")[0]): p for p in (source / "save").iterdir()}

    def interrupted(_signum, _frame) -> None:
        shutil.copy(next(iter(saves.values())), workspace / "save" / f"{log_dir.name}-interrupted.safetensors")
        sys.exit(1)

    signal.signal(signal.SIGINT, interrupted)  # set here: a background child may inherit SIGINT ignored
    (workspace / "save").mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(workspace / "tensorboard" / log_dir.name))
    index = {tag: dict(zip(s.steps.tolist(), s.values.tolist())) for tag in src.tags if (s := src.series(tag))}
    for step in sorted({s for values in index.values() for s in values}):
        for tag, values in index.items():
            if step in values:
                writer.add_scalar(tag, values[step], step)
        writer.flush()
        if step + 1 in saves:
            shutil.copy(saves[step + 1], workspace / "save" / saves[step + 1].name)
        time.sleep(args.delay)
    writer.close()


if __name__ == "__main__":
    main()
