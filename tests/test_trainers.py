"""Every trainer's logs, read with no flags: fixtures/trainers.py writes the same real optimizer
runs in each trainer's layout (its tags, steps, folders and config files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

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
    assert first.values["what"] == "loss_diverged" and first.step == LABELS["blowup"]["first_diverged_loss_step"]
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
