"""Issue 8: never a wrong stop, never a silent pass, never a crash. Real processes, real files."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import FIXTURES, ROOT, as_a_normal_user, event_file_of, fixture_run, write_scalars
from test_watch import REPLAY, Watching, finish, first_bad_step, last_step_written, lrwatch

POSIX = os.name != "nt"


def copy_run_into(logs: Path, name: str, stamp: int | None = None, host: str | None = None,
                  pid: int | None = None) -> Path:
    """A recorded run placed in ``logs`` as kohya lays it out, its event file renamed to claim
    the given writer (default: a pid that is not running)."""
    run = logs / f"{name}20261120000000" / "network_train"
    run.mkdir(parents=True)
    stamp = stamp or int(time.time())
    dest = run / f"events.out.tfevents.{stamp}.{host or socket.gethostname()}.{pid or 4_000_000}.0"
    shutil.copy(event_file_of(name), dest)
    return dest


def stop_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if re.search(r"\bstopping\b|sent SIG", line)]


# --- 1. old runs never trigger a stop ------------------------------------------------------------

@pytest.mark.kill_safety
def test_an_earlier_runs_critical_finding_never_stops_a_newly_launched_trainer(tmp_path):
    logs = tmp_path / "logs"
    copy_run_into(logs, "dadapt_sgd_blowup")  # an earlier run, critical, in the same logdir
    code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", "--",
                                    *REPLAY, "prodigy_two_groups", str(logs), "--delay", "0.002"))
    assert "the trainer exited with code 0" in err, err
    assert stop_lines(err) == []
    assert last_step_written(logs / "prodigy_two_groups20261124090000") == 800
    assert "earlier run: no new data while lrwatch watched" in out
    assert "(earlier run: in the logs before lrwatch started)" in err
    assert code == 1  # the report still says the earlier run is critical


@pytest.mark.kill_safety
def test_an_earlier_runs_critical_finding_never_stops_a_given_pid(tmp_path):
    logs = tmp_path / "logs"
    copy_run_into(logs, "dadapt_sgd_blowup")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", "--pid", str(sleeper.pid),
                                        "--until-idle", "1.5"))
        assert stop_lines(err) == [] and sleeper.poll() is None
        assert "earlier run" in out
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.kill_safety
def test_a_run_written_by_another_process_never_stops_the_launched_trainer(tmp_path):
    """A second trainer (not launched by lrwatch) writes a blowing-up run into the same logdir
    while lrwatch guards a healthy one: the blow-up is reported, nobody is stopped."""
    logs = tmp_path / "logs"
    other = subprocess.Popen([*REPLAY, "dadapt_sgd_blowup", str(logs), "--delay", "0.01"])
    try:
        code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", "--",
                                        *REPLAY, "prodigy_two_groups", str(logs), "--delay", "0.01"))
        assert "CRITICAL dadapt_sgd_blowup" in err
        assert "no trainer process provably writes this run" in err and "not by the trainer lrwatch launched" in err
        assert stop_lines(err) == []
        assert "the trainer exited with code 0" in err
        assert other.wait(timeout=60) == 0  # the other trainer was not signalled either
    finally:
        other.kill()
        other.wait()


@pytest.mark.kill_safety
@pytest.mark.parametrize("name", ["events.out.tfevents.{now}.otherhost.4242.0", "events.out.tfevents.{now}.synced"])
def test_a_run_from_another_host_or_with_no_writer_in_its_name_never_stops_the_launched_trainer(tmp_path, name):
    """A shared or synced log folder: a blowing-up run written live into the watched folder,
    named after another machine, or with no pid at all. The launched trainer's own runs are
    named after its pid; this one is reported and stops nobody."""
    logs = tmp_path / "logs"
    watcher = Watching(str(logs), "--kill-on-spike", "--runaway-critical", "10", "--",
                       *REPLAY, "prodigy_two_groups", str(logs / "mine"), "--delay", "0.01")
    watcher.wait_ready()
    other = subprocess.Popen([*REPLAY, "dadapt_sgd_blowup", str(logs / "synced"), "--delay", "0.002",
                              "--file", name.format(now=int(time.time()))])
    try:
        assert other.wait(timeout=60) == 0
        code, out, err = watcher.finish()
        assert "CRITICAL synced/dadapt_sgd_blowup" in err
        assert "no trainer process provably writes this run" in err
        assert "otherhost" in err or "names no writer" in err
        assert stop_lines(err) == []
        assert "the trainer exited with code 0" in err
    finally:
        other.kill()
        other.wait()


@pytest.mark.kill_safety
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="open modes are read from Linux's /proc")
def test_a_launched_trainer_writing_a_file_with_no_pid_in_its_name_is_proved_by_its_open_handle(tmp_path):
    logs = tmp_path / "logs"
    code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", "--runaway-critical", "10", "--grace-int", "5", "--",
                                    *REPLAY, "dadapt_sgd_blowup", str(logs), "--delay", "0.02",
                                    "--file", "events.out.tfevents.run"))
    assert code == 1
    assert "events.out.tfevents.run is held open for writing by pid" in err
    assert last_step_written(logs) < first_bad_step("dadapt_sgd_blowup")


# --- 2. never a reader -----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.kill_safety
def test_tensorboard_tail_and_a_reader_holding_the_file_open_are_never_stopped(tmp_path):
    """The real writer has exited. TensorBoard serves the logdir, `tail -f` and a Python reader
    hold the event file open, and the file even names TensorBoard's pid with a fresh stamp:
    its records predate TensorBoard, so it is not TensorBoard's file. Nothing is stopped."""
    logs = tmp_path / "logs"
    logs.mkdir()
    port = _free_port()
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logs), "--host", "127.0.0.1",
                           "--port", str(port), "--reload_interval", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    readers: list[subprocess.Popen] = []
    try:
        watcher = Watching(str(logs), "--kill-on-spike", "--until-idle", "4", "--grace-int", "1")
        watcher.wait_ready()  # (not a sleep: under load, a run copied before lrwatch listens is an earlier one)
        event = copy_run_into(logs, "dadapt_sgd_blowup", pid=tb.pid)  # appears while watched
        readers.append(subprocess.Popen(["tail", "-f", str(event)], stdout=subprocess.DEVNULL))
        readers.append(subprocess.Popen([sys.executable, "-c", f"import time; f = open(r'{event}', 'rb'); "
                                                               "time.sleep(60)"]))
        code, out, err = watcher.finish()
        assert code == 1 and "CRITICAL" in err
        assert f"pid {tb.pid} started" in err and "first record was written, so it is not the writer" in err, err
        assert stop_lines(err) == []
        for proc in [tb, *readers]:
            assert proc.poll() is None, proc.args
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=10) as resp:
            assert resp.status == 200  # TensorBoard still serves
    finally:
        for proc in [tb, *readers]:
            proc.kill()
            proc.wait()


