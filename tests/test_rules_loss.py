"""The loss rules judge each run against itself (lrwatch.rules.loss), on real event files."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import write_scalars

from lrwatch.analysis import CRITICAL, WARNING, Basis, Kind, Thresholds, analyze
from lrwatch.rules.loss import upper_levels
from lrwatch.runs import Run
from lrwatch.watching import stops_for

STEPS = 400


def noisy(level: np.ndarray, spread: float, seed: int) -> list[tuple[int, float]]:
    """A diffusion-like loss: log-normal around ``level`` (one value per step from step 1)."""
    rng = np.random.default_rng(seed)
    return [(s, float(level[s - 1] * math.exp(spread * rng.standard_normal()))) for s in range(1, len(level) + 1)]


def analysed(tmp_path, points: dict[str, list[tuple[int, float]]], thresholds: Thresholds | None = None):
    write_scalars(tmp_path, {"lr/unet": [(s, 1.0) for s in range(1, STEPS + 1)], **points})
    run = Run(tmp_path)
    run.refresh()
    return analyze(run, thresholds=thresholds)


def loss_findings(a, what: str):
    return [f for f in a.findings if f.values.get("what") == what]


def test_a_run_that_improves_tenfold_then_fries_is_caught_though_it_stays_under_its_base(tmp_path):
    """The issue's first cause: the run goes to ~0.1x its first level, then to 8x its own best,
    still 0.8x the base model's. Against the base nothing shows; against its own best it does."""
    level = np.concatenate([np.geomspace(1.0, 0.1, 150), np.full(100, 0.1), np.full(150, 0.8)])
    a = analysed(tmp_path, {"loss/current": noisy(level, 0.9, 1)})
    (f,) = loss_findings(a, "loss_above_best")
    assert f.severity == CRITICAL and f.basis == Basis.LOSS and f.kind == Kind.BLOWUP
    assert 250 < f.step <= 275  # within a window of the fry at 251
    assert f.values["ratio"] >= Thresholds().loss_over_best and "the run's own best" in f.message


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spread", [0.4, 0.9])
def test_a_healthy_noisy_loss_never_gets_a_critical(tmp_path, seed, spread):
    """A diffusion loss that swings as at batch 4 (0.4) and batch 1 (0.9) while it improves and
    then flattens: chance alone never takes its level to the critical ratio."""
    level = np.concatenate([np.geomspace(0.2, 0.1, 200), np.full(200, 0.1)])
    a = analysed(tmp_path, {"loss/current": noisy(level, spread, seed)})
    assert not [f for f in a.findings if f.severity == CRITICAL]


def test_the_chance_factor_grows_with_the_runs_own_spread(tmp_path):
    """The same 2.2x jump in level: a critical for a steady loss; the allowance for chance grows
    with the spread of the run's own losses (at batch 1 two 25-loss levels differ by ~1.7x at two
    standard errors), so a loss that swings needs a larger jump."""
    level = np.concatenate([np.full(200, 0.1), np.full(200, 0.22)])
    allowed = []
    for spread in (0.0, 0.4, 0.9):
        a = analysed(tmp_path / str(spread), {"loss/current": noisy(level, spread, 3)}, Thresholds(
            loss_over_best=1.01, loss_noise_sigmas=2.0))  # every level rise is a finding: its allowance is read
        (f,) = loss_findings(a, "loss_above_best")
        assert f.values["chance"] == pytest.approx(f.values["ratio"] / f.values["ratio_beyond_chance"], rel=1e-3)
        allowed.append(f.values["chance"])
    assert allowed[0] == pytest.approx(1.0) and allowed[0] < allowed[1] < allowed[2]
    steady = analysed(tmp_path / "steady", {"loss/current": noisy(level, 0.0, 3)})
    # the level of 25 losses, k of them at 2.2x: 2.2 ** (k / 25) >= 1.5 from k = 13 on (step 213)
    assert [f.step for f in loss_findings(steady, "loss_above_best")] == [213]
    raised = upper_levels(np.array([1.0]), np.array([0.9]), math.sqrt(2 / 25), 2.0)
    assert raised[0] == pytest.approx(math.exp(2 * 0.9 * math.sqrt(2 / 25)))  # ~1.66x at batch 1


def test_an_exact_zero_loss_is_a_blowup_as_ai_toolkit_logs_a_nan_loss(tmp_path):
    level = np.full(STEPS, 0.1)
    points = noisy(level, 0.5, 2)
    points[119] = (120, 0.0)
    a = analysed(tmp_path, {"loss/current": points})
    (f,) = loss_findings(a, "zero_loss/current")
    assert f.severity == CRITICAL and f.step == 120 and "ai-toolkit" in f.message


def test_a_negative_loss_stops_the_level_rule_with_a_note_not_a_finding(tmp_path):
    a = analysed(tmp_path, {"loss/current": [(s, -1.0 + 0.001 * s) for s in range(1, STEPS + 1)]})
    assert not [f for f in a.findings if f.basis == Basis.LOSS]
    assert any("is negative from step 1" in n for n in a.notes)


