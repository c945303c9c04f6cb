"""The torch schedules, the d guard on real optimizer runs, and kohya's way of building them."""

from __future__ import annotations

import ast
import importlib
import math

import pytest
import torch
from conftest import LABELS

from lrwatch.schedulers import CosineWithRestarts, DGuard, RexWithRestarts


def _opt(*lrs: float):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])


def _lrs(sched, steps: int, group: int = 0) -> list[float]:
    out = [sched.get_last_lr()[group]]
    for _ in range(steps - 1):
        sched.optimizer.step()
        sched.step()
        out.append(sched.get_last_lr()[group])
    return out


# transformers' get_cosine_with_hard_restarts_schedule_with_warmup(num_warmup_steps=10,
# num_training_steps=110, num_cycles=4), evaluated at these steps (written out, not imported):
TRANSFORMERS_HARD_RESTARTS = {0: 0.0, 1: 0.1, 5: 0.5, 9: 0.9, 10: 1.0, 11: 0.996057350657, 22: 0.531395259765,
                              34: 0.003942649343, 35: 1.0, 36: 0.996057350657, 47: 0.531395259765,
                              59: 0.003942649343, 60: 1.0, 72: 0.531395259765, 84: 0.003942649343, 85: 1.0,
                              97: 0.531395259765, 109: 0.003942649343}


def test_cosine_with_restarts_equals_transformers_hard_restarts():
    lrs = _lrs(CosineWithRestarts(_opt(1.0), first_cycle=25, warmup=10), 110)
    for step, want in TRANSFORMERS_HARD_RESTARTS.items():
        assert lrs[step] == pytest.approx(want, abs=1e-9), step


def test_rex_with_restarts_follows_its_formula_every_step():
    b = 0.5
    lrs = _lrs(RexWithRestarts(_opt(2.0), first_cycle=40, rex_b=b), 200)
    for step, lr in enumerate(lrs):
        z = 1 - (step % 40) / 40
        assert lr == pytest.approx(2.0 * z / ((1 - b) + b * z), rel=1e-12), step


def test_cycle_mult_gamma_and_min_lr_ratio_shape_the_cycles():
    lrs = _lrs(RexWithRestarts(_opt(1.0), first_cycle=10, cycle_mult=2, gamma=0.5, min_lr_ratio=0.1), 70)
    restarts = [s for s in range(1, 70) if lrs[s] > lrs[s - 1]]
    assert restarts == [10, 30]  # cycles of 10, 20, 40 steps
    assert lrs[10] == pytest.approx(0.5) and lrs[30] == pytest.approx(0.25)  # peaks decay by gamma
    assert min(lrs[:10]) >= 0.1 - 1e-12  # never below min_lr_ratio of the cycle's peak


def test_param_groups_keep_their_own_base_lr():
    sched = CosineWithRestarts(_opt(1.0, 0.25), first_cycle=20)
    a, b = _lrs(sched, 50, 0), [x for x in sched.get_last_lr()]
    sched2 = CosineWithRestarts(_opt(1.0, 0.25), first_cycle=20)
    assert _lrs(sched2, 50, 1) == pytest.approx([x * 0.25 for x in a])
    assert b[1] == pytest.approx(b[0] * 0.25)


def test_kohya_builds_it_from_a_dotted_name_and_literal_evaluated_args():
    # what train_util.get_scheduler_fix does for --lr_scheduler_type / --lr_scheduler_args
    type_name, raw_args = "lrwatch.schedulers.RexWithRestarts", ["first_cycle=100", "warmup=10", "d_guard=True",
                                                                  "rex_b=0.9", "min_lr_ratio=0.0"]
    kwargs = {}
    for arg in raw_args:
        key, value = arg.split("=")
        kwargs[key] = ast.literal_eval(value)
    module, _, cls = type_name.rpartition(".")
    sched = getattr(importlib.import_module(module), cls)(_opt(1.0), **kwargs)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    assert sched.guard is not None and sched.warmup == 10 and sched.first_cycle == 100


def test_bad_arguments_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="first_cycle"):
        RexWithRestarts(_opt(1.0), first_cycle=0)
    with pytest.raises(ValueError, match="cycle_mult"):
        CosineWithRestarts(_opt(1.0), first_cycle=10, cycle_mult=0.5)
    with pytest.raises(ValueError, match="max_dlr"):
        RexWithRestarts(_opt(1.0), first_cycle=10, max_dlr=-1)
    with pytest.raises(ValueError, match="DGuard needs"):
        DGuard(torch.optim.lr_scheduler.LambdaLR(_opt(1.0), lambda s: 1.0))