# --- 3. identity by more than the name -------------------------------------------------------------

@pytest.mark.kill_safety
def test_a_longer_host_name_that_starts_with_ours_is_another_machine(tmp_path):
    from lrwatch.processes import is_this_host, writer_from_name

    here = socket.gethostname()
    assert is_this_host(here) and is_this_host(here.upper())
    assert not is_this_host(f"{here}.cluster-b.example") and not is_this_host(here.split(".")[0] + "x")
    path = tmp_path / f"events.out.tfevents.{int(time.time())}.{here}.cluster-b.example.{os.getpid()}.0"
    target, why = writer_from_name(path)
    assert target is None and "not this machine" in why


@pytest.mark.kill_safety
def test_records_older_than_the_named_process_mean_it_is_not_the_writer(tmp_path):
    from lrwatch.processes import writer_from_name

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.2)
        path = tmp_path / f"events.out.tfevents.{int(time.time()) + 5}.{socket.gethostname()}.{proc.pid}.0"
        assert writer_from_name(path, first_wall_time=time.time() + 5)[0] is not None
        target, why = writer_from_name(path, first_wall_time=time.time() - 3600)
        assert target is None and "first record" in why
    finally:
        proc.kill()
        proc.wait()


SWEEP = """
import subprocess, sys, time
writer = subprocess.Popen(sys.argv[1:])
sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(sibling.pid, flush=True)
sibling.wait()
"""


@pytest.mark.kill_safety
@pytest.mark.parametrize("name", ["sweep_torchrun.py", "torchrun.py"])
def test_a_sweep_script_named_like_a_launcher_is_not_one_and_its_healthy_sibling_lives(tmp_path, name):
    script = tmp_path / name
    script.write_text(SWEEP)
    logs = tmp_path / "logs"
    sweep = subprocess.Popen([sys.executable, str(script), *REPLAY, "dadapt_sgd_blowup", str(logs),
                              "--delay", "0.02"], stdout=subprocess.PIPE, text=True)
    sibling = int(sweep.stdout.readline())
    try:
        code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", "--runaway-critical", "10", "--grace-int", "5"))
        assert code == 1 and "writer: named in" in err
        assert last_step_written(logs) < first_bad_step("dadapt_sgd_blowup")
        assert sweep.poll() is None and psutil.pid_exists(sibling), "the sweep or its sibling was stopped"
    finally:
        psutil.Process(sibling).kill()
        sweep.wait(timeout=10)


