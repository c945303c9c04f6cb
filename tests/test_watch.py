"""The live watchdog with real processes: trainers that write event files, lrwatch in another
process watching them, signals that really stop them (and never stop anyone else)."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import FIXTURES, LABELS, ROOT, event_file_of

from lrwatch.loader import EventFile
from lrwatch.processes import parse_writer_name, writer_from_name

REPLAY = [sys.executable, str(ROOT / "tests" / "replay_writer.py")]
# The toy runs were built to fry by d running away x11 within a window (a critical at 10x): the
# realistic tasks chose 100x (bench/transfer.py), so tests of the stop mechanics pin the toy's threshold.
TOY = ["--runaway-critical", "10"]
TRAIN = [sys.executable, str(ROOT / "fixtures" / "generate.py"), "--into"]
POSIX = os.name != "nt"


def first_bad_step(name: str) -> int:
    lab = LABELS[name]
    return min(s for s in (lab["first_nonfinite_loss_step"], lab["first_diverged_loss_step"]) if s)


def lrwatch(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lrwatch", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


class Watching:
    """lrwatch in another process, its stderr read as it comes, so a test can wait for its
    ready line ("lrwatch: watching ...": its handlers are set, its runs read, its trainer
    launched) rather than sleep."""

    def __init__(self, *args: str, **kw) -> None:
        self.proc = lrwatch(*args, **kw)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("lrwatch: watching"):
                self.ready.set()
        self.ready.set()  # ended: wait_ready says so

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.ready.wait(timeout) and self.proc.poll() is None, "lrwatch never watched:\n" + self.err

    @property
    def err(self) -> str:
        return "".join(self.lines)

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        out = self.proc.stdout.read()  # to its end: lrwatch and the children holding its stdout are gone
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        return self.proc.returncode, out, self.err


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def last_step_written(logdir: Path) -> int:
    files = sorted(logdir.rglob("events.out.tfevents.*"))
    steps = [EventFile(f).read_new().scalars.steps for f in files]
    return int(max(s.max() for s in steps if len(s)))


def start_and_wait_for_file(cmd: list[str], logdir: Path, cwd: Path = ROOT) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=cwd)
    deadline = time.monotonic() + 60
    while not list(logdir.rglob("events.out.tfevents.*")):
        assert proc.poll() is None and time.monotonic() < deadline, "trainer did not start writing"
        time.sleep(0.05)
    return proc


# --- stopping the trainer ------------------------------------------------------------------------

@pytest.mark.kill_safety
def test_a_launched_trainer_is_stopped_before_the_recorded_blowup(tmp_path):
    logs = tmp_path / "logs"
    code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", "--grace-int", "5", *TOY, "--",
                                    *REPLAY, "dadapt_sgd_blowup", str(logs), "--delay", "0.02"))
    assert code == 1, err
    assert "stopping the trainer after runaway_d at step 119" in err
    assert "sent SIGINT" in err or not POSIX
    assert last_step_written(logs) < first_bad_step("dadapt_sgd_blowup")
    assert "verdict: CRITICAL" in out


@pytest.mark.kill_safety
def test_a_launcher_whose_child_writes_the_run_is_stopped_as_the_trainer(tmp_path):
    """`accelerate launch` (or a shell script) starts the process that writes the event file: the
    file names the child's pid, and the child is lrwatch's to stop because it descends from the
    command lrwatch launched (its process tree is looked at while it lives)."""
    logs = tmp_path / "logs"
    launcher = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))",
                *REPLAY, "dadapt_sgd_blowup", str(logs), "--delay", "0.02"]
    code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", "--grace-int", "5", *TOY, "--", *launcher))
    assert code == 1, err
    assert "stopping the trainer after runaway_d at step 119" in err
    assert "no trainer process provably writes" not in err
    assert last_step_written(logs) < first_bad_step("dadapt_sgd_blowup")
    (event_file,) = logs.rglob("events.out.tfevents.*")
    parsed = parse_writer_name(event_file)
    launched = re.search(r"stopping the trainer after \S+ at step \d+: pid (\d+)", err)
    assert parsed is not None and launched is not None and parsed[2] != int(launched.group(1))  # the child wrote it
    if POSIX:
        signalled = re.search(r"sent SIGINT to pid\(s\) ([\d, ]+)", err)
        assert signalled is not None and str(parsed[2]) in signalled.group(1).split(", ")


@pytest.mark.kill_safety
def test_onetrainer_is_stopped_without_ctrl_c_which_would_save_the_fried_weights(tmp_path):
    workspace = tmp_path / "workspace"
    # 20 ms a step: the stop must land before batch 507, and at 5 ms two loaded cores shared by four
    # processes let the replay outrun the stop (512)
    replay = [sys.executable, str(ROOT / "tests" / "replay_onetrainer.py"), "blowup", str(workspace), "--delay", "0.02"]
    code, out, err = finish(lrwatch(str(workspace / "tensorboard"), "--kill-on-spike", *TOY, "--", *replay))
    assert code == 1, err
    assert "OneTrainer saves the current model on Ctrl-C: sending SIGTERM, not SIGINT" in err
    assert "sent SIGINT" not in err
    assert not list((workspace / "save").glob("*-interrupted.safetensors"))  # its Ctrl-C save never ran
    assert last_step_written(workspace) < 507  # batch 507 is where the loss diverges
    assert "trainer: onetrainer" in out


def _foreign_run_appears(logs: Path, name: str, watcher: Watching) -> None:
    """A run synced from another machine (its event file names another host) appears while watched."""
    watcher.wait_ready()
    run = logs / f"{name}20261124090000" / "network_train"
    run.mkdir(parents=True)
    shutil.copy(event_file_of(name), run / f"events.out.tfevents.{int(time.time())}.gpu-node-7.4242.0")


@pytest.mark.skipif(not POSIX, reason="the command is a POSIX shell line")
def test_stop_cmd_runs_once_when_no_local_process_writes_the_run(tmp_path):
    logs, marker = tmp_path / "logs", tmp_path / "stopped.txt"
    logs.mkdir()
    cmd = f'echo "$LRWATCH_RUN $LRWATCH_KIND $LRWATCH_STEP $LRWATCH_SEVERITY" >> {marker}; echo scancel-said-ok; exit 3'
    watcher = Watching(str(logs), "--kill-on-spike", "--until-idle", "3", "--stop-cmd", cmd)
    _foreign_run_appears(logs, "dadapt_sgd_growth_blowup", watcher)  # several critical findings
    code, out, err = watcher.finish()
    assert code == 1, err
    assert marker.read_text() == "dadapt_sgd_growth_blowup20261124090000/network_train blowup 514 critical\n"  # once
    assert "running --stop-cmd after blowup at step 514" in err
    assert "--stop-cmd exited with 3: scancel-said-ok" in err
    assert "stopping the trainer" not in err and "sent SIG" not in err  # no local process was touched


@pytest.mark.skipif(not POSIX, reason="the command is a POSIX shell line")
def test_stop_cmd_under_dry_run_runs_nothing(tmp_path):
    logs, marker = tmp_path / "logs", tmp_path / "stopped.txt"
    logs.mkdir()
    watcher = Watching(str(logs), "--kill-on-spike", "--dry-run", "--until-idle", "3", "--stop-cmd",
                       f"touch {marker}", *TOY)
    _foreign_run_appears(logs, "dadapt_sgd_blowup", watcher)
    code, out, err = watcher.finish()
    assert code == 1, err
    assert f"--dry-run: would run --stop-cmd after runaway_d at step 119: touch {marker} (nothing run)" in err
    assert not marker.exists()


@pytest.mark.kill_safety
def test_a_healthy_launched_run_is_left_alone_and_ends_the_watch(tmp_path):
    logs = tmp_path / "logs"
    code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", "--",
                                    *REPLAY, "prodigy_two_groups", str(logs), "--delay", "0.002"))
    assert code == 0, err
    assert "the trainer exited with code 0" in err and "stopping" not in err
    assert last_step_written(logs) == 800


@pytest.mark.kill_safety
def test_a_really_training_writer_is_found_from_its_file_name_and_a_bystander_is_untouched(tmp_path):
    """No --pid, nothing launched: lrwatch finds the writer from the event file's name alone. The
    bystander runs the identical command line (same user, same arguments) from another folder:
    a second real trainer of the same blowing-up run, which lrwatch is not watching."""
    trainer_cmd = [*TRAIN, "run", "0.03", "dadapt_sgd_blowup"]  # relative output folder
    (tmp_path / "watched").mkdir()
    (tmp_path / "elsewhere").mkdir()
    bystander = subprocess.Popen(trainer_cmd, cwd=tmp_path / "elsewhere")
    logs = tmp_path / "watched" / "run" / "logs"
    trainer = start_and_wait_for_file(trainer_cmd, logs, cwd=tmp_path / "watched")
    try:
        assert psutil.Process(bystander.pid).cmdline() == psutil.Process(trainer.pid).cmdline()
        code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", *TOY, "--grace-int", "5"))
        assert trainer.wait(timeout=30) != 0  # interrupted, not finished
        assert code == 1, err
        assert "writer: named in events.out.tfevents." in err
        assert last_step_written(logs) < first_bad_step("dadapt_sgd_blowup")
        assert "the trainer writing the run exited" in err
        assert bystander.poll() is None, "the bystander was signalled"
    finally:
        for p in (trainer, bystander):
            p.kill()
            p.wait()


@pytest.mark.kill_safety
def test_a_stale_event_file_whose_pid_now_belongs_to_another_process_leads_to_no_signal(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        logs = tmp_path / "logs"
        logs.mkdir()
        watcher = Watching(str(logs), "--kill-on-spike", "--until-idle", "2")
        watcher.wait_ready()
        run = logs / "old_run" / "network_train"
        run.mkdir(parents=True)
        stamp = int(time.time()) - 3600  # the file is an hour older than the process now holding that pid
        stale = run / f"events.out.tfevents.{stamp}.{socket.gethostname()}.{sleeper.pid}.0"
        shutil.copy(event_file_of("dadapt_sgd_blowup"), stale)  # appears while watched: it may act
        code, out, err = watcher.finish()
        assert code == 1
        assert "pid reused" in err and "nothing is stopped" in err
        assert sleeper.poll() is None
        target, why = writer_from_name(stale)
        assert target is None and "after the file was created" in why
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.kill_safety
def test_the_given_pid_is_stopped(tmp_path):
    logs = tmp_path / "logs"
    trainer = start_and_wait_for_file([*REPLAY, "dadapt_sgd_blowup", str(logs), "--delay", "0.02"], logs)
    try:
        code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", *TOY, "--pid", str(trainer.pid)))
        assert code == 1, err
        assert f"pid {trainer.pid}" in err and "given with --pid" in err
        assert trainer.wait(timeout=30) != 0
        assert last_step_written(logs) < first_bad_step("dadapt_sgd_blowup")
    finally:
        trainer.kill()
        trainer.wait()


@pytest.mark.kill_safety
def test_dry_run_says_what_it_would_stop_and_stops_nothing(tmp_path):
    logs = tmp_path / "logs"
    code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", "--dry-run", "--",
                                    *REPLAY, "dadapt_sgd_blowup", str(logs), "--delay", "0.002"))
    assert code == 1
    assert "would stop (--dry-run: nothing is sent) the trainer" in err and "sent SIG" not in err
    assert "--dry-run: would send SIGINT to pid(s)" in err
    assert last_step_written(logs) == 600


@pytest.mark.kill_safety
def test_kill_at_predict_waits_for_the_predicted_restart(tmp_path):
    logs = tmp_path / "logs"
    name = "dadapt_sgd_growth_blowup"  # with these thresholds, a strong prediction at 275; the next restart is 300
    code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", "--kill-at", "predict",
                                    "--risk-warning", "1.5", "--risk-stop", "2", "--snapshots", str(tmp_path / "out"),
                                    "--", *REPLAY, name, str(logs), "--delay", "0.01", "--output",
                                    str(tmp_path / "out")))
    assert code == 1, err  # a stopped trainer is never a plain "ok", though a prediction is only a warning
    assert "when step 300 (the predicted restart" in err
    stop = next(line for line in err.splitlines() if "stopping the trainer" in line)
    assert f"; keep {name}-step00000" in stop, stop  # the message names the snapshot to keep
    assert 300 <= last_step_written(logs) < first_bad_step(name)
    assert (tmp_path / "out" / f"{name}-step00000300.safetensors").exists()  # the cycle-minimum save is kept


@pytest.mark.kill_safety
def test_kill_at_confirm_stops_on_evidence_not_on_a_prediction(tmp_path):
    logs = tmp_path / "logs"
    name = "dadapt_sgd_growth_blowup"  # strong predictions at 275 and 369; the loss far above its best at 514
    code, out, err = finish(lrwatch(str(logs), "--kill-on-spike", "--kill-at", "confirm",
                                    "--risk-warning", "1.5", "--risk-stop", "2", "--",
                                    *REPLAY, name, str(logs), "--delay", "0.005", "--output", str(tmp_path / "out")))
    assert code == 1, err
    assert "(a strong prediction, after d's warm-up: --kill-at predict stops here)" in err
    stop = next(line for line in err.splitlines() if "stopping" in line)
    assert "after blowup at step 514" in stop, stop  # the loss's evidence, not the prediction at 275
    assert 514 <= last_step_written(logs) < 600


# --- following ------------------------------------------------------------------------------------

@pytest.mark.parametrize("poll,observer", [(None, ""), (None, "watchdog"), ("0.2", "")],
                         ids=["native", "watchdog-observer", "polling"])
def test_a_logdir_created_after_lrwatch_starts_is_picked_up(tmp_path, poll, observer):
    logs = tmp_path / "not" / "yet"
    extra = ["--poll", poll] if poll else []
    # The writer imports torch (seconds on a loaded machine), says ready, and makes the folder
    # when told to, once lrwatch listens; lrwatch ends when it exits (--pid), not on a timer.
    writer = subprocess.Popen([*REPLAY, "prodigy_seed_bump", str(logs), "--delay", "0.001", "--go"], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    watcher = Watching(str(logs), "--pid", str(writer.pid), *extra, env={**os.environ, "LRWATCH_OBSERVER": observer})
    watcher.wait_ready()
    writer.stdin.write("go\n")
    writer.stdin.close()
    writer.wait(timeout=60)
    code, out, err = watcher.finish()
    assert "waiting for" in err
    assert code == 0 and "predicted_restart_blowup" in err and "step 104" in err  # a warning: the loss holds


def test_an_event_file_deleted_while_watched_is_said_at_once(tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(FIXTURES / "prodigy_seed_bump", logs / "seed")
    events = tmp_path / "events.jsonl"
    watcher = lrwatch(str(logs), "--until-idle", "12", "--events-out", str(events))
    deadline = time.monotonic() + 30
    while not (events.exists() and "predicted_restart_blowup" in events.read_text()):
        assert time.monotonic() < deadline and watcher.poll() is None
        time.sleep(0.05)
    file = next(logs.rglob("events.out.tfevents.*"))
    file.unlink()
    deleted = time.monotonic()
    while "file disappeared" not in events.read_text():
        assert time.monotonic() - deleted < 5, "not said within 5 s (the folder is listed again only every 10 s)"
        time.sleep(0.05)
    watcher.terminate()
    finish(watcher)
    assert f"cannot read {file.name}: file disappeared" in events.read_text()


@pytest.mark.kill_safety
def test_polling_mode_stops_the_trainer_too(tmp_path):
    logs = tmp_path / "logs"
    code, out, err = finish(lrwatch(str(logs), "--poll", "0.1", "--kill-on-spike", *TOY, "--",
                                    *REPLAY, "dadapt_sgd_blowup", str(logs), "--delay", "0.02"))
    assert code == 1 and last_step_written(logs) < first_bad_step("dadapt_sgd_blowup")


def _launched_trainer(watcher: subprocess.Popen, logs: Path) -> psutil.Process:
    """The replayed trainer lrwatch launched, once it writes (lrwatch's handlers are set by then)."""
    deadline = time.monotonic() + 60
    while not list(logs.rglob("events.out.tfevents.*")):
        assert watcher.poll() is None and time.monotonic() < deadline, "the trainer did not start writing"
        time.sleep(0.05)
    return [p for p in psutil.Process(watcher.pid).children() if "replay_writer" in " ".join(p.cmdline())][0]


@pytest.mark.kill_safety
@pytest.mark.skipif(not POSIX, reason="POSIX signals (Windows' console events are mapped onto them)")
@pytest.mark.parametrize("signum, passed_on", [(signal.SIGINT, False), (signal.SIGTERM, True),
                                               (getattr(signal, "SIGHUP", 1), True)])
def test_a_signal_ends_the_watch_cleanly_and_says_what_became_of_the_trainer(tmp_path, signum, passed_on):
    """Ctrl-C reaches lrwatch only, so the trainer keeps running, said loudly. SIGTERM (kill,
    systemd, docker stop) and SIGHUP (a closed terminal) mean the job is going away: the trainer
    is handed the same signal. Either way: a final line, the final audit, 128 + the signal."""
    logs = tmp_path / "logs"
    # A shell's background job (this suite, perhaps) hands its children SIGINT ignored: set it back.
    watcher = lrwatch(str(logs), "--kill-on-spike", "--", *REPLAY, "prodigy_cosine_healthy", str(logs),
                      "--delay", "0.05", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    trainer = _launched_trainer(watcher, logs)
    watcher.send_signal(signum)
    try:
        assert watcher.wait(timeout=30) == 128 + signum
        if passed_on:
            trainer.wait(timeout=30)  # ended by the signal passed on
        else:
            assert trainer.is_running() and trainer.status() != psutil.STATUS_ZOMBIE
    finally:
        if trainer.is_running():
            trainer.kill()  # it holds lrwatch's inherited stdout/stderr open until it ends
    code, out, err = finish(watcher, timeout=30)
    name = signal.Signals(signum).name
    if passed_on:
        assert f"{name} received; passed {name} on to the trainer lrwatch launched (pid {trainer.pid})" in err
    else:
        assert f"the trainer lrwatch launched (pid {trainer.pid}) keeps running, NO LONGER GUARDED" in err
    assert "run " in out  # the final audit is printed


@pytest.mark.kill_safety
@pytest.mark.skipif(not POSIX, reason="POSIX signals")
def test_a_terminated_watch_never_signals_a_trainer_it_was_only_given(tmp_path):
    logs = tmp_path / "logs"
    trainer = start_and_wait_for_file([*REPLAY, "prodigy_cosine_healthy", str(logs), "--delay", "0.05"], logs)
    try:
        watcher = Watching(str(logs), "--pid", str(trainer.pid), "--kill-on-spike")
        watcher.wait_ready()
        watcher.proc.send_signal(signal.SIGTERM)
        code, out, err = watcher.finish(timeout=30)
        assert code == 143
        assert f"pid {trainer.pid} (--pid) keeps running, NO LONGER GUARDED" in err
        assert trainer.poll() is None
    finally:
        trainer.kill()
        trainer.wait()


# --- flagging ------------------------------------------------------------------------------------

class _Hook(http.server.BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        length = int(self.headers["Content-Length"])
        _Hook.bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_findings_go_to_json_lines_a_command_and_a_webhook(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Hook.bodies = []
    events = tmp_path / "events.jsonl"
    seen = tmp_path / "seen.txt"
    hook = f'{sys.executable} -c "import os; open(r\'{seen}\', \'a\').write(os.environ[\'LRWATCH_KIND\'] + \' \' + os.environ[\'LRWATCH_STEP\'] + chr(10))"'
    try:
        code, out, err = finish(lrwatch(str(FIXTURES / "dadapt_sgd_blowup"), "--until-idle", "1", *TOY,
                                        "--events-out", str(events), "--exec", hook,
                                        "--webhook", f"http://127.0.0.1:{server.server_port}/hook"))
    finally:
        server.shutdown()
    assert code == 1, err
    import lrwatch as library

    toy = library.Thresholds(runaway_critical=10)
    expected = [(f.kind, f.step) for f in library.audit([FIXTURES / "dadapt_sgd_blowup"], thresholds=toy).runs[0]
                .analysis.findings]
    assert len(expected) >= 5 and ("runaway_d", 119) in expected
    records = [json.loads(line) for line in events.read_text().splitlines()]
    findings = [r for r in records if r["type"] == "finding"]
    assert [(f["kind"], f["step"]) for f in findings] == expected
    assert sorted(seen.read_text().split("\n")[:-1]) == sorted(f"{k} {s}" for k, s in expected)
    assert len(_Hook.bodies) == len(expected)
    assert all("content" in b and "text" in b and b["lrwatch"]["run"] for b in _Hook.bodies)


def test_a_failing_hook_is_reported_and_never_stops_the_watcher(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    code, out, err = finish(lrwatch(str(FIXTURES / "dadapt_sgd_blowup"), "--until-idle", "1",
                                    "--exec", "exit 3", "--webhook", f"http://127.0.0.1:{closed_port}/"))
    assert code == 1
    assert "--exec hook exited with 3" in err and "--webhook failed" in err
    assert "verdict: CRITICAL" in out


# --- who the writer is -----------------------------------------------------------------------------

def test_writer_names_with_dotted_hosts_and_suffixes_parse():
    assert parse_writer_name(Path("events.out.tfevents.1795509431.gpu-7.lab.example.org.4242.3.v2")) == (
        1795509431, "gpu-7.lab.example.org", 4242)
    assert parse_writer_name(Path("events.out.tfevents.1795509431.vm.12.0")) == (1795509431, "vm", 12)
    assert parse_writer_name(Path("notes.txt")) is None


def test_a_writer_on_another_host_or_init_is_never_a_target(tmp_path):
    other = tmp_path / f"events.out.tfevents.{int(time.time())}.some-other-host.{os.getpid()}.0"
    assert writer_from_name(other)[0] is None and "not this machine" in writer_from_name(other)[1]
    init = tmp_path / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.1.0"
    assert writer_from_name(init)[0] is None


def test_the_watcher_judges_snapshots_as_they_appear_and_keeps_the_manifest(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "output"
    code, stdout, err = finish(lrwatch(str(logs), "--snapshots", str(out), "--",
                                       *REPLAY, "prodigy_cosine_healthy", str(logs), "--delay", "0.002",
                                       "--output", str(out)))
    assert code == 0, err
    for step in (200, 400, 600, 800):
        assert f"snapshot prodigy_cosine_healthy-step{step:08d}.safetensors (step {step}): safe" in err
    manifest = json.loads((out / "lrwatch-snapshots.json").read_text())
    assert [(s["step"], s["verdict"]) for s in manifest["snapshots"]] == [
        (200, "safe"), (400, "safe"), (600, "safe"), (800, "safe"), (1000, "safe")]
    assert manifest["best"].endswith("prodigy_cosine_healthy.safetensors")


@pytest.mark.kill_safety
def test_a_process_holding_the_file_open_is_not_taken_for_its_writer(tmp_path):
    """No pid in the file name: holding the file open proves nothing (TensorBoard does it), so
    nothing is stopped and lrwatch says how to name the trainer."""
    logs = tmp_path / "logs"
    logs.mkdir()
    watcher = Watching(str(logs), "--kill-on-spike", "--until-idle", "2", "--grace-int", "5")
    watcher.wait_ready()
    run = logs / "held_run" / "network_train"
    run.mkdir(parents=True)
    held = run / "events.out.tfevents.custom"
    shutil.copy(event_file_of("dadapt_sgd_blowup"), held)
    holder = subprocess.Popen([sys.executable, "-c",
                               f"import time; f = open(r'{held}', 'ab'); print('open', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        code, out, err = watcher.finish()
        assert code == 1
        assert "no writer pid in the name" in err and "nothing is stopped" in err
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


def test_the_watchers_findings_are_the_audits(tmp_path):
    """The live watcher, end to end: the findings, their steps and their values are the audit's."""
    logs, events = tmp_path / "logs", tmp_path / "events.jsonl"
    code, out, err = finish(lrwatch(str(logs), "--events-out", str(events), "--",
                                    *REPLAY, "dadapt_sgd_growth_blowup", str(logs), "--delay", "0.003"))
    assert code == 1, err
    watched = [json.loads(line) for line in events.read_text().splitlines()]
    watched = [(r["kind"], r["severity"], r["group"], r["step"], r["values"]) for r in watched
               if r["type"] == "finding"]
    done = subprocess.run([sys.executable, "-m", "lrwatch", "audit", str(logs), "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    (run,) = json.loads(done.stdout)["runs"]
    audited = [(f["kind"], f["severity"], f["group"], f["step"], f["values"]) for f in run["findings"]]
    assert sorted(map(json.dumps, watched)) == sorted(map(json.dumps, audited))
    assert len(audited) >= 8  # warnings and criticals over several cycles


def test_analyses_put_off_under_load_find_exactly_what_a_full_audit_finds(tmp_path):
    """A growing run whose analysis waits its turn (a tiny analysis budget: up to 3 s) is read
    on every change and analysed now and then; the analysis is causal, so the findings, their
    steps and values are those of one audit of the finished file."""
    import lrwatch
    from lrwatch.monitor import Monitor

    name = "dadapt_sgd_growth_blowup"
    data = event_file_of(name).read_bytes()
    run = tmp_path / "logs" / "run20261124090000" / "network_train"
    run.mkdir(parents=True)
    target = run / event_file_of(name).name
    monitor = Monitor([tmp_path / "logs"])
    monitor.poll()
    monitor.start_live()
    monitor.analysis_budget = 1e-6
    put_off = 0
    for cut in range(2000, len(data) + 2000, 2000):
        with open(target, "ab") as fh:
            fh.write(data[cut - 2000 : cut])
        monitor.poll()
        put_off += monitor.states[run].stale
    monitor.analysis_budget = 0.0
    monitor.poll({run}, rediscover=False)
    assert put_off > 10  # most passes left the analysis for later
    live = monitor.states[run].analysis
    full = lrwatch.audit([tmp_path / "logs"]).runs[0].analysis
    assert [f.to_dict() for f in live.findings] == [f.to_dict() for f in full.findings]
    assert len(full.findings) >= 8


@pytest.mark.skipif(not POSIX, reason="POSIX signals")
def test_ctrl_c_during_start_up_is_a_clean_end_not_a_traceback(tmp_path):
    """In-process, with a real signal: Ctrl-C while the runs already there are read (a large
    folder takes a while) ends the watch with 130 and one line, before anything is launched."""
    import io

    from lrwatch.hooks import Hooks
    from lrwatch.monitor import Monitor
    from lrwatch.watching import WatchOptions, watch

    class SlowStart(Monitor):
        def poll(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread's handler at once
            return super().poll(*args, **kwargs)

    shutil.copytree(FIXTURES / "prodigy_cosine_healthy", tmp_path / "run")
    err = io.StringIO()
    before = signal.getsignal(signal.SIGTERM)
    code = watch(SlowStart([str(tmp_path)]), WatchOptions(command=[sys.executable, "-c", "raise SystemExit(5)"]),
                 Hooks(err=err), out=io.StringIO())
    assert code == 130
    assert "SIGINT during start-up: stopped before watching anything" in err.getvalue()
    assert "lrwatch: watching" not in err.getvalue()  # nothing was launched
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back


@pytest.mark.kill_safety
def test_a_watch_ends_when_the_run_s_writer_exited_before_lrwatch_could_prove_it(tmp_path):
    """The run's writer wrote it and exited before lrwatch looked (here: written aside, then
    moved in). The file names a pid of this host that is gone: the watch ends, not waits forever."""
    logs, aside = tmp_path / "logs", tmp_path / "aside"
    logs.mkdir()
    watcher = Watching(str(logs))
    watcher.wait_ready()
    subprocess.run([*REPLAY, "prodigy_cosine_healthy", str(aside), "--delay", "0"], check=True)
    shutil.move(str(aside / "prodigy_cosine_healthy20261124090000"), str(logs))
    code, out, err = watcher.finish(timeout=60)
    assert "stopped watching: the trainer writing the run exited" in err
    assert code == 0 and "run prodigy_cosine_healthy" in out
