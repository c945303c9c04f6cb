"""The watcher's analysis, updated with each run's new points only (``Analyser``), against a
full analysis of the same points: real event files, grown a few bytes to a few kB at a
time (records cut anywhere), read by a real ``Run``."""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, write_scalars
from hypothesis import given, settings
from hypothesis import strategies as st

from lrwatch.analysis import (
    Analyser,
    Analysis,
    _finite_ends,
    _lr_extremes,
    analyze,
)
from lrwatch.rules.core import window_sums_array, window_sums_list
from lrwatch.runs import Run, discover, is_event_file
from lrwatch.trainers import read_layout

FIXTURES = ROOT / "fixtures"
CORPUS_RUNS = ["prodigy_s0", "prodigy_dcoef20_s3", "prodigy_growth_s1", "dadapt_lion_lr10_s2", "dadapt_adan_lr3_s2",
               "dadapt_adam_s3", "prodigy_safeguard_s2", "dadapt_adagrad_s1"]
TREES = [*(p for p in sorted((FIXTURES / "runs").iterdir())), *(p for p in sorted((FIXTURES / "trainers").iterdir())
                                                                  if p.is_dir()),
         *(FIXTURES / "corpus" / "runs" / name for name in CORPUS_RUNS)]


def same_analysis(got: Analysis, want: Analysis) -> None:
    assert [f.to_dict() for f in got.findings] == [f.to_dict() for f in want.findings]
    assert (got.notes, got.validation_tag, got.last_step, got.loss_tag, got.unrecognised, got.trainer) == \
        (want.notes, want.validation_tag, want.last_step, want.loss_tag, want.unrecognised, want.trainer)
    assert len(got.groups) == len(want.groups)
    for g, w in zip(got.groups, want.groups):
        assert (g.name, g.restarts, g.risk, g.next_restart, g.d_now) == (w.name, w.restarts, w.risk, w.next_restart,
                                                                          w.d_now)
        assert [asdict(c) for c in g.cycles] == [asdict(c) for c in w.cycles]
        for name in ("steps", "lr", "dlr", "d", "cycle_peak", "risk_series"):
            a, b = getattr(g, name), getattr(w, name)
            assert (a is None) == (b is None), name
            if a is not None:
                np.testing.assert_array_equal(a, b, err_msg=name)


def same_series(run: Run, path: Path, root: Path) -> None:
    """A run read part by part holds the series a run reading its files at once does."""
    whole = Run(path, root)
    whole.refresh()
    assert run.tags == whole.tags
    for tag in run.tags:
        got, want = run.series(tag), whole.series(tag)
        assert got is not None and want is not None
        for name in ("steps", "values", "wall_times"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=f"{tag} {name}")
        assert want.replaced == 0, tag  # (``replaced`` counts points handed out, then replaced: none in one read)
    assert run.superseded_points == whole.superseded_points  # (counted as the series are built)