def test_launchers_are_recognised_by_program_or_module_not_by_words_in_the_command_line(tmp_path):
    from lrwatch.processes import is_launcher

    def console_script(name: str, module: str) -> str:  # as pip writes one into a venv's bin/
        path = tmp_path / name
        path.write_text(f"#!/venv/bin/python\n# -*- coding: utf-8 -*-\nimport re\nimport sys\nfrom {module} import "
                        "main\nif __name__ == '__main__':\n    sys.exit(main())\n")
        return str(path)

    class Fake:
        def __init__(self, argv):
            self.argv = argv

        def cmdline(self):
            return self.argv

        def cwd(self):
            return str(tmp_path)

    accelerate = console_script("accelerate", "accelerate.commands.accelerate_cli")
    torchrun = console_script("torchrun", "torch.distributed.run")
    (tmp_path / "torchrun.py").write_text("from torch.distributed.run import main\nmain()\n")  # a script, by name
    (tmp_path / "deepspeed").write_text("import subprocess\n")  # a sweep driver named like one
    yes = [["/venv/bin/python3", accelerate, "launch", "train.py"], ["/usr/bin/python3", torchrun, "t.py"],
           ["python", "torchrun", "t.py"], ["torchrun", "t.py"], ["python", "-u", "-m", "torch.distributed.run", "t.py"],
           ["C:\\py\\python.exe", "C:\\v\\accelerate.exe", "launch"], ["deepspeed", "t.py"]]
    no = [["python", "sweep_torchrun.py"], ["python", "torchrun.py", "t.py"], ["python", "deepspeed", "t.py"],
          ["python", accelerate, "config"], ["python", "/nonexistent/torchrun", "t.py"], ["bash", "run_deepspeed.sh"],
          ["python", "train.py", "--launcher", "torchrun"], ["python", "-c", "import torchrun"]]
    assert [a for a in yes if not is_launcher(Fake(a))] == []
    assert [a for a in no if is_launcher(Fake(a))] == []


