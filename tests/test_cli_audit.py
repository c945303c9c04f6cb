"""`lrwatch audit` through the CLI in-process (click's CliRunner), and once as a real process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import FIXTURES, LABELS, ROOT, fixture_run, write_long_run


def lrwatch(*args: str) -> subprocess.CompletedProcess:
    from click.testing import CliRunner

    from lrwatch.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def test_python_m_lrwatch_gives_the_exit_code_and_keeps_errors_on_stderr():
    done = subprocess.run([sys.executable, "-m", "lrwatch", "audit", str(FIXTURES / "dadapt_sgd_blowup"), "no/such"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and "verdict: CRITICAL" in done.stdout
    assert "no/such: no such file or directory" in done.stderr and "no such" not in done.stdout


def test_audit_of_a_blowup_prints_findings_with_steps_and_exits_1():
    out = lrwatch("audit", str(FIXTURES / "dadapt_sgd_blowup"))
    assert out.returncode == 1, out.stderr
    assert "WARNING  step 67" in out.stdout and "predicted_restart_blowup" in out.stdout
    assert "WARNING  step 112" in out.stdout and "runaway_d" in out.stdout  # a warning: critical at 100x
    assert "CRITICAL step 135" in out.stdout and "loss_above_best" not in out.stdout  # (the message says it)
    assert "far above the run's own best" in out.stdout
    assert "verdict: CRITICAL" in out.stdout


def test_audit_of_a_healthy_run_exits_0():
    out = lrwatch("audit", str(FIXTURES / "prodigy_cosine_healthy"))
    assert out.returncode == 0, out.stdout
    assert "findings: none" in out.stdout and "schedule: cosine_with_restarts" in out.stdout


def test_json_has_the_documented_schema():
    out = lrwatch("audit", "--json", str(FIXTURES))
    doc = json.loads(out.stdout)
    assert doc["schema"] == 1 and doc["exit_code"] == out.returncode == 1
    assert len(doc["runs"]) == len(LABELS)
    for run in doc["runs"]:
        assert {"path", "groups", "cycles", "findings"} <= set(run)
        for cycle in run["cycles"]:
            assert {"start", "end", "peak_lr", "min_lr_step", "d_start", "d_end"} <= set(cycle)
        for f in run["findings"]:
            assert {"kind", "severity", "group", "step", "message"} <= set(f)
            assert f["kind"] in ("predicted_restart_blowup", "runaway_d", "blowup")
            assert f["severity"] in ("warning", "critical")


def test_a_missing_path_exits_2_with_a_clear_message():
    out = lrwatch("audit", "no/such/logs")
    assert out.returncode == 2 and "no such file or directory" in out.stderr and out.stdout == ""


def test_a_foreign_file_exits_2_and_says_it_is_not_an_event_file():
    out = lrwatch("audit", str(ROOT / "pyproject.toml"))
    assert out.returncode == 2 and "not a TensorBoard event file" in out.stdout


def test_bad_threshold_is_a_usage_error():
    out = lrwatch("audit", "--risk-stop", "1.5", str(FIXTURES / "prodigy_seed_bump"))
    assert out.returncode == 2 and "critical threshold" in out.stderr


def test_tag_patterns_map_another_trainers_tags():
    run = fixture_run("tf2_tensor_scalars")
    plain = json.loads(lrwatch("audit", "--json", str(run)).stdout)["runs"][0]
    assert not any(g["adaptive"] for g in plain["groups"])
    mapped = json.loads(lrwatch("audit", "--json", "--lr-tag", "train/lr", "--dlr-tag", "train/dlr",
                                "--loss-tag", "train/loss", str(run)).stdout)["runs"][0]
    assert mapped["groups"][0]["adaptive"] and mapped["groups"][0]["restarts"] == [200, 400, 600]


def test_the_core_never_imports_torch_or_matplotlib():
    code = ("import sys, lrwatch, lrwatch.cli, lrwatch.monitor, lrwatch.report, lrwatch.analysis, lrwatch.runs,"
            "lrwatch.watching, lrwatch.trainers, lrwatch.tbexport;"
            "lrwatch.audit([sys.argv[1]], tensorboard=False); print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(FIXTURES)], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False False", out.stderr


def test_an_audit_of_torch_scalars_imports_only_what_it_needs():
    """The command's start-up is most of a small audit: no tensorboard protos (torch's scalars and
    file_version records are read without them), no YAML, no watcher, no object-store packages,
    and crc32c's C function without its package's metadata look-up."""
    code = ("import sys; from lrwatch.cli import main; code = main(['audit', '--json', sys.argv[1]]); "
            "heavy = ['tensorboard', 'yaml', 'psutil', 'watchdog', 'fsspec', 'boto3', 'torch', 'matplotlib',"
            "'importlib.metadata', 'argparse'];"  # (what the crc32c package's __init__ imports: 15 ms)
            "print(code, [m for m in heavy if m in sys.modules], file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, str(fixture_run("prodigy_seed_bump"))], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.stderr.strip().splitlines()[-1] == "0 []", out.stderr  # exit 0: warnings only
    assert json.loads(out.stdout)["runs"][0]["findings"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_audit_command_keeps_freed_memory_with_settings_glibc_accepts():
    """mallopt says 0 for a setting it does not take; the others alone would turn glibc's adaptive
    threshold off and make the audit slower, not faster (188k page faults instead of 48k on the
    600k-event file), so every one must be taken."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    code = "from lrwatch.audit import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "True", out.stderr


