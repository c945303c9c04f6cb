"""Every trainer's logs, read with no flags: fixtures/trainers.py writes the same real optimizer
runs in each trainer's layout (its tags, steps, folders and config files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import write_scalars
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lrwatch
from lrwatch.analysis import CRITICAL, WARNING
from lrwatch.cli import main
from lrwatch.trainers import LAYOUTS, ScheduleOptions

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "trainers"
LABELS = json.loads((FIXTURES / "labels.json").read_text())
# The logged step s of these trainers is optimizer step s + 1 (they count from 0).
STEP_OFFSET = {"kohya": 0, "kohya-base-lr": 0, "onetrainer": 1, "ai-toolkit": 1, "simpletuner": 0, "diffusers": 0}
SEES_D = ["kohya", "kohya-base-lr", "onetrainer", "ai-toolkit", "simpletuner"]


def audit_one(path: Path, **kwargs) -> lrwatch.Analysis:
    """The fixtures are the toy runs rewritten: they fry by d running away x11, a critical at the
    toy's 10x (the realistic tasks chose 100x: bench/transfer.py)."""
    kwargs.setdefault("thresholds", lrwatch.Thresholds(runaway_critical=10))
    result = lrwatch.audit([path], **kwargs)
    (state,) = result.runs
    assert state.error is None
    return state.analysis


@pytest.mark.parametrize("trainer", sorted(STEP_OFFSET))
def test_each_trainers_healthy_run_is_detected_and_clean(trainer):
    analysis = audit_one(FIXTURES / trainer / "healthy")
    assert analysis.trainer == trainer
    assert analysis.findings == []
    assert analysis.loss_tag is not None
    if trainer in SEES_D:
        (group,) = analysis.groups
        assert group.adaptive and group.lr is not None
        assert group.d_now == pytest.approx(0.0187, rel=0.01)  # the same Prodigy run, whichever trainer logged it
        assert len(group.restarts) == 4


@pytest.mark.parametrize("trainer", ["kohya", "kohya-base-lr", "onetrainer", "ai-toolkit"])
def test_a_d_blowup_is_caught_from_d_before_the_loss_goes_bad(trainer):
    analysis = audit_one(FIXTURES / trainer / "blowup")
    first = next(f for f in analysis.findings if f.severity == CRITICAL)
    assert first.kind in ("runaway_d", "predicted_restart_blowup"), first
    assert first.step + STEP_OFFSET[trainer] < LABELS["blowup"]["first_diverged_loss_step"]


@pytest.mark.parametrize("trainer", ["kohya", "kohya-base-lr", "onetrainer", "ai-toolkit", "simpletuner"])
def test_the_seeds_bump_is_warned_before_the_first_restart(trainer):
    analysis = audit_one(FIXTURES / trainer / "bump")
    first_restart = LABELS["bump"]["restart_steps"][0]
    predicted = [f for f in analysis.findings if f.kind == "predicted_restart_blowup"]
    assert predicted and predicted[0].severity == WARNING
    assert predicted[0].step + STEP_OFFSET[trainer] < first_restart
    assert analysis.worst == WARNING  # the toy loss survives it: no stop


def test_diffusers_logs_are_checked_by_the_loss_and_say_d_is_not_logged():
    analysis = audit_one(FIXTURES / "diffusers" / "blowup")
    assert any("d is not logged by this trainer" in n for n in analysis.notes)
    first = next(f for f in analysis.findings if f.severity == CRITICAL)
    assert 0 <= first.step - LABELS["blowup"]["first_diverged_loss_step"] <= 3  # its level, a step or so after
    assert "loss_above_best" in {f.values["what"] for f in analysis.findings if f.step == first.step}
    assert not any(g.adaptive for g in analysis.groups)


def test_simpletuner_learning_rate_is_d_with_prodigy_not_the_lr():
    analysis = audit_one(FIXTURES / "simpletuner" / "healthy")
    (group,) = analysis.groups
    assert (group.lr_tag, group.dlr_tag, group.d_tag) == (None, "prodigy_effective_lr", "prodigy_d")
    assert group.lr is not None and float(group.lr.max()) == pytest.approx(1.0, rel=1e-5)  # lr = d*lr / d