@pytest.mark.skipif(not POSIX, reason="POSIX process tree")
def test_pid_1_lrwatch_and_its_parent_shell_are_refused(tmp_path):
    code, out, err = finish(lrwatch(str(tmp_path), "--kill-on-spike", "--pid", "1"))
    assert code == 2 and "init" in err
    shell = subprocess.run(["sh", "-c", f'{sys.executable} -m lrwatch {tmp_path} --kill-on-spike --pid $$'],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert shell.returncode == 2 and "lrwatch's parents" in shell.stderr


# --- 4. Ctrl-C as a terminal gives it --------------------------------------------------------------

@pytest.mark.kill_safety
@pytest.mark.skipif(not POSIX, reason="SIGINT dispositions are POSIX")
def test_a_launched_trainer_gets_sigint_even_when_lrwatch_was_started_with_it_ignored(tmp_path):
    logs = tmp_path / "logs"
    watcher = lrwatch(str(logs), "--kill-on-spike", "--grace-int", "60", "--",
                      *REPLAY, "dadapt_sgd_blowup", str(logs), "--delay", "0.02",
                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # a shell's background job
    code, out, err = finish(watcher, timeout=50)  # within grace-int: SIGINT itself worked
    assert code == 1 and "sent SIGINT" in err and "SIGTERM" not in err
    assert "the trainer exited with code -2" in err


@pytest.mark.kill_safety
@pytest.mark.skipif(not POSIX, reason="SIGINT dispositions are POSIX")
def test_a_found_writer_that_ignores_sigint_is_said_to_and_gets_sigterm(tmp_path):
    logs = tmp_path / "logs"
    trainer = subprocess.Popen([*REPLAY, "dadapt_sgd_blowup", str(logs), "--delay", "0.02"], cwd=ROOT,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", "--grace-int", "30"))
        assert "ignores SIGINT" in err and "sent SIGTERM" in err and "sent SIGINT" not in err
        assert trainer.wait(timeout=10) == -signal.SIGTERM
    finally:
        trainer.kill()
        trainer.wait()


# --- 5. --dry-run -------------------------------------------------------------------------------------

@pytest.mark.kill_safety
def test_dry_run_prints_nothing_that_reads_as_stopping(tmp_path):
    logs = tmp_path / "logs"
    code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", "--kill-at", "predict", "--risk-warning", "1.5",
                                    "--risk-stop", "2", "--dry-run", "--",
                                    *REPLAY, "dadapt_sgd_growth_blowup", str(logs), "--delay", "0.002"))
    assert code == 1 and "would stop" in err
    assert [line for line in err.splitlines() if re.search(r"\bstopping\b|\bwill stop\b|sent SIG", line)] == []
    assert last_step_written(logs) == 600


# --- 6-8. no silent pass -------------------------------------------------------------------------------

def foreign_run(tmp_path: Path) -> Path:
    run = tmp_path / "logs" / "other_trainer"
    write_scalars(run, {"train/learning_rate": [(i, 1e-3) for i in range(1, 30)],
                        "train/objective": [(i, 1.0 / i) for i in range(1, 30)]})
    return run


def test_a_run_with_no_recognised_tag_is_not_checked_lists_its_tags_and_exits_3(tmp_path, cli):
    foreign_run(tmp_path)
    result = cli("audit", str(tmp_path / "logs"))
    assert result.exit_code == 3
    assert "verdict: NOT CHECKED" in result.stdout and "verdict: ok" not in result.stdout
    assert "train/learning_rate (29)" in result.stdout and "train/objective (29)" in result.stdout
    assert "--lr-tag" in result.stdout and "--loss-tag" in result.stdout
    doc = json.loads(cli("audit", "--json", str(tmp_path / "logs")).stdout)
    assert doc["exit_code"] == 3 and doc["runs"][0]["checked"] is False
    assert doc["runs"][0]["unrecognised_tags"] == {"train/learning_rate": 29, "train/objective": 29}


def test_the_watch_says_not_checked_as_soon_as_it_knows(tmp_path):
    foreign_run(tmp_path)
    code, out, err = finish(lrwatch(str(tmp_path / "logs"), "--until-idle", "1"))
    assert code == 3 and "not checked: no lr, d*lr or loss tag recognised" in err
    assert err.index("not checked") < err.index("stopped watching")


def test_only_lr_and_loss_are_checked_is_said_only_when_a_loss_was_found(tmp_path, cli):
    write_scalars(tmp_path / "a", {"lr/unet": [(i, 1.0) for i in range(1, 9)]})
    write_scalars(tmp_path / "b", {"lr/unet": [(i, 1.0) for i in range(1, 9)], "loss/current": [(1, 0.5)]})
    out = cli("audit", str(tmp_path)).stdout
    run_a, run_b = out.split("\n\nrun ")
    assert "only the lr is checked" in run_a and "loss" not in run_a.split("note:")[1]
    assert "only lr and loss are checked" in run_b


def test_a_dotted_prodigy_optimizer_in_the_config_or_metadata_is_named_with_the_fix(tmp_path, cli):
    run = tmp_path / "logs" / "run20261124083000" / "network_train"
    write_scalars(run, {"lr/unet": [(i, 1.0) for i in range(1, 9)], "loss/current": [(1, 0.5)]})
    (run / "hparams.yml").write_text("optimizer_type: prodigyopt.Prodigy\n")
    out = cli("audit", str(tmp_path / "logs")).stdout
    assert "'prodigyopt.Prodigy'" in out and "pass --optimizer_type Prodigy" in out
    (run / "hparams.yml").unlink()
    import numpy as np
    from safetensors.numpy import save_file

    snaps = tmp_path / "output"
    snaps.mkdir()
    save_file({"w": np.zeros(2, np.float32)}, str(snaps / "run-step00000004.safetensors"),
              metadata={"ss_steps": "4", "ss_optimizer": "prodigyopt.prodigy.Prodigy(weight_decay=0.01)"})
    out = cli("audit", str(tmp_path / "logs"), "--snapshots", str(snaps), "--no-manifest").stdout
    assert "snapshot run-step00000004.safetensors names the optimizer 'prodigyopt.prodigy.Prodigy'" in out


def test_a_dlr_tag_without_an_lr_partner_invents_no_nan_lr(tmp_path, cli):
    result = cli("audit", "--dlr-tag", "lr/d*lr/{group}", "--lr-tag", "no/such/{group}",
                 str(FIXTURES / "prodigy_cosine_healthy"))
    assert result.exit_code == 0, result.stdout
    assert "nan" not in result.stdout.lower() and "has no lr partner" in result.stdout


@pytest.mark.kill_safety
def test_a_live_watch_with_a_lone_dlr_mapping_never_kills_a_healthy_trainer(tmp_path):
    logs = tmp_path / "logs"
    code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", "--dlr-tag", "lr/{group}", "--",
                                    *REPLAY, "prodigy_cosine_healthy", str(logs), "--delay", "0.001"))
    assert "the trainer exited with code 0" in err and stop_lines(err) == [] and "lr is nan" not in err


