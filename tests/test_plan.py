"""`lrwatch plan`: the seed question, and where warmup breaks it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from lrwatch.plan import make_plan


def test_ten_thousand_steps_saving_every_500_is_20_cycles_with_every_save_on_a_minimum():
    plan = make_plan(10_000, 500)
    assert plan.cycles == 20 and plan.cycle_length == 500 and plan.ok
    assert plan.restarts == list(range(500, 10_000, 500))
    assert all(s.multiplier < 1e-4 for s in plan.saves)
    assert plan.kohya_args == ("--lr_scheduler cosine_with_restarts --lr_scheduler_num_cycles 20 "
                               "--max_train_steps 10000 --save_every_n_steps 500")


def test_warmup_shifts_the_minima_away_from_the_saves_and_a_fix_is_offered():
    plan = make_plan(10_000, 500, warmup=100)
    assert not plan.ok
    assert plan.restarts[:2] == [595, 1090]
    missed = [s.step for s in plan.saves if not s.at_minimum]
    assert missed[0] == 500 and len(missed) >= 3
    assert any("warmup" in p for p in plan.problems)
    assert any("--lr_warmup_steps 0" in f for f in plan.fixes)
    assert any("--lr_warmup_steps 500 with 19 cycles" in f for f in plan.fixes)


def test_the_offered_warmup_fix_really_aligns_the_saves():
    plan = make_plan(10_000, 500, warmup=500, cycles=19)
    assert plan.ok and plan.restarts[0] == 1000
    assert plan.notes and "500" in plan.notes[0]  # the save that ends the warmup is at the peak


def test_the_fixture_with_warmup_is_the_case_plan_warns_about():
    # fixtures/runs/prodigy_warmup: 1100 steps, 5 cycles, 100 warmup, saving every 220 = T/C
    plan = make_plan(1100, 220, warmup=100, cycles=5)
    assert [s.step for s in plan.saves if not s.at_minimum] == [220, 440, 660]


def test_rex_plan_gives_the_custom_scheduler_arguments():
    plan = make_plan(10_000, 500, schedule="rex")
    assert plan.ok
    assert "--lr_scheduler_type lrwatch.schedulers.RexWithRestarts" in plan.kohya_args
    assert "--lr_scheduler_args first_cycle=500 warmup=0 d_guard=True" in plan.kohya_args


def test_a_run_that_is_not_whole_cycles_is_told_how_long_to_make_it():
    plan = make_plan(10_100, 500)
    assert not plan.ok and any("--max_train_steps 10000" in f for f in plan.fixes)


def test_impossible_plans_are_refused():
    with pytest.raises(ValueError):
        make_plan(100, 10, warmup=100)
    with pytest.raises(ValueError):
        make_plan(100, 10, schedule="linear")


def test_the_cli_prints_the_plan_and_exits_1_when_saves_miss():
    ok = subprocess.run([sys.executable, "-m", "lrwatch", "plan", "--max-steps", "10000", "--save-every", "500"],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "cycles: 20 of 500 steps" in ok.stdout
    assert "--lr_scheduler_num_cycles 20" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lrwatch", "plan", "--max-steps", "10000", "--save-every", "500",
                          "--warmup", "100", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and json.loads(bad.stdout)["ok"] is False