def grown_in_parts(tree: Path, dest: Path, seed: int, parts: int = 25):
    """Copy ``tree`` with its event files empty, then yield after each part of their bytes is
    appended (file after file, in the order written), a part being anywhere from one byte to
    twice the average."""
    shutil.copytree(tree, dest)
    files = sorted((p for p in dest.rglob("*") if is_event_file(p)), key=lambda p: (p.parent, p.name))
    data = {p: p.read_bytes() for p in files}
    for p in files:
        p.write_bytes(b"")
    rng = random.Random(seed)
    mean = max(1, sum(map(len, data.values())) // parts)
    for p in files:
        done = 0
        while done < len(data[p]):
            step = rng.randint(1, 2 * mean)
            with open(p, "ab") as fh:
                fh.write(data[p][done : done + step])
            done += step
            yield


@pytest.mark.parametrize("tree", TREES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_an_analysis_updated_with_new_points_only_equals_a_full_analysis_at_every_update(tree, tmp_path):
    analysers: dict[Path, Analyser] = {}
    runs: dict[Path, Run] = {}
    updates = 0
    for _ in grown_in_parts(tree, tmp_path / "copy", seed=len(tree.name)):
        for path in discover(tmp_path / "copy"):
            run = runs.setdefault(path, Run(path, tmp_path / "copy"))
            run.refresh()
            same_series(run, path, tmp_path / "copy")
            reading = read_layout(run)
            same_analysis(analysers.setdefault(path, Analyser()).update(run, reading), analyze(run, reading=reading))
            updates += 1
    assert updates >= 20
    # Most updates extended what was there: the run was not analysed again from its start
    # (steps logged more than once, as when gradient accumulation logs each micro-batch, do).
    for path, analyser in analysers.items():
        relogged = any(s.replaced for t in runs[path].tags if (s := runs[path].series(t)) is not None)
        if not relogged:
            assert analyser.fresh_starts <= 4, (path, analyser.fresh_starts)


def test_steps_that_go_back_are_analysed_again_from_the_start(tmp_path):
    """A resume into the same folder rewrites steps already seen: what was carried is void."""
    first = {"lr/unet": [(s, 1.0 - s / 200) for s in range(1, 101)],
             "lr/d*lr/unet": [(s, 1e-4 * (1.0 - s / 200) * (1 + s / 10)) for s in range(1, 101)],
             "loss/current": [(s, 0.1) for s in range(1, 101)]}
    write_scalars(tmp_path / "run", first)
    run = Run(tmp_path / "run")
    run.refresh()
    analyser = Analyser()
    analyser.update(run, read_layout(run))
    again = {tag: [(s, v * (3.0 if tag == "lr/d*lr/unet" else 1.0)) for s, v in pts if s > 60]
             for tag, pts in first.items()}
    write_scalars(tmp_path / "run", again)
    run.refresh()
    got = analyser.update(run, read_layout(run))
    assert analyser.fresh_starts == 2
    same_analysis(got, analyze(run, reading=read_layout(run)))


def test_plateaus_and_a_tiny_lr_split_across_updates_give_the_full_analysis(tmp_path):
    """Cycles that end on a long plateau of a tiny lr (below ``tiny_lr`` x the highest: d is
    carried there, not divided out of float noise), whose lowest lr is reached many times
    (the cycle's lowest is the first of them), read a few steps at a time."""
    rng = np.random.default_rng(0)
    lr, dlr, loss = [], [], []
    for step in range(1, 301):
        phase = (step - 1) % 100
        value = 1.0 if phase < 20 else 1e-9 if phase >= 70 else 1.0 - (phase - 20) / 50 * 0.999
        d = 1e-4 * (1 + step / 50)
        lr.append((step, value))
        dlr.append((step, d * value * (1 + 1e-3 * rng.standard_normal())))
        loss.append((step, float(rng.lognormal(-2, 1))))
    write_scalars(tmp_path / "source", {"lr/unet": lr, "lr/d*lr/unet": dlr, "loss/current": loss})
    analyser, run = Analyser(), None
    for _ in grown_in_parts(tmp_path / "source", tmp_path / "copy", seed=1, parts=120):
        run = run or Run(tmp_path / "copy")
        run.refresh()
        reading = read_layout(run)
        same_analysis(analyser.update(run, reading), analyze(run, reading=reading))
    assert analyser.fresh_starts <= 3
    assert run is not None and [c.min_lr_step for c in analyze(run).groups[0].cycles] == [71, 171, 271]


@pytest.mark.parametrize("seed", [3, 4])
def test_restarts_to_other_heights_warmups_and_non_finite_lrs_read_a_few_steps_at_a_time(tmp_path, seed):
    """A watched update's few points take the plain-float path of the rules (``SMALL_UPDATE``),
    a full analysis the vectorised one: cycles whose peaks differ (a restart is measured
    against its own cycle's peak), warmups that rise from their own peak (no restart), and
    NaN and inf lr (counted as unknown, also when an update's last point is one; the first
    d*lr unknown too), and a loss that then diverges, must come out the same either way."""
    rng = np.random.default_rng(seed)
    lr, dlr, loss = [], [], []
    peaks = [1.0, 0.6, 1.3, 0.2, 0.9, 0.35, 1.1]
    for step in range(1, 7 * 70 + 1):  # cycles longer than SMALL_UPDATE: a full analysis takes numpy's path
        cycle, phase = divmod(step - 1, 70)
        top = peaks[cycle]
        value = top * (0.2 + 0.8 * phase / 5) if phase < 5 else top * 0.5 * (1 + np.cos(np.pi * (phase - 5) / 65))
        value = {97: np.nan, 230: np.inf, 231: np.nan, 350: -np.inf}.get(step, value)
        d = 1e-4 * (1 + step / 30) * (1 + 0.01 * rng.standard_normal())
        lr.append((step, float(value)))
        dlr.append((step, float(d * value) if step > 2 else np.nan))  # (no highest d*lr yet at first)
        loss.append((step, float(rng.lognormal(-2, 0.5)) * (30 if step > 420 else 1)))  # then it diverges
    write_scalars(tmp_path / "source", {"lr/unet": lr, "lr/d*lr/unet": dlr, "loss/current": loss})
    analyser, run = Analyser(), None
    for _ in grown_in_parts(tmp_path / "source", tmp_path / "copy", seed=seed, parts=250):
        run = run or Run(tmp_path / "copy")
        run.refresh()
        reading = read_layout(run)
        same_analysis(analyser.update(run, reading), analyze(run, reading=reading))
    assert run is not None and len(analyze(run).groups[0].restarts) == len(peaks) - 1
    assert {f.values.get("what") for f in analyze(run).findings} >= {"loss_above_best"}
    assert analyser.fresh_starts <= 3


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64)
                | st.sampled_from([0.0, -0.0, 1.0, np.nan, np.inf, -np.inf]), max_size=80))
