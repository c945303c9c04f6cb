"""Snapshot verdicts on the real snapshots the fixture generator saved."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, LABELS, ROOT, fixture_run
from safetensors.numpy import save_file

from lrwatch.analysis import Thresholds
from lrwatch.monitor import Monitor
from lrwatch.snapshots import MANIFEST, SnapshotBook, find_snapshots
from lrwatch.tags import TagMap


def verdicts(name: str, snapshot_dir=None, tag_map=None, thresholds=None, **book_kw) -> dict[int | str, object]:
    book = SnapshotBook([snapshot_dir or FIXTURES / name / "output"], **book_kw)
    monitor = Monitor([fixture_run(name)], tag_map, thresholds, snapshots=book)
    monitor.poll()
    monitor.judge_snapshots()
    (snaps,) = book.by_run.values()
    return {s.step if s.step is not None else os.path.basename(s.path): s for s in snaps}


def lrwatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrwatch", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("name", ["prodigy_cosine_healthy", "dadapt_adam_rex_healthy", "prodigy_two_groups"])
def test_cycle_minimum_saves_in_healthy_runs_are_safe(name):
    got = verdicts(name)
    assert {s.verdict for s in got.values()} == {"safe"}
    assert all(s.step_source == "metadata" for s in got.values())


def test_the_restart_logged_at_the_save_step_does_not_make_the_minimum_save_high_lr():
    # cosine hard restarts: the lr logged at step 200 is 1.0 (the restart), but the weights
    # saved at step 200 were last updated with the lr logged at step 199, the cycle's minimum
    s = verdicts("prodigy_cosine_healthy")[200]
    assert s.verdict == "safe" and s.lr_multiplier < 1e-3


def test_saves_every_t_over_c_with_warmup_miss_the_shifted_minima_and_say_so():
    got = verdicts("prodigy_warmup")
    assert [got[s].verdict for s in (220, 440, 660)] == ["high_lr"] * 3
    assert got[220].lr_multiplier == pytest.approx(0.353, abs=0.01)
    assert "mid-cycle" in got[220].reason


def test_saves_are_judged_by_the_loss_at_them_not_by_a_prediction_before_them():
    """The cycle-minimum save at 100 came after the warning (step 67) and before the restart
    that fried the run (loss diverged at 135): its weights are fine, and it is safe."""
    got = verdicts("dadapt_sgd_blowup")
    assert got[100].verdict == "safe" and got[100].loss_ratio < 1.5
    assert all(got[s].verdict == "fried" for s in (200, 300, 400, 500, 600))
    first_bad = LABELS["dadapt_sgd_blowup"]["first_diverged_loss_step"]
    assert all(s.step >= first_bad - 1 for s in got.values() if s.verdict == "fried")


def test_a_blowup_that_happened_later_leaves_earlier_minimum_saves_safe():
    got = verdicts("dadapt_sgd_growth_blowup")  # loss non-finite at 516
    assert [got[s].verdict for s in (100, 200, 300, 400, 500, 600)] == ["safe"] * 5 + ["fried"]


def test_without_a_loss_the_verdicts_fall_back_to_the_findings_before_the_save():
    no_loss = TagMap(loss=("no/such/loss",))
    got = verdicts("dadapt_sgd_blowup", tag_map=no_loss)
    assert got[100].verdict == "safe" and got[100].loss_ratio is None  # before anything reached its weights
    assert got[200].verdict == "fried" and "no loss logged" in got[200].reason  # after the restart spike at 100
    # a strong prediction (thresholds lowered to make one) before the save, no blow-up yet: at_risk
    th = Thresholds(risk_warning=1.5, risk_stop=2.0, restart_spike=100.0)
    got = verdicts("dadapt_sgd_growth_blowup", tag_map=no_loss, thresholds=th)
    assert got[200].verdict == "safe"
    assert got[300].verdict == "at_risk" and "predicted_restart_blowup at step 275" in got[300].reason


def _copy_output(tmp_path, name):
    dst = tmp_path / "output"
    shutil.copytree(FIXTURES / name / "output", dst)
    return dst


def test_a_snapshot_without_metadata_gets_its_step_from_its_name(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    save_file({"w": np.zeros(2, np.float32)}, str(out / "prodigy_cosine_healthy-step00000400.safetensors"))
    s = verdicts("prodigy_cosine_healthy", out)[400]
    assert s.step_source == "name" and s.verdict == "safe"


def test_a_snapshot_without_metadata_or_step_gets_its_step_from_its_save_time(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    path = out / "prodigy_cosine_healthy.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(path))
    from lrwatch.runs import Run

    run = Run(fixture_run("prodigy_cosine_healthy"))
    run.refresh()
    lr = run.series("lr/unet")
    when = float(lr.wall_times[lr.steps.tolist().index(600)]) - 0.0001  # saved just before step 600 was logged
    os.utime(path, (when, when))
    s = verdicts("prodigy_cosine_healthy", out)[600]
    assert s.step_source == "time (mtime)" and s.verdict == "safe"


def test_epoch_files_take_steps_per_epoch_from_metadata_or_the_user(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    w = {"w": np.zeros(2, np.float32)}
    save_file(w, str(out / "prodigy_cosine_healthy-000002.safetensors"), metadata={"ss_steps": "400", "ss_epoch": "2"})
    save_file(w, str(out / "prodigy_cosine_healthy-000003.safetensors"))  # no metadata
    got = verdicts("prodigy_cosine_healthy", out)
    assert got[600].step_source == "epoch 3 x 200 steps per epoch"
    (out / "prodigy_cosine_healthy-000002.safetensors").unlink()
    assert verdicts("prodigy_cosine_healthy", out, steps_per_epoch=200)[600].step_source.startswith("epoch 3")
    a_year_before_the_run = 1e9
    os.utime(out / "prodigy_cosine_healthy-000003.safetensors", (a_year_before_the_run, a_year_before_the_run))
    alone = verdicts("prodigy_cosine_healthy", out)["prodigy_cosine_healthy-000003.safetensors"]
    assert alone.verdict == "unknown" and "could not be found" in alone.reason


def test_truncated_and_foreign_files_are_unknown_with_a_reason(tmp_path):
    out = _copy_output(tmp_path, "prodigy_cosine_healthy")
    good = out / "prodigy_cosine_healthy-step00000200.safetensors"
    (out / "prodigy_cosine_healthy-step00000300.safetensors").write_bytes(good.read_bytes()[:40])
    (out / "prodigy_cosine_healthy-step00000500.safetensors").write_text("not a safetensors file")
    got = verdicts("prodigy_cosine_healthy", out)
    for name in ("prodigy_cosine_healthy-step00000300.safetensors", "prodigy_cosine_healthy-step00000500.safetensors"):
        snap = next(s for s in got.values() if s.path.endswith(name))
        assert snap.verdict == "unknown" and "not a readable safetensors file" in snap.reason


def test_a_step_beyond_the_logged_lr_is_unknown(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    save_file({"w": np.zeros(2, np.float32)}, str(out / "prodigy_cosine_healthy-step00005000.safetensors"))
    s = verdicts("prodigy_cosine_healthy", out)[5000]
    assert s.verdict == "unknown" and "no lr logged" in s.reason


def test_diffusers_checkpoint_folders_and_pt_files_are_found(tmp_path):
    (tmp_path / "checkpoint-400").mkdir()
    (tmp_path / "model_step600.pt").write_bytes(b"\0" * 8)
    (tmp_path / "prodigy_cosine_healthy-step00000200-state").mkdir()  # kohya's training state: not a snapshot
    found = {os.path.basename(s.path): (s.kind, s.step) for s in find_snapshots(tmp_path)}
    assert found == {"checkpoint-400": ("checkpoint_dir", 400), "model_step600.pt": ("other", 600)}


def test_audit_shows_verdicts_writes_the_manifest_atomically_and_never_touches_snapshots(tmp_path):
    out = _copy_output(tmp_path, "dadapt_sgd_blowup")
    before = {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime) for p in out.iterdir()}
    done = lrwatch("audit", str(FIXTURES / "dadapt_sgd_blowup" / "logs"), "--snapshots", str(out))
    assert done.returncode == 1
    assert "safe" in done.stdout and "fried" in done.stdout
    after = {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime) for p in out.iterdir()
             if p.name != MANIFEST}
    assert after == before
    manifest = json.loads((out / MANIFEST).read_text())
    assert len(manifest["snapshots"]) == len(before)
    assert manifest["best"] == str(out / "dadapt_sgd_blowup-step00000100.safetensors")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_json_lists_snapshots_per_run_and_no_manifest_writes_nothing(tmp_path):
    out = _copy_output(tmp_path, "prodigy_warmup")
    done = lrwatch("audit", "--json", "--no-manifest", str(FIXTURES / "prodigy_warmup"), "--snapshots", str(out))
    (run,) = json.loads(done.stdout)["runs"]
    assert [(s["step"], s["verdict"]) for s in run["snapshots"]] == [
        (220, "high_lr"), (440, "high_lr"), (660, "high_lr"), (880, "safe"), (1100, "safe")]
    assert {"path", "step", "step_source", "verdict", "lr_multiplier", "reason"} <= set(run["snapshots"][0])
    assert not (out / MANIFEST).exists()


def test_best_prints_only_the_safe_snapshot_with_the_lowest_loss_before_its_save(tmp_path):
    out = _copy_output(tmp_path, "dadapt_sgd_growth_blowup")
    done = lrwatch("audit", "--best", str(FIXTURES / "dadapt_sgd_growth_blowup"), "--snapshots", str(out))
    assert done.returncode == 0
    got = verdicts("dadapt_sgd_growth_blowup")
    safe = [s for s in got.values() if s.verdict == "safe"]
    lowest = min(safe, key=lambda s: s.loss_level)
    assert len(safe) >= 3 and done.stdout.strip() == str(out / Path(lowest.path).name)
    assert lowest.rank == 1 and sorted(s.rank for s in safe) == list(range(1, len(safe) + 1))
    report = lrwatch("audit", "--no-manifest", str(FIXTURES / "dadapt_sgd_growth_blowup"), "--snapshots", str(out))
    assert f"keep: {Path(lowest.path).name} (safe snapshots ranked by the loss's level" in report.stdout
    fried_only = tmp_path / "fried"
    fried_only.mkdir()
    for step in (200, 300, 400):
        name = f"dadapt_sgd_blowup-step{step:08d}.safetensors"
        shutil.copy(FIXTURES / "dadapt_sgd_blowup" / "output" / name, fried_only / name)
    none = lrwatch("audit", "--best", "--no-manifest", str(FIXTURES / "dadapt_sgd_blowup"),
                   "--snapshots", str(fried_only))
    assert none.returncode == 1 and none.stdout == "" and "no safe snapshot" in none.stderr


def test_snapshots_of_several_runs_are_matched_by_output_name(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    for name in ("prodigy_cosine_healthy", "dadapt_sgd_blowup"):
        for p in (FIXTURES / name / "output").iterdir():
            shutil.copy(p, out / p.name)
    done = lrwatch("audit", "--json", "--no-manifest", str(FIXTURES / "prodigy_cosine_healthy"),
                   str(FIXTURES / "dadapt_sgd_blowup"), "--snapshots", str(out))
    doc = json.loads(done.stdout)
    by_run = {r["name"]: {s["verdict"] for s in r["snapshots"]} for r in doc["runs"]}
    assert {frozenset(v) for v in by_run.values()} == {frozenset({"safe"}), frozenset({"safe", "fried"})}
    assert doc["unassigned_snapshots"] == []


def test_headers_are_read_once_per_file_version_while_watching(tmp_path, monkeypatch):
    import lrwatch.snapshots as snapshots_module

    out = _copy_output(tmp_path, "prodigy_cosine_healthy")
    reads = []
    real = snapshots_module.read_header
    monkeypatch.setattr(snapshots_module, "read_header", lambda p: reads.append(p.name) or real(p))
    book = SnapshotBook([out])
    monitor = Monitor([fixture_run("prodigy_cosine_healthy")], snapshots=book)
    monitor.poll()
    monitor.judge_snapshots()
    monitor.judge_snapshots()
    assert len(reads) == 5  # five snapshots, each read once
    victim = out / "prodigy_cosine_healthy-step00000400.safetensors"
    os.utime(victim, (victim.stat().st_atime, victim.stat().st_mtime + 5))  # rewritten
    monitor.judge_snapshots()
    assert reads[5:] == [victim.name]


# --- on the realistic corpus: verdicts from the evidence at each snapshot -----------------------------

CORPUS = ROOT / "fixtures" / "corpus"


def corpus_verdicts(name: str) -> tuple[dict, list[dict]]:
    import lrwatch

    run = CORPUS / "runs" / name
    result = lrwatch.audit([run / "logs"], snapshots=[run / "output"], manifest=False)
    (snaps,) = result.monitor.snapshots.by_run.values()
    labels = json.loads((CORPUS / "labels.json").read_text())[name]
    return {s.step: s for s in snaps}, labels["snapshots"]


def test_a_fry_the_run_recovered_from_leaves_its_later_snapshots_safe():
    got, truth = corpus_verdicts("prodigy_growth_s1")  # eval loss fried at 475, good again by 600
    assert [got[t["step"]].verdict in ("fried", "at_risk") for t in truth] == [t["fried"] for t in truth]
    assert got[1000].verdict == "safe" and not [t for t in truth if t["step"] >= 600 and t["fried"]]


def test_a_permanent_fry_makes_every_later_snapshot_fried_even_without_a_finding():
    got, truth = corpus_verdicts("prodigy_dcoef5_s1")  # fried in its first 25 steps and never recovered
    assert all(t["fried"] for t in truth)
    assert {got[t["step"]].verdict for t in truth} == {"fried"}
    assert "the run's best level before it" in got[500].reason


def test_a_validation_loss_that_stops_changing_after_a_blow_up_means_the_weights_are_dead():
    """The MLP task's prodigy_dcoef30_s0 blew up in its first 25 steps (the loss 1e9x), then its
    output stuck: the validation loss (fixed timesteps and seed) is 1.00614321 at every point
    from step 125 on, below everything since the blow-up, and its training loss below its base
    model's. Only the repeat shows the run is dead; the eval loss says every snapshot is fried.
    A run that blew up and recovered (dit_flow's dadapt_adan_lr3_s0, its validation moving
    again) keeps its later snapshots safe."""
    import lrwatch as library

    def verdicts(task: str, name: str) -> tuple[dict, list[dict]]:
        run = ROOT / "fixtures" / "tasks" / task / "runs" / name
        result = library.audit([run / "logs"], snapshots=[run / "output"], manifest=False)
        (snaps,) = result.monitor.snapshots.by_run.values()
        labels = json.loads((ROOT / "fixtures" / "tasks" / task / "labels.json").read_text())[name]
        return {s.step: s for s in snaps}, labels["snapshots"]

    got, truth = verdicts("mlp_eps", "prodigy_dcoef30_s0")
    assert all(t["fried"] for t in truth)
    late = [got[t["step"]] for t in truth if t["step"] >= 175]
    assert late and {s.verdict for s in late} == {"fried"}
    assert all("the weights no longer change" in s.reason for s in late)
    got, truth = verdicts("dit_flow", "dadapt_adan_lr3_s0")
    assert [got[t["step"]].verdict for t in truth if t["step"] >= 600] == ["safe"] * 9
    assert not any("no longer change" in s.reason for s in got.values())


def test_a_validation_loss_far_above_every_earlier_one_fries_a_snapshot_the_training_loss_would_pass():
    """The U-Net task's prodigy_dcoef3_s3 fried in its first steps, before its first validation
    point, so its training loss judges its snapshots; at step 1000 that loss is 1.6x its best
    (passable) while the validation loss is 2.6x every validation loss before it: worse than
    points that were themselves fried. The eval loss says fried; --best names nothing."""
    import lrwatch as library

    run = ROOT / "fixtures" / "tasks" / "unet_v" / "runs" / "prodigy_dcoef3_s3"
    result = library.audit([run / "logs"], snapshots=[run / "output"], manifest=False)
    (snaps,) = result.monitor.snapshots.by_run.values()
    last = next(s for s in snaps if s.step == 1000)
    assert last.verdict == "fried" and last.reason.startswith("validation loss 17.3 at its step is 2.64x")
    assert result.best_snapshot() is None


def test_a_run_whose_snapshots_are_mostly_fried_is_not_ok_whatever_its_findings_say(tmp_path):
    """The loss rule made blind (--loss-over-best 1000): no finding is critical, but the snapshot
    verdicts (the loss before each save against the run's best before) are mostly fried, so the
    run's verdict and the exit code say so."""
    run = CORPUS / "runs" / "prodigy_dcoef5_s1"
    done = lrwatch("audit", "--no-manifest", "--loss-over-best", "1000", str(run / "logs"),
                   "--snapshots", str(run / "output"))
    assert "CRITICAL step" not in done.stdout
    assert "most snapshots are fried: the run is not ok whatever its findings say" in done.stdout
    assert "verdict: CRITICAL" in done.stdout and done.returncode == 1
    doc = json.loads(lrwatch("audit", "--json", "--no-manifest", "--loss-over-best", "1000", str(run / "logs"),
                             "--snapshots", str(run / "output")).stdout)
    (entry,) = doc["runs"]
    assert entry["snapshots_mostly_fried"] and entry["verdict"] == "critical" and entry["keep"] is None


def test_a_manifest_with_non_finite_loss_ratios_is_strict_json(tmp_path):
    """Snapshots saved after the loss went infinite have an infinite loss ratio: the manifest
    (and tags/plan --json) go through the one serializer, never writing Infinity or NaN."""
    out = _copy_output(tmp_path, "dadapt_sgd_blowup")
    done = lrwatch("audit", str(fixture_run("dadapt_sgd_blowup")), "--snapshots", str(out))
    assert done.returncode == 1, done.stderr

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    doc = json.loads((out / MANIFEST).read_text(), parse_constant=refuse)
    assert any(s["loss_ratio"] is None and s.get("loss_ratio_text") == "inf" for s in doc["snapshots"])


@pytest.mark.parametrize("name, metadata", [
    ("absurd.safetensors", {"ss_steps": "1" * 23}),
    ("full_width.safetensors", {"ss_steps": "\uff15\uff10\uff10"}),  # full-width 500: no trainer writes it
])
def test_a_header_step_that_is_no_step_number_is_unknown_not_judged(tmp_path, name, metadata):
    out = tmp_path / "output"
    out.mkdir()
    save_file({"w": np.zeros(2, np.float32)}, str(out / name), metadata=metadata)
    s = verdicts("prodigy_cosine_healthy", out)[name]
    assert s.verdict == "unknown" and "is not a step number" in s.reason


def test_full_width_digits_in_a_name_are_not_a_step(tmp_path):
    name = "prodigy_cosine_healthy-step\uff10\uff10\uff10\uff10\uff10\uff15\uff10\uff10.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / name))
    (snap,) = find_snapshots(tmp_path)
    assert snap.step is None and snap.kind == "final"


def test_temp_files_of_killed_manifest_writes_are_cleaned_up_and_live_ones_kept(tmp_path):
    """A manifest write killed mid-way (SIGKILL) leaves its temp file; the next write removes
    those whose writer is gone, never one a running lrwatch is writing."""
    out = _copy_output(tmp_path, "prodigy_cosine_healthy")
    stale = out / f".{MANIFEST}.4194999.tmp"  # above Linux's highest pid: no such process
    live = out / f".{MANIFEST}.{os.getpid()}.tmp"
    stale.write_text("{")
    live.write_text("{")
    done = lrwatch("audit", str(fixture_run("prodigy_cosine_healthy")), "--snapshots", str(out))
    assert done.returncode == 0, done.stderr
    assert not stale.exists() and live.exists() and (out / MANIFEST).exists()