def test_kohya_duplicate_groups_fold_and_accumulation_repeats_are_not_a_resume():
    result = lrwatch.audit([FIXTURES / "kohya" / "blowup"])
    (state,) = result.runs
    assert [g.name for g in state.analysis.groups] == ["unet"]
    kinds = [f.key() for f in state.analysis.findings]
    assert len(kinds) == len(set(kinds))  # every finding once, not once per duplicate tag
    assert state.run.superseded_points == 0  # two identical micro-batch logs per step
    assert state.analysis.loss_tag == "loss/current"  # loss/epoch_average (step = epoch) is never the loss
    assert "re-logged" not in result.render()


def test_onetrainer_schedule_comes_from_its_config_or_the_schedule_options():
    with_config = audit_one(FIXTURES / "onetrainer" / "bump")
    assert with_config.schedule.restarts == (199, 399, 599, 799)  # optimizer step 200 = batch 199
    without = audit_one(FIXTURES / "onetrainer-no-config" / "bump")
    assert any("--schedule cosine_with_restarts" in n for n in without.notes)
    assert not any(f.kind == "predicted_restart_blowup" for f in without.findings)
    given = audit_one(FIXTURES / "onetrainer-no-config" / "bump",
                      schedule=ScheduleOptions("cosine_with_restarts", cycles=5, max_steps=1000))
    assert [(f.kind, f.step) for f in given.findings] == [(f.kind, f.step) for f in with_config.findings]


def test_ai_toolkit_is_known_by_its_folder_name_and_else_by_trainer(tmp_path):
    run = tmp_path / "lora"
    shutil.copytree(FIXTURES / "ai-toolkit" / "blowup" / "logs" / "lora_blowup_20261124-083000", run)
    assert audit_one(run).trainer == "diffusers"  # `lr` + `loss` in a folder named otherwise
    analysis = audit_one(run, trainer="ai-toolkit",
                         schedule=ScheduleOptions("cosine_with_restarts", cycles=6, max_steps=600))
    assert analysis.trainer == "ai-toolkit"
    first = next(f for f in analysis.findings if f.severity == CRITICAL)
    assert first.kind == "runaway_d" and first.step + 1 < LABELS["blowup"]["first_diverged_loss_step"]


def test_tag_options_win_over_the_detected_trainer():
    analysis = audit_one(FIXTURES / "onetrainer" / "healthy",
                         tag_map=lrwatch.TagMap(lr=("lr/{group}",), dlr=(), loss=("loss/train_step",)))
    assert analysis.trainer == "custom"
    assert not any(g.adaptive for g in analysis.groups)


@pytest.mark.parametrize("trainer", sorted(STEP_OFFSET))
def test_tags_command_names_the_trainer_and_what_each_tag_is(trainer, capsys):
    assert main(["tags", str(FIXTURES / trainer / "healthy"), "--json"]) == 0
    (doc,) = json.loads(capsys.readouterr().out)
    assert doc["trainer"] == trainer
    roles = {row["tag"]: row["taken_as"] for row in doc["tags"]}
    assert "loss" in roles.values()
    assert all(row["points"] > 0 for row in doc["tags"])
    if trainer == "kohya":
        assert roles["lr/group0"].endswith("folded") and roles["loss/epoch_average"].startswith("epoch loss")
    if trainer == "simpletuner":
        assert roles["learning_rate"].startswith("d (")


def test_the_report_and_json_name_the_trainer(capsys):
    assert main(["audit", str(FIXTURES / "onetrainer" / "healthy"), "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert run["trainer"] == "onetrainer" and "loss/train_step" in run["trainer_detected_from"]
    assert run["schedule"]["source"].startswith("lora-healthy")
    assert main(["audit", str(FIXTURES / "ai-toolkit" / "healthy")]) == 0
    assert "trainer: ai-toolkit" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--cycles", "5"], ["--schedule", "rex", "--cycles", "5"],
                                  ["--schedule", "rex", "--cycles", "50", "--max-steps", "10"]])
def test_schedule_options_go_together(args, capsys):
    assert main(["audit", str(FIXTURES / "onetrainer" / "healthy"), *args]) == 2
    assert "--" in capsys.readouterr().err


def test_every_layout_has_a_fixture():
    assert set(LAYOUTS) == set(STEP_OFFSET)