def test_a_cycles_extremes_are_the_same_in_plain_floats_and_in_numpy(values):
    x = np.asarray(values, np.float64)
    assert _lr_extremes(x, small=True) == _lr_extremes(x, small=False)
    assert _finite_ends(x, small=True) == _finite_ends(x, small=False)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64) | st.sampled_from([0.1, 1e16, -1e16, 3.0]),
                max_size=60), st.integers(1, 30), st.integers(0, 60))
def test_a_loss_windows_sums_are_the_same_floats_in_plain_python_and_in_numpy(values, span, skip):
    """A watched update sums its few windows in plain floats, a full analysis in numpy: the
    same adds in the same order, so the loss rules see the same floats either way."""
    x = np.asarray(values, np.float64)
    skip = min(skip, len(values))
    plain = np.asarray(window_sums_list(values, span, skip), np.float64)
    assert np.array_equal(plain, window_sums_array(x, span, skip), equal_nan=True)


def test_a_step_logged_again_across_reads_keeps_its_last_write(tmp_path):
    """kohya logs every micro-batch of a gradient accumulation at the same global step: the
    last write of a step wins, whether or not a read fell between the writes."""
    rng = np.random.default_rng(1)
    points = {tag: [(step, float(rng.lognormal(-2, 1))) for step in range(1, 121) for _ in range(3)]
              for tag in ("loss/current", "lr/unet", "lr/d*lr/unet")}
    write_scalars(tmp_path / "source", points)
    analyser, run = Analyser(), None
    for _ in grown_in_parts(tmp_path / "source", tmp_path / "copy", seed=2, parts=200):
        run = run or Run(tmp_path / "copy")
        run.refresh()
        same_series(run, tmp_path / "copy", tmp_path / "copy")
        reading = read_layout(run)
        same_analysis(analyser.update(run, reading), analyze(run, reading=reading))
    # reads fell between a step's writes (the series handed out changed: ``replaced``), at most
    # once for each of the 240 repeated writes
    assert run is not None and 0 < run.series("loss/current").replaced <= 240  # type: ignore[union-attr]


@pytest.mark.parametrize("how", ["hparams.yml", "add_hparams"])
def test_a_config_that_arrives_after_the_points_is_used_at_the_next_update(tmp_path, how):
    """accelerate logs the config (kohya's) whenever it gets to it, as add_hparams' event file in a
    subfolder or as hparams.yml: the schedule it names (restarts known ahead) must replace the
    one guessed from the lr, as a full analysis has it."""
    steps = range(1, 251)
    lr = [(s, 0.5 * (1 + np.cos(np.pi * ((s - 1) % 100) / 100))) for s in steps]
    points = {"lr/unet": lr, "lr/d*lr/unet": [(s, 1e-4 * v * (1 + s / 100)) for s, v in lr],
              "loss/current": [(s, 0.1) for s in steps]}
    write_scalars(tmp_path / "run", points)
    run = Run(tmp_path / "run")
    run.refresh()
    analyser = Analyser()
    before = analyser.update(run, read_layout(run))
    assert before.schedule is None
    config = {"lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 4, "max_train_steps": 400,
              "lr_warmup_steps": 0}
    if how == "hparams.yml":
        (tmp_path / "run" / "hparams.yml").write_text("".join(f"{k}: {v}\n" for k, v in config.items()))
    else:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(tmp_path / "run")) as writer:
            writer.add_hparams(config, {})
    run.refresh()
    reading = read_layout(run)
    got = analyser.update(run, reading)
    assert got.schedule is not None and got.groups[0].next_restart == 300
    same_analysis(got, analyze(run, reading=reading))