def validation_points(values: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(values.items())


def test_a_validation_loss_decides_and_the_training_loss_then_only_warns(tmp_path):
    level = np.concatenate([np.full(250, 0.1), np.full(150, 1.0)])  # a fry at 251, seen by both losses
    val = {s: 0.05 * (0.98 ** (s // 25)) if s <= 250 else 0.5 for s in range(25, STEPS + 1, 25)}
    a = analysed(tmp_path, {"loss/current": noisy(level, 0.5, 4),
                            "loss/validation/step_average": validation_points(val)})
    assert a.validation_tag == "loss/validation/step_average"
    (v,) = loss_findings(a, "validation_above_best")
    assert v.severity == CRITICAL and v.step == 275 and v.basis == Basis.VALIDATION  # its first point above
    (t,) = loss_findings(a, "loss_above_best")
    assert t.severity == WARNING and "the validation loss, logged since before that best, decides" in t.message
    assert any("validation loss loss/validation/step_average decides" in n for n in a.notes)


def test_a_validation_loss_that_wanders_within_its_ratio_is_no_finding(tmp_path):
    val = {s: 0.05 * (1.0 + 0.2 * math.sin(s / 40)) for s in range(25, STEPS + 1, 25)}  # at most 1.5x its best
    a = analysed(tmp_path, {"loss/current": noisy(np.full(STEPS, 0.1), 0.5, 5),
                            "loss/validation_step/my concept": validation_points(val)})
    assert a.validation_tag == "loss/validation_step/my concept"  # OneTrainer's, one concept
    assert not loss_findings(a, "validation_above_best")


def test_a_run_without_a_validation_loss_is_told_how_to_log_one(tmp_path):
    a = analysed(tmp_path, {"loss/current": noisy(np.full(STEPS, 0.1), 0.5, 6)})
    (note,) = [n for n in a.notes if n.startswith("no validation loss logged")]
    assert "--validation_split" in note and "--validate_every_n_steps" in note


def test_a_restart_predicted_far_too_high_is_a_warning_that_only_kill_at_predict_acts_on(tmp_path):
    """Healthy runs' restarts landed at 13-49x the highest d*lr: a prediction is never critical.
    After d's warm-up and at ``risk_stop`` it is strong, and only --kill-at predict stops on it."""
    steps = range(1, STEPS + 1)
    lr = [(s, 0.5 * (1 + math.cos(math.pi * ((s - 1) % 100) / 100))) for s in steps]
    # d climbs out of d0 and settles; in cycle 2, near its minimum, it jumps 50x (the seed's bump)
    d = [1e-6 * 10 ** min(s / 20, 3) * (50 if s > 150 and (s - 1) % 100 > 90 else 1) for s in steps]
    write_scalars(tmp_path, {"lr/unet": lr, "lr/d*lr/unet": [(s, v * dd) for (s, v), dd in zip(lr, d)]})
    run = Run(tmp_path)
    run.refresh()
    a = analyze(run)
    predictions = [f for f in a.findings if f.kind == Kind.PREDICTED_RESTART_BLOWUP]
    assert predictions and all(f.severity == WARNING for f in predictions)
    strong = [f for f in predictions if f.values["strong"]]
    assert strong and "--kill-at predict stops here" in strong[0].message
    assert stops_for(strong[0], "predict") and not stops_for(strong[0], "confirm")
    assert not any(stops_for(f, "predict") for f in predictions if not f.values["strong"])


def test_ai_toolkits_zero_loss_in_its_own_layout_is_a_blowup(tmp_path):
    """ai-toolkit (SDTrainer) replaces a NaN loss with 0.0 and trains on; its log holds one `lr`
    (d*lr) and one `loss` every log_every steps, in a folder named <name>_<date>-<time>."""
    rng = np.random.default_rng(7)
    steps = range(10, 1001, 10)
    loss = [(s, 0.0 if s == 300 else float(0.1 * math.exp(0.6 * rng.standard_normal()))) for s in steps]
    run = tmp_path / "my_lora_20261124-083000"
    write_scalars(run, {"lr": [(s, 1e-4) for s in steps], "loss": loss})
    r = Run(run)
    r.refresh()
    a = analyze(r)
    assert a.trainer == "ai-toolkit"
    (f,) = loss_findings(a, "zero_loss")
    assert f.severity == CRITICAL and f.step == 300 and "ai-toolkit logs a NaN loss as 0.0" in f.message


@pytest.mark.parametrize("steps", [3_000, 10_000, 30_000])
def test_a_long_flat_healthy_loss_never_gets_a_critical(steps):
    """A flat log-normal loss at batch 1's spread (1.0: its 5th and 95th percentiles ~27x apart)
    for as long as real runs go. The best level is the lowest of thousands of windows and the
    level judged the highest of as many, and the lowest is also a calm one: with an allowance
    fixed as for a 1,000-step run and the best window's own spread, 14 of 20 such runs of
    10,000 steps got a critical (``compared``, ``_typical_spread``)."""
    from lrwatch.rules.loss import TrainingLossRule

    for seed in range(8):
        loss = 0.1 * np.exp(np.random.default_rng(seed).normal(0, 1.0, steps))
        rule = TrainingLossRule("loss", 25, Thresholds().loss_over_best, Thresholds().loss_noise_sigmas, 1)
        rule.extend(np.arange(1, steps + 1), loss)
        assert rule.findings == [], (seed, rule.findings[0].message)


def test_a_fry_late_in_a_long_run_is_still_caught():
    """The wider allowance of a long run still catches a fry late in it: a level 4x its best."""
    from lrwatch.rules.loss import TrainingLossRule

    rng = np.random.default_rng(0)
    level = np.concatenate([np.full(9_000, 0.1), np.full(1_000, 0.4)])
    rule = TrainingLossRule("loss", 25, Thresholds().loss_over_best, Thresholds().loss_noise_sigmas, 1)
    rule.extend(np.arange(1, 10_001), level * np.exp(rng.normal(0, 1.0, 10_000)))
    (finding,) = rule.findings
    assert finding.severity == CRITICAL and 9_000 < finding.step <= 9_025