def verdicts(run: Path, snapshots: Path) -> dict[str, tuple[str, float | None]]:
    result = lrwatch.audit([run], snapshots=[snapshots], manifest=False)
    (snaps,) = result.monitor.snapshots.by_run.values()
    return {Path(s.path).name: (s.verdict, s.lr_multiplier) for s in snaps}


def test_onetrainer_saves_are_judged_by_the_lr_of_their_last_update():
    # save-<G> holds G updates; the G-th was logged at batch G-1 with the *next* lr (a restart at 200)
    got = verdicts(FIXTURES / "onetrainer" / "bump", FIXTURES / "onetrainer" / "bump" / "workspace" / "save")
    assert len(got) == 9
    for name, (verdict, lr) in got.items():
        step = int(name.split("-save-")[1].split("-")[0])
        assert verdict == ("safe" if step % 200 == 0 else "high_lr"), (name, verdict, lr)


def test_ai_toolkit_saves_at_the_cycle_length_are_one_update_past_the_restart():
    # BaseSDTrainProcess trains step_num, then saves it: with save_every = T_0 the saved weights
    # already hold the first update of the next cycle, at the peak lr (found from the schedule:
    # the logs hold only every 10th step)
    run = FIXTURES / "ai-toolkit" / "bump"
    got = verdicts(run, run / "output" / "lora_bump")
    assert set(got) == {f"lora_bump_{s:09d}.safetensors" for s in (200, 400, 600, 800)}
    assert all(v == ("high_lr", 1.0) for v in got.values()), got


def test_checkpoint_folders_are_judged_by_their_step():
    got = verdicts(FIXTURES / "simpletuner" / "bump", FIXTURES / "simpletuner" / "bump" / "output")
    assert set(got) == {f"checkpoint-{s}" for s in (200, 400, 600, 800, 1000)}
    assert all(v[0] == "safe" for v in got.values()), got


def rewrite_kohya(folder: Path, tags: dict[str, str]) -> Path:
    """The healthy kohya run's real series under other kohya versions' tag names
    (``tags``: new tag -> the fixture's tag it copies)."""
    from torch.utils.tensorboard import SummaryWriter

    source = lrwatch.Run(FIXTURES / "kohya" / "healthy" / "logs" / "healthy20261124083000" / "network_train")
    source.refresh()
    series = {new: source.series(old) for new, old in tags.items()}
    writer = SummaryWriter(str(folder))
    for i in range(len(series["loss" if "loss" in series else "loss/current"].steps)):
        for tag, s in series.items():
            writer.add_scalar(tag, float(s.values[i]), int(s.steps[i]))
    writer.close()
    return folder


@pytest.mark.parametrize("tags, groups", [
    # LoRA+ and flux descriptions (spaces, a trailing space), and flux's extra raw lr/textencoder
    ({"loss/current": "loss/current", "lr/unet plus": "lr/unet", "lr/d*lr/unet plus": "lr/d*lr/unet",
      "lr/textencoder 1 ": "lr/unet", "lr/d*lr/textencoder 1 ": "lr/d*lr/unet", "lr/textencoder": "lr/unet"},
     {"unet plus": True, "textencoder 1 ": True, "textencoder": False}),
    # older kohya: a lone lr/d*lr, group 0's (the text encoder's)
    ({"loss/current": "loss/current", "lr/textencoder": "lr/unet", "lr/unet": "lr/unet", "lr/d*lr": "lr/d*lr/unet"},
     {"textencoder": True, "unet": False}),
    # fine_tune.py (tracker folder finetuning/): loss, lr/unet, lr/text_encoder1 and their d*lr
    ({"loss": "loss/current", "lr/unet": "lr/unet", "lr/d*lr/unet": "lr/d*lr/unet",
      "lr/text_encoder1": "lr/unet", "lr/d*lr/text_encoder1": "lr/d*lr/unet"},
     {"unet": True, "text_encoder1": True}),
    # a block-wise lr per U-Net block
    ({"loss/current": "loss/current", "lr/unet_block3": "lr/unet", "lr/d*lr/unet_block3": "lr/d*lr/unet"},
     {"unet_block3": True}),
], ids=["descs-with-spaces", "lone-dlr", "fine_tune", "unet-block"])
def test_kohya_versions_and_descriptions_read_with_no_flags(tmp_path, tags, groups):
    analysis = audit_one(rewrite_kohya(tmp_path / "finetuning", tags))
    assert analysis.trainer == "kohya"
    assert {g.name: g.adaptive for g in analysis.groups} == groups
    assert analysis.findings == [] and analysis.loss_tag in tags
    assert all(g.d_now == pytest.approx(0.0187, rel=0.01) for g in analysis.groups if g.adaptive)


