from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))  # the fixture generator, for tests that train
FIXTURES = ROOT / "fixtures" / "runs"
LABELS = json.loads((ROOT / "fixtures" / "labels.json").read_text())


def fixture_run(name: str) -> Path:
    """The log folder of a recorded run (the one holding its event files)."""
    return next((FIXTURES / name / "logs").glob("*/network_train"))


def event_file_of(name: str) -> Path:
    return sorted(fixture_run(name).glob("events.out.tfevents.*"))[0]


def records_of(name: str) -> tuple[bytes, list[int]]:
    """A fixture's event file: its bytes and where each of its records starts (header included),
    to write it out a record or a few at a time, as a trainer's flushes."""
    from lrwatch.records import HEADER, find_records

    src = event_file_of(name).read_bytes()
    return src, [c - HEADER for c in find_records(src).starts.tolist()]


@pytest.fixture
def copy_run(tmp_path):
    """A private copy of a recorded run, to damage or grow without touching the fixtures."""

    def _copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(FIXTURES / name, dst)
        return next((dst / "logs").glob("*/network_train"))

    return _copy


def write_long_run(path: Path, points: int, **options) -> None:
    """``bench/memory.py``'s ``write_run``: a long healthy run framed as torch frames it, written
    in numpy (a SummaryWriter takes seconds per 100,000 scalars)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_run(path, points, **options)


def write_scalars(log_dir: Path, points: dict[str, list[tuple[int, float]]]) -> Path:
    """Write scalars through torch's SummaryWriter, the way kohya's logs are written."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    rows = sorted((step, tag, value) for tag, pts in points.items() for step, value in pts)
    for step, tag, value in rows:
        writer.add_scalar(tag, value, step)
    writer.close()
    return sorted(Path(log_dir).glob("events.out.tfevents.*"))[-1]


@pytest.fixture
def cli():
    """The CLI in-process through click's CliRunner (stdout and stderr kept apart)."""
    from click.testing import CliRunner

    from lrwatch.cli import cli as command

    def run(*args: str):
        return CliRunner().invoke(command, list(args), catch_exceptions=False)

    return run


def as_a_normal_user() -> list[str]:
    """A command prefix under which file permissions hold as they would for a normal user:
    root reads and writes everything, so as root the command runs without the capabilities
    that let it (setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH). Skips without setpriv."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]
