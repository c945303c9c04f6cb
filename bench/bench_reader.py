"""Reading speed: lrwatch's reader next to tensorboard's EventAccumulator and tbparse.

Writes (once, cached in bench/out/) a kohya-like event file with torch's SummaryWriter:
STEPS steps x 6 scalars (loss/current, loss/average, lr/unet, lr/textencoder and their
d*lr). Then reads it with each reader in a fresh subprocess, REPEAT times, and prints
the median time, events/s, peak RSS and the ratio to EventAccumulator. lrwatch runs with its
bytecode compiled, as pip leaves an installed package (bench/installed.py).

    python bench/bench_reader.py [--steps 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import installed

OUT = Path(__file__).resolve().parent / "out"
TAGS = ["loss/current", "loss/average", "lr/textencoder", "lr/unet", "lr/d*lr/textencoder", "lr/d*lr/unet"]

# (imports, read): imports are timed apart, so that the read column is reading speed alone.
READERS = {
    "lrwatch": ("from lrwatch.loader import EventFile", """
batch = EventFile(PATH).read_new()
n = len(batch.scalars)
"""),
    "lrwatch (run: all series, merged)": ("from lrwatch.runs import Run", """
run = Run(PATH); run.refresh()
n = sum(len(run.series(t).steps) for t in run.tags)
"""),
    "lrwatch audit --json (the command)": ("import contextlib, io; from lrwatch.cli import main", """
with contextlib.redirect_stdout(io.StringIO()) as out:
    main(["audit", "--json", str(Path(PATH).parent)])
assert json.loads(out.getvalue())["runs"][0]["checked"]
n = EVENTS  # every event of the file, read and analysed
"""),
    "EventAccumulator": ("from tensorboard.backend.event_processing.event_accumulator import EventAccumulator", """
acc = EventAccumulator(PATH, size_guidance={"scalars": 0}); acc.Reload()
n = sum(len(acc.Scalars(t)) for t in acc.Tags()["scalars"])
"""),
    "tbparse": ("from tbparse import SummaryReader", """
n = len(SummaryReader(PATH).scalars)
"""),
}


def make_file(steps: int) -> Path:
    target = OUT / f"kohya_{steps}"
    done = target / "done"
    if done.exists():
        return target
    import math

    from torch.utils.tensorboard import SummaryWriter

    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("events.out.tfevents.*"):
        old.unlink()
    writer = SummaryWriter(str(target))
    d = 1e-6
    for step in range(1, steps + 1):
        lr = 0.5 * (1 + math.cos(math.pi * ((step % 500) / 500)))
        d = min(d * 1.3, 0.02)
        loss = 0.1 + 0.05 * math.sin(step)
        for tag, value in zip(TAGS, [loss, loss, lr, lr, d * lr, d * lr]):
            writer.add_scalar(tag, value, step)
    writer.close()
    done.write_text("ok")
    return target


def run_reader(imports: str, code: str, path: str, events: int, env: dict[str, str]) -> dict:
    script = f"""
import resource, time, json, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
PATH = {path!r}
EVENTS = {events}
t0 = time.perf_counter()
{imports}
t1 = time.perf_counter()
{code}
t2 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "seconds": t2 - t1, "events": n,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    folder = make_file(args.steps)
    path = str(next(folder.glob("events.out.tfevents.*")))
    size = Path(path).stat().st_size
    print(f"file: {size / 1e6:.1f} MB, {args.steps} steps x {len(TAGS)} scalars (ready in {time.perf_counter() - t0:.0f} s)")
    results = {}
    env = installed.env()
    for name, (imports, code) in READERS.items():
        runs = [run_reader(imports, code, path, args.steps * len(TAGS), env) for _ in range(args.repeat)]
        results[name] = {
            "import": statistics.median(r["import"] for r in runs),
            "seconds": statistics.median(r["seconds"] for r in runs),
            "events": runs[0]["events"],
            "rss_mb": statistics.median(r["rss_mb"] for r in runs),
        }
    base = results["EventAccumulator"]["seconds"]
    base_total = results["EventAccumulator"]["seconds"] + results["EventAccumulator"]["import"]
    print(f"{'reader':34s} {'read s':>7s} {'events/s':>10s} {'peak RSS':>9s} {'x EventAcc':>10s}"
          f" {'import s':>9s} {'x incl. import':>15s}")
    for name, r in results.items():
        total = r["seconds"] + r["import"]
        print(f"{name:34s} {r['seconds']:7.3f} {r['events'] / r['seconds']:10,.0f} {r['rss_mb']:7.0f}MB "
              f"{base / r['seconds']:9.1f}x {r['import']:9.3f} {base_total / total:14.1f}x")
    print(f"(medians of {args.repeat} runs, every reader in a fresh process; lrwatch verifies every record's CRCs)")


if __name__ == "__main__":
    main()
