"""The kill-safety matrix: every stop decision tested with real processes (the tests marked
``kill_safety``: launched, given and found trainers; foreign hosts, names with no pid,
earlier runs, readers, sweep drivers, pids reused, signals, --dry-run), run again and again,
with both cores kept busy or not, so that a race shows as a failure here before a user meets it.

    python bench/kill_safety.py [--repeat N] [--load] [-k EXPR]

The suite runs each of them once (the short form, in CI). Prints each scenario with how many
of its runs passed; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--load", action="store_true", help="keep both cores busy (two `yes > /dev/null`) meanwhile")
    ap.add_argument("-k", dest="keyword", help="only the scenarios matching this pytest -k expression")
    args = ap.parse_args()
    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(2)] if args.load else []
    passed: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    try:
        with tempfile.TemporaryDirectory(prefix="lrwatch-kill-safety-") as scratch:
            for i in range(args.repeat):
                report = Path(scratch) / f"run{i}.xml"
                cmd = [sys.executable, "-m", "pytest", "-q", "-m", "kill_safety", "-p", "no:cacheprovider",
                       f"--basetemp={scratch}/tmp{i}", f"--junitxml={report}"]
                if args.keyword:
                    cmd += ["-k", args.keyword]
                subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for case in ET.parse(report).getroot().iter("testcase"):
                    name = case.get("name", "?")
                    if case.find("skipped") is not None:
                        continue
                    bad = case.find("failure") is not None or case.find("error") is not None
                    (failed if bad else passed)[name] += 1
                print(f"round {i + 1}/{args.repeat}: {sum(failed.values())} failure(s) so far", flush=True)
    finally:
        for hog in hogs:
            hog.kill()
    names = sorted(set(passed) | set(failed))
    width = max(map(len, names), default=10)
    print(f"\n{'scenario':{width}}  passed  {'(both cores busy)' if args.load else ''}")
    for name in names:
        total = passed[name] + failed[name]
        print(f"{name:{width}}  {passed[name]}/{total}" + ("  FAILED" if failed[name] else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
