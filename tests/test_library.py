"""The library does what the CLI does (issue 28): ``lrwatch.watch`` follows runs and returns the
CLI's exit code, and options are checked in the library, the CLI only turning a bad one into a
usage message."""

from __future__ import annotations

import io
import shutil

import pytest
from conftest import LABELS, fixture_run

import lrwatch
from lrwatch import OptionError, SnapshotBook, Thresholds, WatchOptions
from lrwatch.cli import main


@pytest.mark.parametrize(("options", "says"), [
    ({"kill_at": "restrat"}, "kill_at (--kill-at) must be one of confirm, predict, not 'restrat'"),
    ({"kill_at": "predict"}, "goes with kill_on_spike (--kill-on-spike)"),
    ({"grace_int": -5}, "take seconds, 0 or more, not -5 and 10.0"),
    ({"poll": 0}, "poll (--poll) must be a positive number of seconds"),
    ({"until_idle": -1}, "until_idle (--until-idle) takes positive seconds"),
    ({"stop_cmd_always": True, "kill_on_spike": True}, "needs stop_cmd (--stop-cmd CMD)"),
    ({"stop_cmd": "scancel 1"}, "stop_cmd (--stop-cmd) goes with kill_on_spike"),
    ({"pid": 0}, "pid (--pid) must be a process id"),
    ({"analysis_budget": 2.0}, "analysis_budget is a share of one core"),
])
def test_watch_options_out_of_range_are_refused_with_what_they_take(options, says):
    with pytest.raises(OptionError) as e:
        WatchOptions(**options)
    assert says in str(e.value) and isinstance(e.value, ValueError)


@pytest.mark.parametrize(("options", "says"), [
    ({"safe_lr": 7.0}, "safe_lr (--safe-lr) is a share of the cycle's peak lr"),
    ({"fried_loss": 0.5}, "are ratios to the run's best, above 1, not 0.5 and 2.0"),
    ({"steps_per_epoch": 0}, "steps_per_epoch (--steps-per-epoch) must be 1 or more"),
])
def test_snapshot_options_out_of_range_are_refused(tmp_path, options, says):
    with pytest.raises(OptionError, match=r".") as e:
        SnapshotBook([tmp_path], **options)
    assert says in str(e.value)
    with pytest.raises(OptionError):
        Thresholds(loss_over_best=0.9)


def test_the_library_watch_follows_a_run_and_returns_the_clis_exit_code(tmp_path):
    """A finished fried run, watched until idle: the final audit goes to ``out``, lrwatch's lines
    to ``err``, and the exit code is the CLI's (1: critical)."""
    run = tmp_path / "logs"
    shutil.copytree(fixture_run("dadapt_sgd_blowup"), run)
    out, err = io.StringIO(), io.StringIO()
    code = lrwatch.watch([run], WatchOptions(until_idle=0.5), out=out, err=err)
    assert code == 1
    assert "verdict: CRITICAL" in out.getvalue() and "lrwatch: stopped watching" in err.getvalue()
    assert "next-restart risk" in err.getvalue()  # the status line too: nothing of lrwatch's on sys.stderr
    assert str(LABELS["dadapt_sgd_blowup"]["first_nonfinite_loss_step"]) in out.getvalue()


def test_the_cli_turns_a_bad_option_into_a_usage_message_and_exit_2(tmp_path, capsys):
    assert main(["watch", str(tmp_path), "--kill-at", "predict"]) == 2
    assert "kill_at='predict' (--kill-at) goes with kill_on_spike (--kill-on-spike)" in capsys.readouterr().err
    assert main(["watch", str(tmp_path), "--events-out", str(tmp_path / "no" / "such" / "dir" / "f")]) == 2
    assert "events_out (--events-out)" in capsys.readouterr().err