RESUMED = FIXTURES / "kohya-resumed" / "blowup" / "logs"


def test_a_resumed_run_is_joined_to_the_run_it_continues():
    result = lrwatch.audit([RESUMED], thresholds=lrwatch.Thresholds(runaway_critical=10))
    earlier, resumed = result.runs
    assert earlier.analysis.worst == WARNING and earlier.analysis.last_step == 330  # died before the trouble
    assert any("joined to run blowup20261124083000" in n for n in resumed.analysis.notes)
    assert resumed.analysis.last_step == 600  # global steps (the resumed part logged 1..300)
    first = next(f for f in resumed.analysis.findings if f.severity == CRITICAL)
    # d's run-away is measured against the history before the resume: caught before the loss goes bad
    assert first.kind == "runaway_d" and first.step < LABELS["blowup"]["first_diverged_loss_step"]
    assert all(f.step > 300 for f in resumed.analysis.findings)  # earlier findings are the earlier run's


def test_a_resumed_run_alone_is_shifted_to_global_steps_and_says_what_it_lacks():
    analysis = audit_one(RESUMED / "blowup20261124093000")
    assert any("not among the runs read" in n and "shifted by 300" in n for n in analysis.notes)
    assert analysis.last_step == 600
    first = next(f for f in analysis.findings if f.severity == CRITICAL)
    assert first.kind == "blowup"  # without the history only the loss shows it, at the same global step
    assert 0 <= first.step - LABELS["blowup"]["first_diverged_loss_step"] <= 3


def test_without_the_logged_config_a_resume_is_not_guessed_but_said(tmp_path):
    shutil.copytree(RESUMED, tmp_path / "logs")
    for yml in (tmp_path / "logs").rglob("hparams.yml"):
        yml.unlink()
    earlier, later = lrwatch.audit([tmp_path / "logs"]).runs
    assert later.analysis.last_step == 300  # local steps, not shifted
    assert any("if it resumed that run, its steps are local" in n for n in later.analysis.notes)
    assert not any("resumed" in n for n in earlier.analysis.notes)


def test_an_earlier_runs_output_name_logged_late_still_names_a_later_run_as_a_possible_resume(tmp_path):
    """The earlier run's config (its output_name) arrives after the runs were first compared; a
    run found next makes the comparison again (the index of names is built anew whenever the
    runs change), and it must see the name the config gave."""
    from lrwatch.monitor import Monitor

    logs = tmp_path / "logs"
    points = {"lr/unet": [(s, 1.0) for s in range(1, 30)], "lr/d*lr/unet": [(s, 1e-4) for s in range(1, 30)]}
    resumed = {**points, "lr/d*lr/unet": [(s, 1e-2) for s in range(1, 30)]}  # d from the start 100x the first's
    write_scalars(logs / "first20260101000000" / "network_train", points)
    write_scalars(logs / "lora20260102000000" / "network_train", resumed)
    monitor = Monitor([logs])
    monitor.poll()
    later = monitor.states[logs / "lora20260102000000" / "network_train"]
    assert not any("named like" in n for n in later.analysis.notes)
    (logs / "first20260101000000" / "network_train" / "hparams.yml").write_text("output_name: lora\n")
    monitor.poll()
    write_scalars(logs / "other20260103000000" / "network_train", points)  # a new run: notes are made again
    write_scalars(logs / "lora20260102000000" / "network_train", {"lr/unet": [(30, 1.0)]})  # on the next change
    monitor.poll()
    assert any("named like the earlier run first20260101000000" in n for n in later.analysis.notes)


