"""Run lrwatch in a benchmark the way an installed lrwatch runs: with its bytecode cached.

pip compiles an installed package's bytecode (as it did tensorboard's and tbparse's here).
A checkout on a machine that sets PYTHONDONTWRITEBYTECODE (this one does) would instead
compile every lrwatch module at every start, 50-70 ms here that no installed lrwatch pays.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / "out" / "pycache"  # outside the source tree


def env() -> dict[str, str]:
    """The environment for a benchmarked lrwatch process, its bytecode compiled once."""
    out = dict(os.environ)
    out.pop("PYTHONDONTWRITEBYTECODE", None)
    out["PYTHONPYCACHEPREFIX"] = str(CACHE)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "lrwatch")], env=out, check=True)
    return out