# --- 9. never a crash ----------------------------------------------------------------------------------

def kohya_run_with_config(tmp_path: Path, config: str) -> Path:
    logs = tmp_path / "logs"
    shutil.copytree(fixture_run("prodigy_seed_bump").parent, logs / "seed20261124083000")
    (logs / "seed20261124083000" / "network_train" / "hparams.yml").write_text(config)
    return logs


@pytest.mark.parametrize("config", [
    "lr_scheduler_type: lrwatch.schedulers.RexWithRestarts\nlr_scheduler_args: ['first_cycle=auto']\n"
    "max_train_steps: 1000\n",
    "lr_scheduler_type: lrwatch.schedulers.RexWithRestarts\nlr_scheduler_args: ['first_cycle=200', 'cycle_mult=0.5']\n"
    "max_train_steps: 1000\n",
    "lr_scheduler: cosine_with_restarts\nlr_scheduler_num_cycles: 1.0e+9\nmax_train_steps: 1000\n",
    "lr_scheduler: cosine_with_restarts\nlr_scheduler_num_cycles: 5\nmax_train_steps: .inf\n",
], ids=["first_cycle_auto", "cycle_mult_half", "a_billion_cycles", "infinite_steps"])
def test_odd_logged_schedules_are_a_note_not_a_crash_or_a_hang(tmp_path, cli, config):
    logs = kohya_run_with_config(tmp_path, config)
    started = time.monotonic()
    result = cli("audit", str(logs))
    assert time.monotonic() - started < 20
    assert result.exit_code == 0  # analysed all the same: the seed bump is still warned, from the lr alone
    assert "predicted_restart_blowup" in result.stdout
    assert "the logged schedule could not be used" in result.stdout


def test_non_finite_logged_hparams_still_give_valid_json(tmp_path, cli):
    logs = kohya_run_with_config(tmp_path, "learning_rate: .nan\nmax_grad_norm: .inf\noutput_name: seed\n")
    text = cli("audit", "--json", str(logs)).stdout
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    config = doc["runs"][0]["config"]
    assert config["learning_rate"] is None and config["learning_rate_text"] == "nan"
    assert config["max_grad_norm"] is None and config["max_grad_norm_text"] == "inf"


def test_tensor_scalars_with_short_or_out_of_range_half_payloads_are_skipped(tmp_path, cli):
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.types_pb2 import DT_BFLOAT16, DT_DOUBLE, DT_HALF
    from tensorboard.summary.writer.record_writer import RecordWriter

    run = tmp_path / "logs" / "tf2"
    run.mkdir(parents=True)
    with open(run / "events.out.tfevents.1.h.1.0", "wb") as fh:
        writer = RecordWriter(fh)
        writer.write(Event(wall_time=1.0, file_version="brain.Event:2").SerializeToString())
        tensors = [TensorProto(dtype=DT_HALF, half_val=[70000]), TensorProto(dtype=DT_BFLOAT16, half_val=[-1]),
                   TensorProto(dtype=DT_DOUBLE, tensor_content=b"\x00\x01"), TensorProto(dtype=DT_HALF, half_val=[0x3C00])]
        for step, tensor in enumerate(tensors, 1):
            event = Event(wall_time=1.0 + step, step=step, summary=Summary(value=[Summary.Value(tag="loss", tensor=tensor)]))
            writer.write(event.SerializeToString())
        writer.flush()
    doc = json.loads(cli("audit", "--json", str(tmp_path / "logs")).stdout)
    assert doc["runs"][0]["last_step"] == 4  # only the valid half 1.0 at step 4 was a point