def test_a_run_found_before_its_first_points_is_still_named_as_a_possible_resume_once_they_come(tmp_path):
    """The watcher finds a run as soon as its event file appears, often before any point: the
    note, which needs the run's first step, is made again when its points arrive (it was kept
    from that first, empty look until another run appeared)."""
    from lrwatch.monitor import Monitor

    logs = tmp_path / "logs"
    points = {"lr/unet": [(s, 1.0) for s in range(1, 30)], "lr/d*lr/unet": [(s, 1e-4) for s in range(1, 30)]}
    resumed = {**points, "lr/d*lr/unet": [(s, 1e-2) for s in range(1, 30)]}  # d from the start 100x the first's
    write_scalars(logs / "lora20260101000000" / "network_train", points)
    write_scalars(logs / "lora20260102000000" / "network_train", {})  # the writer's first record only
    monitor = Monitor([logs])
    monitor.poll()
    later = monitor.states[logs / "lora20260102000000" / "network_train"]
    assert not any("named like" in n for n in later.analysis.notes)
    write_scalars(logs / "lora20260102000000" / "network_train", resumed)
    monitor.poll()
    assert any("named like the earlier run lora20260101000000" in n and "100x where that run's began" in n
               for n in later.analysis.notes)


def test_a_second_training_named_like_the_first_is_no_resume_when_its_d_starts_again(tmp_path):
    """The quick start run twice in one folder: two trainings of one name, each starting at d0.
    Nothing in the config or the steps says the second resumed the first, so no note says so."""
    logs = tmp_path / "logs"
    points = {"lr/unet": [(s, 1.0) for s in range(1, 30)], "lr/d*lr/unet": [(s, 1e-6 * s) for s in range(1, 30)]}
    write_scalars(logs / "lora20260101000000" / "network_train", points)
    write_scalars(logs / "lora20260102000000" / "network_train", points)
    earlier, later = lrwatch.audit([logs]).runs
    assert not any("named like" in n or "resumed" in n for n in later.analysis.notes + earlier.analysis.notes)


def test_onetrainer_counts_batches_and_windows_still_count_optimizer_steps():
    # gradient accumulation 2: the same run logged at every second batch; findings at the same
    # optimizer steps (batch 2k-1 is update k), restarts where the config puts them
    single = audit_one(FIXTURES / "onetrainer" / "bump")
    accumulated = audit_one(FIXTURES / "onetrainer-accumulation" / "bump")
    assert accumulated.schedule.restarts == (399, 799, 1199, 1599)
    assert [(f.kind, f.severity, (f.step + 1) // 2) for f in accumulated.findings] == \
        [(f.kind, f.severity, f.step + 1) for f in single.findings]


_ANY = st.one_of(st.none(), st.booleans(), st.text(max_size=12), st.lists(st.integers(), max_size=2),
                 st.integers(min_value=-10**12, max_value=10**12),
                 st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["PRODIGY", "COSINE_WITH_HARD_RESTARTS"]))


def _odd_config(keys: list[str]):
    return st.one_of(st.dictionaries(st.sampled_from(keys), _ANY, max_size=len(keys)),
                     st.builds(lambda v: v, _ANY))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=_odd_config(["optimizer", "learning_rate_scheduler", "learning_rate", "learning_rate_warmup_steps",
                           "learning_rate_cycles", "learning_rate_min_factor", "epochs", "gradient_accumulation_steps"]))
def test_an_odd_onetrainer_config_is_a_note_never_a_crash(tmp_path, config):
    run = tmp_path / "run"
    if not run.exists():
        shutil.copytree(FIXTURES / "onetrainer" / "bump", run)
    (path,) = (run / "workspace" / "config").glob("*.json")
    path.write_text(json.dumps(config))
    result = lrwatch.audit([run])
    assert result.runs[0].error is None and result.exit_code in (0, 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(train=_odd_config(["steps", "lr", "optimizer", "lr_scheduler", "lr_scheduler_params"]),
       params=_odd_config(["T_0", "T_mult", "eta_min"]))
def test_an_odd_ai_toolkit_config_is_a_note_never_a_crash(tmp_path, train, params):
    run = tmp_path / "run"
    if not run.exists():
        shutil.copytree(FIXTURES / "ai-toolkit" / "blowup", run)
    if isinstance(train, dict) and "lr_scheduler_params" in train:
        train["lr_scheduler_params"] = params
    doc = {"config": {"name": "lora_blowup", "process": [{"train": train}]}}
    (run / "output" / "lora_blowup" / "config.yaml").write_text(yaml.safe_dump(doc))
    result = lrwatch.audit([run])
    assert result.runs[0].error is None and result.exit_code in (0, 1)