def test_an_audit_read_by_several_processes_equals_the_serial_one(tmp_path):
    import shutil

    from lrwatch.audit import _pool_size, audit

    logs = tmp_path / "logs"
    shutil.copytree(ROOT / "fixtures" / "runs", logs)
    broken = logs / "broken" / "network_train"
    broken.mkdir(parents=True)
    (broken / "events.out.tfevents.1.host.1.0").write_bytes(b"\x00garbage" * 100)  # a foreign file among them
    assert _pool_size(2, 11) == 2 and _pool_size(None, 2) == 1  # few runs are read here, many in a pool
    serial = audit([logs], workers=1)
    parallel = audit([logs], workers=2)
    assert parallel.to_json() == serial.to_json()
    assert parallel.exit_code == serial.exit_code == 1 and len(parallel.runs) == 11


@pytest.mark.parametrize("workers", [1, 2])
def test_an_audit_that_drops_each_runs_points_reports_exactly_what_one_that_keeps_them_does(workers):
    """``lrwatch audit`` keeps what it says of each run, not its curves; every trainer's layout,
    a resumed run joined to the run it continues (whose points are read again for that), damage
    and notes come out the same, read here or in worker processes."""
    from lrwatch.audit import audit

    roots = [ROOT / "fixtures" / "trainers", FIXTURES]
    kept = audit(roots, workers=1)
    dropped = audit(roots, workers=workers, keep_points=False)
    assert dropped.to_json() == kept.to_json() and dropped.render() == kept.render()
    assert any("joined to run" in note for s in dropped.runs for note in s.analysis.notes)


def test_a_dropped_runs_series_is_read_again_from_its_files():
    from lrwatch.runs import Run

    run, fresh = Run(fixture_run("prodigy_resumed")), Run(fixture_run("prodigy_resumed"))
    run.refresh()
    fresh.refresh()
    fresh.step_range()  # builds every series, and so counts what each superseded
    superseded = fresh.superseded_points
    run.drop_points()
    assert run.tags == fresh.tags and run.superseded_points == superseded > 0
    assert run.step_range() == fresh.step_range()
    again, original = run.series("lr/unet"), fresh.series("lr/unet")
    assert again is not None and original is not None
    assert again.steps.tolist() == original.steps.tolist() and again.values.tolist() == original.values.tolist()


def test_what_an_audit_holds_per_run_does_not_grow_with_the_runs_length(tmp_path):
    """Memory stays bounded over a sweep of long runs: with ``keep_points=False`` a run of
    20,000 steps leaves about what a run of 2,000 does (both with four cycles: what the report
    says of a run grows with its cycles and findings, not with its points)."""
    import gc
    import tracemalloc

    from lrwatch.audit import audit

    def held(steps: int, keep_points: bool) -> int:
        logs = tmp_path / f"s{steps}{keep_points}"
        for i in range(3):
            write_long_run(logs / f"run{i}" / "events.out.tfevents.1700000000.bench.1.0", 3 * steps,
                           cycle=steps // 4, loss_spread=0.0)
        audit([logs], workers=1, keep_points=keep_points)  # caches warmed
        gc.collect()
        tracemalloc.start()
        result = audit([logs], workers=1, keep_points=keep_points)
        gc.collect()
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert result.exit_code == 0
        return size

    short, long, kept = held(2_000, False), held(20_000, False), held(20_000, True)
    assert long < 1.3 * short and long < kept / 10, (short, long, kept)


def test_the_json_report_pieced_from_each_runs_text_is_the_whole_document_dumped_at_once():
    from lrwatch.audit import audit
    from lrwatch.output import dumps
    from lrwatch.report import _snapshots_of, run_dict

    result = audit([FIXTURES, ROOT / "fixtures" / "trainers", ROOT / "no-such-folder"], workers=2, keep_points=False)
    doc = json.loads(result.to_json())
    doc["runs"] = [run_dict(s, _snapshots_of(result.monitor, s)) for s in result.monitor.runs]
    assert result.to_json() == dumps(doc, indent=2)
    assert doc["missing"] and len(doc["runs"]) > 20