def test_a_manifest_that_cannot_be_written_is_reported_and_the_trainer_stays_guarded(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "output"
    (out / "lrwatch-snapshots.json").mkdir(parents=True)  # a directory in the manifest's place
    code, stdout, err = finish(lrwatch(str(logs), "--kill-on-spike", "--runaway-critical", "10", "--snapshots", str(out), "--",
                                       *REPLAY, "dadapt_sgd_blowup", str(logs), "--delay", "0.02",
                                       "--output", str(out)))
    assert code == 1 and "could not write" in err and "lrwatch-snapshots.json" in err
    assert err.index("could not write") < err.index("stopping the trainer after")  # still guarding after it
    assert last_step_written(logs) < first_bad_step("dadapt_sgd_blowup")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no temp files left behind


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_one_unreadable_event_file_is_reported_and_the_rest_is_checked(tmp_path):
    """As a normal user would meet it (as_a_normal_user: as root, without the capabilities
    that read everything)."""
    prefix = as_a_normal_user()
    logs = tmp_path / "logs"
    shutil.copytree(FIXTURES / "prodigy_seed_bump" / "logs", logs)
    locked = copy_run_into(logs, "dadapt_adam_rex_healthy")
    locked.chmod(0)
    for args in (["audit", str(logs)], [str(logs), "--until-idle", "1"]):
        done = subprocess.run([*prefix, sys.executable, "-m", "lrwatch", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
        assert done.returncode == 2, done.stderr  # a run with nothing readable ...
        assert "predicted_restart_blowup" in done.stdout  # ... and the seed run still judged
        assert "permission denied" in done.stdout + done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_a_run_folder_lrwatch_may_not_list_is_named_with_the_unreadable_exit_code(tmp_path):
    """Another user's 0700 run folder: said, with exit code 2, in the audit and the watch; and
    the watch does not fall back to polling the whole tree for it."""
    prefix = as_a_normal_user()
    logs = tmp_path / "logs"
    shutil.copytree(FIXTURES / "prodigy_seed_bump" / "logs", logs)
    hidden = copy_run_into(logs, "dadapt_sgd_blowup").parent.parent
    hidden.chmod(0)
    try:
        for args in (["audit", str(logs)], [str(logs), "--until-idle", "1"]):
            done = subprocess.run([*prefix, sys.executable, "-m", "lrwatch", *args], capture_output=True, text=True,
                                  cwd=ROOT, timeout=60)
            assert done.returncode == 2, done.stderr
            assert f"{hidden}: cannot list this folder (Permission denied)" in done.stderr
            assert "predicted_restart_blowup" in done.stdout  # the readable run is still judged
            assert "polling" not in done.stderr and "Traceback" not in done.stderr
    finally:
        hidden.chmod(0o755)


def test_symlinked_run_folders_are_found_once_and_a_link_loop_ends(tmp_path, cli):
    elsewhere = tmp_path / "elsewhere"
    copy_run_into(elsewhere, "dadapt_sgd_blowup")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "linked").symlink_to(elsewhere, target_is_directory=True)
    (logs / "loop").symlink_to(logs, target_is_directory=True)  # back up to the root
    result = cli("audit", str(logs))
    assert result.exit_code == 1 and result.stdout.count("\nrun ") + result.stdout.startswith("run ") == 1
    assert "run linked/dadapt_sgd_blowup" in result.stdout


def test_a_symlinked_event_file_is_watched_live(tmp_path):
    """The file is written where its link points: its new points are read as they come, not
    only in the final audit."""
    logs, aside = tmp_path / "logs", tmp_path / "aside"
    logs.mkdir()
    watcher = Watching(str(logs), "--runaway-critical", "10", "--until-idle", "10")
    watcher.wait_ready()
    writer = subprocess.Popen([*REPLAY, "dadapt_sgd_blowup", str(aside), "--delay", "0.01"])
    try:
        deadline = time.monotonic() + 60
        while not (files := list(aside.rglob("events.out.tfevents.*"))):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        run = logs / "run"
        run.mkdir()
        (run / files[0].name).symlink_to(files[0])
        while "CRITICAL run step" not in watcher.err:
            assert writer.poll() is None, "the critical finding came only after the writer ended:\n" + watcher.err
            time.sleep(0.02)
    finally:
        writer.kill()
        writer.wait()
    watcher.finish()


def test_a_nul_or_escape_in_a_tag_reaches_exec_and_the_terminal_escaped(tmp_path):
    run = tmp_path / "logs" / "odd\x1b]0;pwned\x07"
    write_scalars(run, {"lr/un\x00et": [(1, 1.0), (2, float("nan"))], "lr/d*lr/un\x00et": [(1, 1.0), (2, 1.0)]})
    seen = tmp_path / "seen.txt"
    hook = f"{sys.executable} -c \"import os; open(r'{seen}', 'a').write(os.environ['LRWATCH_GROUP'])\""
    code, out, err = finish(lrwatch(str(tmp_path / "logs"), "--until-idle", "1", "--exec", hook))
    assert code == 1 and seen.read_text() == "un\\x00et"
    assert "\x1b" not in out + err and "\x07" not in out + err and "\\x1b]0;pwned\\x07" in out


def test_exec_runs_with_a_tag_longer_than_the_system_allows_in_one_variable(tmp_path):
    """Linux refuses a variable over 128 KiB (E2BIG): a 200,000-character group name reaches
    --exec cut short, and LRWATCH_TRUNCATED says which variables were cut."""
    group = "g" * 200_000
    write_scalars(tmp_path / "logs" / "run", {f"lr/{group}": [(1, 1.0), (2, float("nan"))],
                                              f"lr/d*lr/{group}": [(1, 1.0), (2, 1.0)]})
    seen = tmp_path / "seen.txt"
    hook = (f"{sys.executable} -c \"import os; open(r'{seen}', 'a').write(str(len(os.environ['LRWATCH_GROUP'])) + "
            "' ' + os.environ['LRWATCH_TRUNCATED'] + chr(10))\"")
    code, out, err = finish(lrwatch(str(tmp_path / "logs"), "--until-idle", "1", "--exec", hook))
    assert code == 1 and "--exec hook" not in err, err  # it ran, and did not fail
    lengths, _, cut = seen.read_text().splitlines()[0].partition(" ")
    assert int(lengths) < 200_000 and "LRWATCH_GROUP" in cut and "LRWATCH_JSON" in cut


@pytest.mark.parametrize("url", ["file:///etc/passwd", "not a url", "http://"])
def test_a_webhook_that_is_not_http_is_refused_at_start(tmp_path, cli, url):
    result = cli(str(tmp_path), "--webhook", url)
    assert result.exit_code == 2 and "--webhook" in result.stderr and "Traceback" not in result.stderr


# --- 10. one serializer; actions reach the hooks ------------------------------------------------------

def test_stops_reach_events_out_exec_and_the_webhook_as_valid_json(tmp_path):
    import http.server
    import threading

    bodies: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    logs, events, seen = tmp_path / "logs", tmp_path / "events.jsonl", tmp_path / "seen.txt"
    hook = f"{sys.executable} -c \"import os; open(r'{seen}', 'a').write(os.environ['LRWATCH_TYPE'] + ' ' + os.environ['LRWATCH_KIND'] + chr(10))\""
    try:
        code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", "--events-out", str(events), "--exec", hook,
                                        "--webhook", f"http://127.0.0.1:{server.server_port}/", "--",
                                        *REPLAY, "dadapt_sgd_blowup", str(logs), "--delay", "0.02"))
    finally:
        server.shutdown()
    assert code == 1
    records = [json.loads(line, parse_constant=pytest.fail) for line in events.read_text().splitlines()]
    assert any(r["type"] == "action" and r["kind"] == "stop" for r in records)
    assert "action stop" in seen.read_text().splitlines()
    assert any(b["lrwatch"]["type"] == "action" and b["lrwatch"]["kind"] == "stop" for b in bodies)


