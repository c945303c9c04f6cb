"""Fuzz the record reader: mutated event files (bit flips, inserts, deletes, splices, absurd
but checksummed lengths, zero runs, truncation), each read in one pass and in random pieces.

    python bench/fuzz.py [N] [--seed S]      (default 100000 files)

Prints crashes (exceptions), hangs (a file taking over 2 s), lost records (an untouched
record not read) and piecewise mismatches (pieces not reading like one pass): all must be 0.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import event_file_of  # noqa: E402
from framing_oracle import Mutated, read_in_pieces, records_of  # noqa: E402

from lrwatch.events import decode  # noqa: E402
from lrwatch.records import find_records  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="?", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    records = (records_of(event_file_of("tf2_tensor_scalars").read_bytes())[:25]
               + records_of(event_file_of("prodigy_two_groups").read_bytes())[:35])
    crashes = hangs = lost = mismatches = 0
    kinds: dict[str, int] = {}
    t0 = time.perf_counter()
    for i in range(args.n):
        rng = random.Random(args.seed * 10_000_019 + i)
        file = Mutated(records)
        for _ in range(rng.randint(1, 4)):
            kind = file.mutate(rng)
            kinds[kind] = kinds.get(kind, 0) + 1
        data = bytes(file.data)
        t = time.perf_counter()
        try:
            whole = find_records(data)
            decode(data, whole.starts, whole.lengths)
            missing = set(file.intact_starts()) - set(whole.starts.tolist())
            lost += len(missing)
            cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randint(1, 6))]
            starts, damage = read_in_pieces(data, cuts)
            if starts != whole.starts.tolist() or damage != [d.offset for d in whole.damage]:
                mismatches += 1
        except Exception:
            crashes += 1
            if crashes <= 3:
                traceback.print_exc()
        if time.perf_counter() - t > 2.0:
            hangs += 1
        if (i + 1) % 10_000 == 0:
            print(f"  {i + 1} files, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"files: {args.n}  mutations: {sum(kinds.values())} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})")
    print(f"crashes: {crashes}  hangs: {hangs}  lost records: {lost}  piecewise mismatches: {mismatches}  "
          f"({time.perf_counter() - t0:.0f} s)")
    return 1 if crashes or hangs or lost or mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
