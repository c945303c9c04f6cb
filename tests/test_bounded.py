"""Memory bounded by what the rules need, not by a run's length (issue 27): a run read in parts,
each analysed and its points let go of, reports exactly what a run read whole does."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, ROOT, write_long_run

from lrwatch.monitor import READ_BUDGET, Monitor
from lrwatch.report import run_json
from lrwatch.runs import GrowingArray

RUNS = sorted([*FIXTURES.iterdir(), *(ROOT / "fixtures" / "trainers").iterdir()])


def reports(monitor: Monitor) -> dict[str, dict]:
    return {s.run.name: json.loads(run_json(s)) for s in monitor.runs}


def read(path: Path, budget: int | None) -> Monitor:
    monitor = Monitor([path])
    monitor.read_budget = budget
    monitor.poll()
    return monitor


def let_go(monitor: Monitor) -> bool:
    """Whether any run holds fewer points than it read."""
    return any((s := state.run.recent(tag)) is not None and s.first
               for state in monitor.runs for tag in state.run.tags)


@pytest.mark.parametrize(("budget", "let_go_in"), [(3000, len(RUNS) - 2), (70_000, 1)])
def test_a_run_read_in_parts_reports_what_it_does_read_whole(budget, let_go_in):
    """Parts of 3,000 bytes cut through records, through kohya's twin groups and its repeated
    micro-batch steps, through resumes and two-file runs; every report must be the same. (At
    70,000 bytes most of these small runs are one part.)"""
    parted = 0
    for path in RUNS:
        whole, parts = read(path, None), read(path, budget)
        assert reports(parts) == reports(whole), path
        parted += let_go(parts)
    assert parted >= let_go_in  # and it did let go of points (not a whole read in disguise)


def test_a_watched_run_lets_go_of_old_points_and_finds_what_a_whole_read_finds(tmp_path):
    """A trainer's file growing a few KB at a time (records cut mid-write), the watcher
    letting go of points at every update."""
    for name in ("dadapt_sgd_blowup", "prodigy_cosine_healthy", "prodigy_two_groups"):
        src = FIXTURES / name
        dst = tmp_path / name
        shutil.copytree(src, dst)
        events = sorted(dst.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_size)[-1]
        data = events.read_bytes()
        events.write_bytes(b"")
        monitor = Monitor([dst])
        monitor.updates_analyses, monitor.read_budget, monitor.forget_every = True, READ_BUDGET, 1
        for end in range(0, len(data) + 4096, 4096):
            with open(events, "ab") as fh:
                fh.write(data[end : end + 4096])
            monitor.poll()
        assert let_go(monitor), name
        assert reports(monitor) == reports(read(dst, None)), name


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_long_run_read_in_parts_holds_a_part_not_the_run(tmp_path):
    """900,000 points (45 MB, a healthy cosine-restart run): read in 1 MB parts, the peak is a
    small fraction of reading it whole (``bench/memory.py`` measures 42 M points)."""
    run = tmp_path / "long"
    write_long_run(run / "events.out.tfevents.1700000000.bench.1.0", 900_000)
    monitors: dict[str, Monitor] = {}
    whole = _peak(lambda: monitors.setdefault("whole", read(run, None)))
    parts = _peak(lambda: monitors.setdefault("parts", read(run, 1 << 20)))
    assert reports(monitors["parts"]) == reports(monitors["whole"])
    assert parts < whole / 5, (parts, whole)


def test_a_growing_array_keeps_its_indices_and_its_last_item_when_it_lets_go():
    grown = GrowingArray()
    grown.extend([float(k) for k in range(10)])
    grown.forget_before(6)
    assert (grown.start, grown.n) == (6, 10) and grown.view.tolist() == [6.0, 7.0, 8.0, 9.0]
    assert grown.at(7) == 7.0 and grown.since(8).tolist() == [8.0, 9.0] and grown.between(6, 8).tolist() == [6.0, 7.0]
    grown.forget_before(100)  # never the last item: what comes next is compared with it
    assert grown.view.tolist() == [9.0] and grown.last() == 9.0
    grown.extend([10.0])
    assert grown.since(9).tolist() == [9.0, 10.0] and not grown.view.flags.writeable


def test_a_file_rewritten_between_two_parts_keeps_nothing_of_its_old_content(tmp_path):
    """A run read in parts whose file is rewritten in place before the next part (a sync tool
    uploading another run over it): the step held back from the old content is dropped with it."""
    from conftest import event_file_of

    from lrwatch.runs import Run

    path = tmp_path / "run" / "events.out.tfevents.1700000000.bench.1.0"
    path.parent.mkdir()
    path.write_bytes(event_file_of("prodigy_seed_bump").read_bytes())
    parted = Run(path.parent)
    parted.refresh(budget=3000)
    assert parted.more
    path.write_bytes(event_file_of("dadapt_sgd_blowup").read_bytes())  # the same file, other content
    while parted.refresh(relist=False, budget=3000) or parted.more:
        pass
    whole = Run(path.parent)
    whole.refresh()
    assert parted.tags == whole.tags
    for tag in whole.tags:
        got, want = parted.series(tag), whole.series(tag)
        assert np.array_equal(got.steps, want.steps) and np.array_equal(got.values, want.values, equal_nan=True), tag