# --- 12. the last words of an exiting trainer ------------------------------------------------------------

NAN_THEN_EXIT = """
import sys, time
from torch.utils.tensorboard import SummaryWriter
w = SummaryWriter(sys.argv[1])
for step in range(1, 6):
    w.add_scalar("lr/unet", 1.0, step); w.add_scalar("lr/d*lr/unet", 0.1, step); w.add_scalar("loss/current", 0.5, step)
    w.flush(); time.sleep(0.3)
w.add_scalar("loss/current", float("nan"), 6)
w.flush()
time.sleep(1.5)
"""


def test_findings_written_just_before_the_trainer_exits_reach_the_hooks(tmp_path):
    logs, events = tmp_path / "logs", tmp_path / "events.jsonl"
    script = tmp_path / "trainer.py"
    script.write_text(NAN_THEN_EXIT)
    code, out, err = finish(lrwatch(str(logs), "--poll", "1", "--events-out", str(events), "--",
                                    sys.executable, str(script), str(logs / "run")))
    assert code == 1
    kinds = [(r.get("kind"), r.get("step")) for r in map(json.loads, events.read_text().splitlines())]
    assert ("blowup", 6) in kinds


# --- 14. a run folder deleted and made again --------------------------------------------------------------

def test_a_run_folder_deleted_and_recreated_is_a_new_run_whose_findings_are_reported(tmp_path):
    logs, events = tmp_path / "logs", tmp_path / "events.jsonl"

    def blowups() -> int:
        records = map(json.loads, events.read_text().splitlines()) if events.exists() else []
        return sum(r["type"] == "finding" and (r["kind"], r["step"]) == ("blowup", 200) for r in records)

    watcher = Watching(str(logs), "--until-idle", "3", "--events-out", str(events))
    watcher.wait_ready()
    def wait_for(done) -> None:  # what lrwatch says or writes, not a fixed sleep
        deadline = time.monotonic() + 60
        while not done() and time.monotonic() < deadline:
            time.sleep(0.05)

    for made in (1, 2):
        if made == 2:
            shutil.rmtree(logs / "seed")
            wait_for(lambda: "seed: its folder is gone; forgotten" in watcher.err)
        shutil.copytree(fixture_run("prodigy_seed_bump"), logs / "seed")
        wait_for(lambda made=made: blowups() >= made)
    code, out, err = watcher.finish()
    assert blowups() == 2, err
    assert "seed: its folder is gone; forgotten (a run written there again is a new run)" in err