@pytest.mark.parametrize("cls", [RexWithRestarts, CosineWithRestarts])
def test_state_round_trips_so_a_resumed_run_continues_the_same_schedule(cls):
    whole = _lrs(cls(_opt(1.0), first_cycle=30, warmup=5, cycle_mult=1.5), 160)
    first = cls(_opt(1.0), first_cycle=30, warmup=5, cycle_mult=1.5)
    _lrs(first, 70)
    resumed = cls(_opt(1.0), first_cycle=30, warmup=5, cycle_mult=1.5)
    resumed.load_state_dict(first.state_dict())
    assert _lrs(resumed, 91) == pytest.approx(whole[69:])


# --- the guard, on real optimizer runs from the fixture generator ---------------------------------

def _train(name: str, **changes):
    import dataclasses

    from generate import SPECS, train  # fixtures/generate.py

    spec = dataclasses.replace(next(s for s in SPECS if s.name == name), **changes)
    return spec, train(spec, None, log=False)


def _first_restart(spec) -> int:
    return spec.warmup + (spec.max_steps - spec.warmup) // spec.cycles


@pytest.mark.parametrize("name", ["dadapt_sgd_growth_blowup", "dadapt_sgd_blowup", "prodigy_seed_bump"])
def test_the_guard_keeps_d_lr_at_or_under_the_reference_and_the_loss_finite(name):
    lab = LABELS[name]
    if name != "prodigy_seed_bump":  # these blow up without the guard
        assert lab["first_nonfinite_loss_step"] is not None
    spec, guarded = _train(name, d_guard=True)
    c = guarded["curves"]
    (ref,) = guarded["guard"]["reference"]  # one param group
    dlr = [d * lr for d, lr in zip(c["d"], c["lr"])]
    after = dlr[_first_restart(spec) - 1 :]  # step k is index k-1; from the first restart on
    assert max(after) <= ref * (1 + 1e-9)
    assert all(math.isfinite(x) for x in c["loss"])
    assert guarded["first_nonfinite_loss_step"] is None and guarded["first_diverged_loss_step"] is None
    assert guarded["guard"]["interventions"] > 0


def test_without_the_guard_the_same_restart_lands_far_above_the_reference():
    spec, plain = _train("prodigy_seed_bump")
    c = plain["curves"]
    first = _first_restart(spec)
    before = max(d * lr for d, lr in zip(c["d"][: first - 1], c["lr"][: first - 1]))
    assert c["d"][first - 1] * c["lr"][first - 1] > 5 * before


def test_a_user_cap_holds_from_the_first_step_and_the_lowered_lr_is_what_get_last_lr_says():
    from prodigyopt import Prodigy

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 32))
    opt = Prodigy([w], lr=1.0)
    sched = RexWithRestarts(opt, first_cycle=50, max_dlr=1e-4)
    target = torch.randn(32, 32) * 5
    for _ in range(150):
        loss = ((w - target) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        d = opt.param_groups[0]["d"]
        lr = sched.get_last_lr()[0]
        assert lr == opt.param_groups[0]["lr"]
        assert d * lr <= 1e-4 * (1 + 1e-9)
    assert sched.guard.cap == [1e-4] and sched.guard.interventions > 0
    assert sched.get_last_lr()[0] < sched.multiplier(sched.last_epoch)  # visibly lowered


def test_guard_state_travels_with_the_scheduler_state():
    from prodigyopt import Prodigy

    w = torch.nn.Parameter(torch.randn(4))
    sched = RexWithRestarts(Prodigy([w], lr=1.0), first_cycle=10, d_guard=True)
    sched.guard.reference, sched.guard.interventions = [0.5], 7
    other = RexWithRestarts(Prodigy([torch.nn.Parameter(torch.randn(4))], lr=1.0), first_cycle=10, d_guard=True)
    other.load_state_dict(sched.state_dict())
    assert other.guard.reference == [0.5] and other.guard.interventions == 7


def test_a_frozen_group_with_lr_zero_is_left_alone_and_the_other_is_guarded():
    """kohya with the text encoder frozen: its group's lr is 0 (the only other lr D-Adaptation allows)."""
    import dadaptation

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(16)), torch.nn.Parameter(torch.randn(16))
    opt = dadaptation.DAdaptSGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.0}])
    sched = RexWithRestarts(opt, first_cycle=20, d_guard=True)
    target = torch.randn(16) * 10
    for step in range(1, 81):
        loss = ((a - target) ** 2).mean() + ((b - target) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        assert opt.param_groups[1]["lr"] == 0.0
        if step >= 20:  # from the first restart on
            assert opt.param_groups[0]["d"] * opt.param_groups[0]["lr"] <= sched.guard.reference[0] * (1 + 1e-9)
    assert sched.guard.reference[0] > 0 and sched.guard.reference[1] is None
