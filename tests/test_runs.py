"""Finding runs, their configuration, and resolving steps that go back after a resume."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES, LABELS, fixture_run, write_scalars

from lrwatch.monitor import Monitor
from lrwatch.runs import GrowingArray, Run, discover, resolve_relogged
from lrwatch.schedule_config import known_schedule
from lrwatch.tags import TagMap


def test_a_logdir_with_many_runs_gives_one_run_per_event_folder():
    runs = discover(FIXTURES)
    assert len(runs) == len(LABELS)
    assert all(p.name == "network_train" for p in runs)


def test_the_hparams_subfolder_belongs_to_its_run_not_a_run_of_its_own():
    run_dir = fixture_run("prodigy_cosine_healthy")
    assert discover(run_dir) == [run_dir]
    run = Run(run_dir)
    run.refresh()
    assert len(run.files) == 2  # the scalars and add_hparams' timestamp subfolder
    assert run.config["lr_scheduler"] == "cosine_with_restarts"
    assert run.config["lr_scheduler_num_cycles"] == 5


def test_logged_config_makes_restarts_known_before_they_happen():
    run = Run(fixture_run("prodigy_cosine_healthy"))
    run.refresh()
    schedule = known_schedule(run.config)
    assert list(schedule.restarts) == LABELS["prodigy_cosine_healthy"]["restart_steps"]
    assert schedule.next_restart(250) == 400 and schedule.next_restart(900) is None


def test_hparams_yml_alone_is_read_too(tmp_path):
    write_scalars(tmp_path, {"lr/unet": [(1, 1.0)]})
    (tmp_path / "hparams.yml").write_text('lr_scheduler: "cosine_with_restarts"\nlr_scheduler_num_cycles: 4\n'
                                          "max_train_steps: 400\nlr_warmup_steps: 0\n")
    run = Run(tmp_path)
    run.refresh()
    assert known_schedule(run.config).restarts == (100, 200, 300)


def test_a_single_event_file_is_a_run():
    path = sorted(fixture_run("dadapt_sgd_blowup").glob("events.*"))[0]
    monitor = Monitor([path])
    monitor.poll()
    (state,) = monitor.runs
    run = state.run
    assert run.series("lr/unet").steps[-1] == 600


def test_a_read_that_brings_a_nonfinite_value_marks_the_run_whatever_its_size(tmp_path):
    """The watcher analyses such a run at once (Monitor._throttled): a watched step's few points
    and a long read take different paths, and both must say so."""
    for n in (3, 100):  # one by one, and per tag with numpy
        for bad in (float("nan"), float("inf"), None):
            folder = tmp_path / f"{n}-{bad}"
            values = [0.1] * n
            if bad is not None:
                values[n // 2] = bad
            write_scalars(folder, {"loss/current": list(enumerate(values, 1))})
            run = Run(folder)
            assert run.refresh() == n
            assert run.new_nonfinite is (bad is not None), (n, bad)
            run.refresh()  # nothing new: nothing non-finite read
            assert run.new_nonfinite is False


def _scalar_record(step: int, tag: str, value: float) -> bytes:
    """One record as torch's add_scalar frames it."""
    import io

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    buf = io.BytesIO()
    RecordWriter(buf).write(Event(wall_time=1.0, step=step, summary=Summary(
        value=[Summary.Value(tag=tag, simple_value=value)])).SerializeToString())
    return buf.getvalue()


def test_a_refresh_told_which_files_were_written_reads_only_those_and_keeps_the_others_unfinished_records(tmp_path):
    """The watcher names the files that file events named; a run's other files (a resumed
    run's earlier ones, kohya's config file) are left alone until the folder is listed again."""
    first = write_scalars(tmp_path, {"loss/current": [(s, 0.1) for s in range(1, 11)]})
    second = write_scalars(tmp_path, {"lr/unet": [(s, 1.0) for s in range(1, 11)]})  # a second writer's file
    assert first != second
    run = Run(tmp_path)
    assert run.refresh() == 20
    half = _scalar_record(11, "lr/unet", 1.0)
    with open(second, "ab") as fh:
        fh.write(half[:10])  # a record the trainer is still writing
    with open(first, "ab") as fh:
        fh.write(_scalar_record(11, "loss/current", 0.2))
    assert run.refresh(relist=False) == 1 and run.pending_bytes == 10
    with open(second, "ab") as fh:
        fh.write(half[10:])
    with open(first, "ab") as fh:
        fh.write(_scalar_record(12, "loss/current", 0.3))
    assert run.refresh(relist=False, only={first}) == 1  # step 12 of the loss, not the lr's step 11
    assert run.pending_bytes == 10  # the other file's unfinished record is still there, and still counted
    assert run.series("lr/unet").steps[-1] == 10
    assert run.refresh(relist=False) == 1 and run.pending_bytes == 0
    assert run.series("lr/unet").steps[-1] == 11 and run.series("loss/current").steps[-1] == 12


def test_after_a_resume_the_newer_file_wins_for_overlapping_steps():
    label = LABELS["prodigy_resumed"]
    run = Run(fixture_run("prodigy_resumed"))
    run.refresh()
    assert len(run.files) == 2
    loss = run.series("loss/current")
    assert loss.steps.tolist() == list(range(1, 1001))  # every step once
    # the overlapping steps carry the second (newer) file's values
    second = sorted(run.files)[-1]
    newer = run.files[second]
    assert newer.records_read > 0
    from lrwatch.loader import EventFile

    fresh = EventFile(second).read_new().scalars
    tag = fresh.tags.index("loss/current")
    sel = fresh.tag_ids == tag
    overlap = (fresh.steps[sel] >= label["resume_from"]) & (fresh.steps[sel] <= label["resumed_at"])
    mine = np.isin(loss.steps, fresh.steps[sel][overlap])
    assert np.array_equal(loss.values[mine], fresh.values[sel][overlap])
    assert run.superseded_points > 0