# --- 15. exit codes, stdout and stderr --------------------------------------------------------------------

def test_best_on_a_missing_path_exits_2_with_the_error_on_stderr(tmp_path, cli):
    result = cli("audit", str(tmp_path / "missing"), "--snapshots", str(tmp_path), "--best")
    assert result.exit_code == 2 and result.stdout == "" and "no such file or directory" in result.stderr


def test_an_internal_error_on_one_run_is_its_own_exit_code_and_the_others_are_checked(tmp_path):
    import lrwatch
    from lrwatch.tags import TagMap

    class Broken(TagMap):
        def groups(self, tags):
            if "lr/d*lr/unet" in tags and "loss/current" not in tags:
                raise RuntimeError("a bug on odd data")
            return super().groups(tags)

    write_scalars(tmp_path / "odd", {"lr/unet": [(1, 1.0)], "lr/d*lr/unet": [(1, 1.0)]})
    write_scalars(tmp_path / "fine", {"lr/unet": [(1, 1.0)], "lr/d*lr/unet": [(1, 1.0)], "loss/current": [(1, 1.0)]})
    result = lrwatch.audit([tmp_path], Broken())
    assert result.exit_code == 4
    states = {s.run.name: s for s in result.runs}
    assert "RuntimeError: a bug on odd data" in states["odd"].error and states["fine"].analysis is not None
    assert "internal error" in result.render()


# --- design --------------------------------------------------------------------------------------------

def test_main_runs_in_process_and_splits_the_command_after_dashes(tmp_path, capsys):
    from lrwatch.cli import main

    logs = tmp_path / "logs"
    code = main([str(logs), "--kill-on-spike", "--runaway-critical", "10", "--", *REPLAY, "dadapt_sgd_blowup",
                 str(logs), "--delay", "0.02"])
    err = capsys.readouterr().err
    assert code == 1 and "stopping the trainer after runaway_d at step 119" in err
    assert main(["audit", str(tmp_path / "nope")]) == 2
    assert main(["--version"]) == 0


def test_the_readme_documents_every_cli_option():
    import click

    from lrwatch.cli import cli as group

    readme = (ROOT / "README.md").read_text()
    missing = []
    for name, command in group.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in param.opts:
                    if opt.startswith("--") and f"`{opt}" not in readme:
                        missing.append(f"{name} {opt}")
    assert missing == []


def test_the_library_audit_does_what_the_cli_does(tmp_path):
    import lrwatch

    out = tmp_path / "output"
    shutil.copytree(FIXTURES / "prodigy_cosine_healthy" / "output", out)
    result = lrwatch.audit([FIXTURES / "prodigy_cosine_healthy"], snapshots=[out])
    assert result.exit_code == 0 and result.best_snapshot().path.endswith("prodigy_cosine_healthy.safetensors")
    assert (out / "lrwatch-snapshots.json").exists()
    with pytest.raises(ValueError, match="critical threshold"):
        lrwatch.Thresholds(risk_warning=3.0, risk_stop=2.0)
