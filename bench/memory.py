"""Peak memory of lrwatch against the size of what it reads (issue 27: memory bounded by what
the rules need, not by the run's length).

    python bench/memory.py [--points N] [--runs R --run-points P] [--keep DIR]

Writes (once, into --keep or a temp folder) a kohya-style event file of N scalars (default
42,000,000: ~2 GiB, lr, d*lr and loss of a healthy cosine-restart run, framed as torch writes
them), and R runs of P points each (default 1,000 x 6,000); then measures the peak RSS of
``lrwatch audit --json`` on the big file and of ``lrwatch watch --until-idle`` over the runs,
each in its own process, and prints them against the targets below.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lrwatch.records import _mask_array, data_crcs, masked_crc  # noqa: E402

TARGET_BIG_FILE_MB = 300  # the example target for the 2 GiB file
TARGET_MANY_RUNS_MB = 150  # 1,000 runs x 6,000 points: what 1,000 runs' findings and windows need, with room
TAGS = ("lr/unet", "lr/d*lr/unet", "loss/current")
FIRST_STEP = 1 << 21  # every step a 4-byte varint, so every record of a tag has one length
CHUNK_STEPS = 500_000


def _records(tag: str, steps: np.ndarray, values: np.ndarray, wall: np.ndarray) -> np.ndarray:
    """(len(steps), framed length) bytes: add_scalar's Event for each step, framed."""
    t = tag.encode()
    body = np.empty((len(steps), 1 + 8 + 1 + 4 + 6 + len(t) + 5), np.uint8)
    body[:, 0] = 0x09
    body[:, 1:9] = wall.astype("<f8").view(np.uint8).reshape(-1, 8)
    body[:, 9] = 0x10
    s = steps.astype(np.uint64)
    for k in range(4):  # the step's varint
        byte = (s >> np.uint64(7 * k)) & np.uint64(0x7F)
        body[:, 10 + k] = (byte | np.uint64(0x80 if k < 3 else 0)).astype(np.uint8)
    p = 14
    body[:, p : p + 6] = [0x2A, len(t) + 9, 0x0A, len(t) + 7, 0x0A, len(t)]
    body[:, p + 6 : p + 6 + len(t)] = np.frombuffer(t, np.uint8)
    body[:, p + 6 + len(t)] = 0x15
    body[:, p + 7 + len(t) :] = values.astype("<f4").view(np.uint8).reshape(-1, 4)
    n, length = body.shape
    crcs = _mask_array(data_crcs(body.ravel(), np.arange(n) * length, np.full(n, length))).astype("<u4")
    header = np.frombuffer(length.to_bytes(8, "little") + masked_crc(length.to_bytes(8, "little")).to_bytes(4, "little"),
                           np.uint8)
    return np.concatenate([np.broadcast_to(header, (n, 12)), body, crcs.view(np.uint8).reshape(-1, 4)], axis=1)


def write_run(path: Path, points: int, seed: int = 0, cycle: int = 1000, loss_spread: float = 0.8) -> None:
    """A healthy run of ``points`` scalars: cosine restarts every ``cycle`` steps, d settled, a
    loss of 0.1 with that log-spread (0: flat)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps_total = points // len(TAGS)
    with open(path, "wb") as fh:
        for first in range(0, steps_total, CHUNK_STEPS):
            steps = np.arange(first, min(steps_total, first + CHUNK_STEPS)) + FIRST_STEP
            lr = 0.5 * (1 + np.cos(np.pi * ((steps - FIRST_STEP) % cycle) / cycle))
            loss = 0.1 * np.exp(rng.normal(0, loss_spread, len(steps)))
            wall = 1.7e9 + (steps - FIRST_STEP) * 0.5
            parts = [_records(tag, steps, v, wall) for tag, v in zip(TAGS, (lr, 0.01 * lr, loss))]
            fh.write(np.concatenate(parts, axis=1).tobytes())


def peak_rss_mb(cmd: list[str]) -> tuple[float, float, int]:
    """(peak RSS in MB, seconds, exit code) of ``cmd`` run alone in a child."""
    started = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    # ru_maxrss: kB on Linux; the largest of the children waited for so far, so each is measured in its own wrapper
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.perf_counter() - started, code


def measure(cmd: list[str]) -> tuple[float, float, int]:
    wrapper = [sys.executable, __file__, "--measure", "--", *cmd]
    out = subprocess.run(wrapper, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1]), int(out[2])


def main() -> int:
    if "--measure" in sys.argv:
        rss, seconds, code = peak_rss_mb(sys.argv[sys.argv.index("--") + 1 :])
        print(rss, seconds, code)
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=42_000_000)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--run-points", type=int, default=6000)
    ap.add_argument("--keep", type=Path, help="write the inputs here (and reuse them there next time)")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="lrwatch-memory-"))
    big = base / f"big{args.points}" / "events.out.tfevents.1700000000.bench.1.0"
    if not big.exists():
        write_run(big, args.points)
    many = base / f"many{args.runs}x{args.run_points}"
    if not many.exists():
        for i in range(args.runs):
            write_run(many / f"run{i:04d}" / "events.out.tfevents.1700000000.bench.1.0", args.run_points, seed=i)
    lrwatch = [sys.executable, "-m", "lrwatch"]
    size_gib = big.stat().st_size / 2**30
    rows = [(f"audit --json, one file of {args.points:,} points ({size_gib:.2f} GiB)",
             measure([*lrwatch, "audit", "--json", str(big.parent)]), TARGET_BIG_FILE_MB),
            (f"watch --until-idle 1, {args.runs:,} runs x {args.run_points:,} points",
             measure([*lrwatch, "watch", str(many), "--until-idle", "1", "--no-manifest"]), TARGET_MANY_RUNS_MB)]
    print(f"{'case':62} {'peak RSS':>10} {'target':>8} {'time':>8}  exit")
    for name, (rss, seconds, code), target in rows:
        verdict = "ok" if rss <= target else "OVER"
        print(f"{name:62} {rss:8.0f} MB {target:5d} MB {seconds:7.1f}s  {code}  {verdict}")
    if os.environ.get("LRWATCH_BENCH_KEEP") is None and args.keep is None:
        print(f"(inputs left in {base}; delete it, or pass --keep DIR to reuse them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