def test_resolve_relogged_keeps_the_later_write_of_every_step():
    steps = np.array([1, 2, 3, 4, 5, 3, 4, 5, 6, 2, 7])
    keep = resolve_relogged(steps)
    # the second resume (back to step 2) supersedes every earlier write of steps 2..6
    assert steps[keep].tolist() == [1, 2, 7]
    assert np.flatnonzero(keep).tolist() == [0, 9, 10]


def test_hparams_yml_is_read_as_yaml_with_types_nesting_and_non_finite_values(tmp_path):
    write_scalars(tmp_path, {"lr/unet": [(1, 1.0)]})
    (tmp_path / "hparams.yml").write_text('a: 1\nb: 0.5\nc: "x y"\nd: null\ne: true\nf: plain\n'
                                          'g: .nan\nh:\n  nested: 2\nlr_scheduler_args:\n- first_cycle=100\n')
    run = Run(tmp_path)
    run.refresh()
    c = run.config
    assert (c["a"], c["b"], c["c"], c["d"], c["e"], c["f"], c["h"]) == (1, 0.5, "x y", None, True, "plain", {"nested": 2})
    assert c["g"] != c["g"] and c["lr_scheduler_args"] == ["first_cycle=100"]


def test_a_broken_hparams_yml_is_a_note_not_a_crash(tmp_path):
    write_scalars(tmp_path, {"lr/unet": [(1, 1.0)]})
    (tmp_path / "hparams.yml").write_text("a: [unclosed\n")
    run = Run(tmp_path)
    run.refresh()
    assert run.config == {} and run.config_problems and "hparams.yml" in run.config_problems[0]


def test_kohya_tags_pair_into_groups():
    tm = TagMap()
    groups = tm.groups({"lr/textencoder", "lr/unet", "lr/d*lr/textencoder", "lr/d*lr/unet", "loss/current"})
    assert [(g.name, g.lr_tag, g.dlr_tag) for g in groups] == [
        ("textencoder", "lr/textencoder", "lr/d*lr/textencoder"), ("unet", "lr/unet", "lr/d*lr/unet")]


def test_a_lone_d_lr_pairs_with_group_zeros_lr():
    groups = TagMap().groups({"lr/textencoder", "lr/unet", "lr/d*lr"})
    assert groups[0].lr_tag == "lr/textencoder" and groups[0].dlr_tag == "lr/d*lr"
    assert TagMap().groups({"lr/unet", "lr/d*lr"})[0].lr_tag == "lr/unet"
    assert TagMap().groups({"lr", "lr/d*lr"})[0].lr_tag == "lr"


def test_custom_group_names_and_prodigy_plus_eff_lr_do_not_confuse_pairing():
    groups = TagMap().groups({"lr/group0", "lr/group1", "lr/d*lr/group0", "lr/d*lr/group1", "lr/d*eff_lr/group0"})
    assert [(g.lr_tag, g.dlr_tag) for g in groups] == [("lr/group0", "lr/d*lr/group0"), ("lr/group1", "lr/d*lr/group1")]


def test_a_fork_that_logs_d_lr_under_lr_is_mapped_with_patterns():
    tm = TagMap(lr=("lr/base/{group}",), dlr=("lr/{group}",))
    (g,) = tm.groups({"lr/unet", "lr/base/unet"})
    assert (g.name, g.lr_tag, g.dlr_tag) == ("unet", "lr/base/unet", "lr/unet")


def test_a_growing_arrays_views_are_unwritable_and_keep_what_they_showed_through_growth_and_clear():
    grown = GrowingArray()
    grown.extend([1.0, 2.0])
    first = grown.view
    with pytest.raises(ValueError):
        first[0] = 9.0  # what was handed out is shared: nobody may change it
    for k in range(3, 40):  # several reallocations
        grown.extend([float(k)])
        assert not grown.view.flags.writeable and grown.view.tolist() == [1.0, 2.0, *map(float, range(3, k + 1))]
    grown.clear()
    grown.extend([7.0])
    assert first.tolist() == [1.0, 2.0] and grown.view.tolist() == [7.0]
    with pytest.raises(ValueError):
        grown.view[0] = 0.0
    grown.data[0] = 8.0  # the owner still writes its own buffer
    assert grown.view.tolist() == [8.0]


def test_a_logged_schedule_of_fifty_thousand_cycles_costs_one_pass():
    """A config asking for tens of thousands of cycles (first_cycle=2 over 100,000 steps) was
    walked from the start for every cycle: minutes of CPU before anything was guarded."""
    import time

    from lrwatch.schedules import cycle_position

    started = time.process_time()
    schedule = known_schedule({"lr_scheduler_type": "lrwatch.schedulers.RexWithRestarts",
                               "lr_scheduler_args": "first_cycle=2 warmup=10", "max_train_steps": 100_010})
    cosine = known_schedule({"lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 50_000,
                             "max_train_steps": 100_000, "lr_warmup_steps": 0})
    assert time.process_time() - started < 2.0
    assert list(schedule.restarts) == list(range(12, 100_011, 2))
    assert len(cosine.restarts) == 49_999 and cosine.restarts[-1] == 99_998
    assert schedule.next_restart(99_999) == 100_000 and schedule.next_restart(100_010) is None
    assert cycle_position(100_001, 2, warmup=10).cycle == 49_995
