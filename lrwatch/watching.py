"""Live watching: the audit pipeline, re-run as the trainer's files change.

File-system events (lrwatch.file_events: inotify on Linux, watchdog's observers
elsewhere, or polling for network filesystems) wake the loop; only runs whose
files changed are read again, from where the last read stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import psutil

from lrwatch.analysis import CRITICAL, Finding, Kind, Thresholds
from lrwatch.file_events import WatchdogEvents, open_file_events
from lrwatch.hooks import Hooks, run_with_record, webhook_problem
from lrwatch.monitor import FORGET_EVERY, READ_BUDGET, Monitor, RunState
from lrwatch.options import OptionError, WatchOptions
from lrwatch.output import terminal_safe
from lrwatch.processes import (
    CLOCK_SLACK,
    WINDOWS,
    Identity,
    Target,
    descendants,
    find_writer,
    is_this_host,
    newest_first,
    parse_writer_name,
    refuse_pid,
    stop,
    writer_from_name,
)
from lrwatch.report import (
    EXIT_CRITICAL,
    EXIT_INTERNAL,
    EXIT_NOT_CHECKED,
    EXIT_OK,
    EXIT_UNREADABLE,
    exit_code,
    mapping_hint,
    render,
)
from lrwatch.signals import Interrupted, signals_end_the_watch
from lrwatch.snapshots import (
    DEFAULT_FRIED_LOSS,
    DEFAULT_FRIED_VALIDATION,
    DEFAULT_SAFE_LR,
    SnapshotBook,
    best_snapshot,
)
from lrwatch.sources import is_remote
from lrwatch.tags import TagMap
from lrwatch.tbexport import Exporter
from lrwatch.trainers import LAYOUTS, ScheduleOptions

SAFETY_REPOLL = 10.0  # seconds: re-read everything now and then, in case an event was missed


def stops_for(finding: Finding, kill_at: str) -> bool:
    """Whether ``finding`` is one that a stop acts on under the ``kill_at`` policy."""
    return finding.severity == CRITICAL or (kill_at == "predict" and finding.kind == Kind.PREDICTED_RESTART_BLOWUP
                                            and bool(finding.values.get("strong")))


BOOKKEEPING = 0.25  # seconds between the passes over every run (verdicts, export, notes, status lines)
COALESCE = 0.02  # seconds: a burst of file events is taken together, not one pass per event
STOP_CMD_TIMEOUT = 120.0  # seconds a --stop-cmd (scancel, kubectl, runpodctl) may take
REMOTE_POLL = 5.0  # seconds between passes over remote roots (--poll overrides)
FALLBACK_POLL = 1.0  # seconds between polls when native file events run out (inotify's watch limit)


class Watcher:
    """Observes the roots (waiting for those that do not exist yet) and yields changed runs."""

    def __init__(self, monitor: Monitor, poll: float | None = None, say: Callable[[str], None] | None = None) -> None:
        self.monitor = monitor
        self.say = say or (lambda text: None)
        self.events, note = open_file_events(poll)
        self.polling = bool(poll)
        if note:
            self.say(f"lrwatch: {note}")
        self._scheduled: set[Path] = set()
        # Remote roots (object stores) have no file events: a full pass every `remote_every` s.
        self.remote = any(is_remote(r) for r in [*monitor.roots, *self.snapshot_folders])
        self.remote_every = poll or REMOTE_POLL
        self._last_remote = time.monotonic()
        self._last_take = 0.0
        self._run_of: dict[str, tuple[Path, Path]] = {}  # an event file as the observer spells it -> (run, file)
        self._files_seen: dict[Path, int] = {}  # run -> how many event files it had when its links were looked at

    def start(self) -> None:
        self.schedule_new_roots()

    @property
    def snapshot_folders(self) -> list[Path]:
        return self.monitor.snapshots.folders if self.monitor.snapshots is not None else []

    def schedule_new_roots(self) -> bool:
        """Start observing roots (and snapshot folders) that have appeared, or came back after
        being deleted; True if any did."""
        appeared = False
        for root in [*self.monitor.roots, *self.snapshot_folders]:
            if is_remote(root) or not root.exists():
                continue
            folder = str(root if root.is_dir() else root.parent)
            if root in self._scheduled and self.events.watching(folder):
                continue
            try:
                self.events.add(folder, recursive=root.is_dir())
            except OSError as e:
                if self.polling:  # nothing left to fall back to: the 10 s full re-reads still see it
                    self.say(f"lrwatch: cannot observe {folder}: {e}")
                    self._scheduled.add(root)
                    continue
                self._fall_back(e)
                return True
            self._scheduled.add(root)
            appeared = True
        return appeared

    def _fall_back(self, error: OSError) -> None:
        """Out of inotify watches (or handles): poll every root rather than miss changes."""
        self.events.stop()
        self.events, self.polling = WatchdogEvents(FALLBACK_POLL), True
        self.say(f"lrwatch: {error}; polling every {FALLBACK_POLL:g} s instead")
        self._scheduled.clear()
        self.schedule_new_roots()

    def wait(self, timeout: float) -> tuple[dict[Path, set[Path]], bool, bool]:
        """Block until something changes (or ``timeout``): (changed known runs, each with the
        event files written in it, whether to rediscover, whether a snapshot folder changed)."""
        if self.events.wait(timeout):
            time.sleep(max(0.0, COALESCE - (time.monotonic() - self._last_take)))
        self._last_take = time.monotonic()
        rediscover = self.schedule_new_roots()
        if self.remote and time.monotonic() - self._last_remote >= self.remote_every:
            self._last_remote, rediscover = time.monotonic(), True
        snapshots_changed = rediscover and bool(self.snapshot_folders)
        self._follow_linked_files()
        written, moved = self.events.take()
        if self.events.failure is not None:  # a new folder could not be watched
            self._fall_back(self.events.failure)
            rediscover = True
        for name in moved:  # a run folder deleted (and perhaps made again), a new folder in a run
            if self._in_snapshot_folder(Path(name)):
                snapshots_changed = True
                continue
            rediscover = True
            known = self._known_file(name)
            if known is not None:  # an event file renamed or deleted: list its run (its path may name another file)
                self.monitor.states[known[0]].listed_at = -1e9
        runs: dict[Path, set[Path]] = {}
        for name in written:
            known = self._known_file(name)
            if known is not None:
                run, path = known
            else:
                path = Path(name)
                if self._in_snapshot_folder(path):
                    snapshots_changed = True
                    continue
                found = self.monitor.run_for(path)
                if found is None:
                    rediscover = True  # a new run folder or event file
                    continue
                run, state = found, self.monitor.states[found]
                if path == run or path in state.run.files:
                    path = run if path == run else state.run.files[path].path  # the run's own object, as ``run``
                    self._run_of[name] = (run, path)
                else:
                    state.listed_at = -1e9  # a file the run does not know yet: list its folder
            runs.setdefault(run, set()).add(path)
        return runs, rediscover, snapshots_changed

    def _follow_linked_files(self) -> None:
        """A symlinked event file is written where its link points, and that folder's events
        never name the link: its real folder is observed too, and its real name mapped to it."""
        if self.remote:
            return
        for run, state in self.monitor.states.items():
            files = state.run.files
            if self._files_seen.get(run) == len(files):
                continue
            self._files_seen[run] = len(files)
            for path in files:
                if not path.is_symlink():
                    continue
                real = os.path.realpath(path)
                if real in self._run_of:
                    continue
                try:
                    self.events.add(os.path.dirname(real), recursive=False)
                except OSError as e:
                    self.say(f"lrwatch: cannot observe {os.path.dirname(real)} (where {path.name} points): {e}")
                self._run_of[real] = (run, path)

    def _known_file(self, name: str) -> tuple[Path, Path] | None:
        """(run, event file) of a file as the observer spells it, once seen, while its run is watched."""
        known = self._run_of.get(name)
        return known if known is not None and known[0] in self.monitor.states else None

    def _in_snapshot_folder(self, path: Path) -> bool:
        return any(path == f or path.parent == f for f in self.snapshot_folders)

    def stop(self) -> None:
        self.events.stop()


class StatusBoard:
    """One compact line per run: redrawn in place on a terminal, printed at restarts otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._drawn = 0
        self._last_cycle: dict[Path, int] = {}

    def line(self, state: RunState) -> str | None:
        a = state.analysis
        if a is None or a.last_step is None:
            return None
        parts = [f"{state.run.name}: step {a.last_step}"]
        groups = [g for g in a.groups if g.adaptive] or a.groups
        if groups:
            parts.append(f"cycle {len(groups[0].restarts)}")
        ds = " ".join(f"{g.name}={g.d_now:.3g}" for g in groups if g.d_now is not None)
        if ds:
            parts.append(f"d {ds}")
        risks = [g.risk for g in groups if g.risk is not None]
        if risks:
            parts.append(f"next-restart risk {max(risks):.2f}x")
        nxt = next((g.next_restart for g in groups if g.next_restart), None)
        if nxt:
            parts.append(f"(restart at {nxt})")
        if a.worst:
            parts.append(a.worst.upper())
        return "  ".join(parts)

    def clear(self) -> None:
        if self.tty and self._drawn:
            self.out.write("\x1b[1A\x1b[2K" * self._drawn + "\r")
            self._drawn = 0

    def draw(self, states: list[RunState]) -> None:
        if self.tty:
            self.clear()
            lines = [line for s in states if (line := self.line(s))]
            width = max(20, _terminal_width() - 1)
            for line in lines:
                self.out.write(terminal_safe(line)[:width] + "\n")
            self._drawn = len(lines)
            self.out.flush()
            return
        for s in states:  # a log file: one line per run when a new cycle starts
            a = s.analysis
            if a is None or not a.groups:
                continue
            cycle = len(a.groups[0].restarts)
            if self._last_cycle.get(s.run.path) != cycle:
                self._last_cycle[s.run.path] = cycle
                line = self.line(s)
                if line:
                    print(terminal_safe(f"lrwatch: {line}"), file=self.out, flush=True)


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 120


def launch(command: list[str]) -> subprocess.Popen:
    """Start the trainer in its own process group/session, so that Ctrl-C in lrwatch's terminal
    reaches lrwatch only: stopping lrwatch never stops the trainer. SIGINT is reset to its
    default in the child, as a terminal would give it (a shell's background job ignores it)."""
    if WINDOWS:
        return subprocess.Popen(command, creationflags=subprocess.CREATE_NEW_PROCESS_GROUP)  # type: ignore[attr-defined]
    return subprocess.Popen(command, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


class Guarded:
    """The trainer lrwatch launched or was given with --pid, and which runs are provably its.

    A run is its run only when one of its event files (a) is named after a process of its tree
    on this host, (b) is held open for writing by a process of its tree now, or (c) carries no
    writer in its name, appeared after the watch started, began after the trainer, and lies in
    a folder the trainer's command line names below the watched roots. A file named after
    another host or another pid is never its (a shared or synced log folder), whatever else holds.
    """

    def __init__(self, target: Target, launched: bool, roots: list[Path] | None = None,
                 argv: list[str] | None = None, cwd: str | None = None) -> None:
        self.target = target
        self.launched = launched
        self.pids: set[int] = set()
        self.named_folders = _named_folders(argv or [], cwd or os.getcwd(), roots or [])
        self.refresh()

    @classmethod
    def given(cls, target: Target, roots: list[Path]) -> Guarded:
        """A --pid trainer: its command line and working folder are read from the process."""
        proc = target.identity.process()
        try:
            argv, cwd = (proc.cmdline(), proc.cwd()) if proc is not None else ([], None)
        except psutil.Error:
            argv, cwd = [], None
        return cls(target, launched=False, roots=roots, argv=argv, cwd=cwd)

    def refresh(self) -> None:
        self.pids |= descendants(self.target.identity)

    def owns(self, state: RunState) -> tuple[bool, str]:
        self.refresh()
        who = "the trainer lrwatch launched" if self.launched else f"--pid {self.target.identity.pid}"
        evidence = state.run.writer_evidence()
        others: list[str] = []
        unnamed: list[Path] = []
        for path in newest_first(evidence):
            parsed = parse_writer_name(path)
            if parsed is None:
                unnamed.append(path)
            elif not is_this_host(parsed[1]):
                others.append(f"{path.name} was written on host {parsed[1]!r}")
            elif parsed[2] in self.pids:
                return True, f"written by pid {parsed[2]} of {who}"
            else:
                others.append(f"{path.name} was written by pid {parsed[2]}, not by {who} or its children")
        writing = _open_for_writing(descendants(self.target.identity), unnamed)
        if writing:
            path, pid = writing
            return True, f"{path.name} is held open for writing by pid {pid} of {who}"
        for path in unnamed:
            first = evidence[path]
            if (not state.seen_at_start and first is not None
                    and first >= self.target.identity.create_time - CLOCK_SLACK
                    and _under_any(path, self.named_folders)):
                return True, (f"{path.name} names no writer, but appeared after {who} started, in a folder its "
                              "command line names")
        if unnamed:
            others.append(f"{unnamed[0].name} names no writer, and {who} neither holds it open for writing nor names "
                          "its folder (below the watched folders) on its command line")
        return False, "; ".join(others) or f"no event file provably written by {who}"


def _named_folders(argv: list[str], cwd: str, roots: list[Path]) -> list[Path]:
    """The paths a command line names (``--logging_dir=x`` too), resolved from its working
    folder, that lie below a watched root: a folder that is a root or above one (``logs/``,
    ``.``) names every run in it, so naming it proves nothing."""
    watched = [Path(os.path.abspath(r)) for r in roots if not is_remote(r)]
    out = []
    for arg in argv[1:]:
        for part in {arg, arg.split("=", 1)[-1]}:
            if not part or part.startswith("-"):
                continue
            path = Path(os.path.abspath(os.path.join(cwd, part)))
            if any(path != root and path.is_relative_to(root) for root in watched):
                out.append(path)
    return out


def _under_any(path: Path, folders: list[Path]) -> bool:
    file = Path(os.path.abspath(path))
    return any(file.is_relative_to(folder) for folder in folders)


def _open_for_writing(pids: set[int], paths: list[Path]) -> tuple[Path, int] | None:
    """(file, pid) when one of ``pids`` holds one of ``paths`` open for writing now. Linux
    reports the open mode; elsewhere nothing is proved this way."""
    if not paths:
        return None
    wanted = {os.path.realpath(p): p for p in paths}
    for pid in sorted(pids):
        try:
            for handle in psutil.Process(pid).open_files():
                mode = getattr(handle, "mode", "r")
                if mode != "r" and (path := wanted.get(os.path.realpath(handle.path))) is not None:
                    return path, pid
        except psutil.Error:
            continue
    return None


class _Stopper:
    """Decides what to stop when a critical finding fires, and when (now, or at the restart).

    Only a run that received new data while watched can lead to a stop; findings of earlier
    runs wait (and act only if their run grows). With a launched or given trainer, only the
    runs it provably writes can stop it."""

    def __init__(self, options: WatchOptions, hooks: Hooks, guarded: Guarded | None,
                 kept: Callable[[RunState], str | None] = lambda state: None) -> None:
        self.options = options
        self.kept = kept  # what the stop message says of the run's snapshots (the one to keep)
        self.hooks = hooks
        self.guarded = guarded
        self.pending: dict[RunState, tuple[int, Finding]] = {}  # run -> (stop at this step, why)
        self.waiting: dict[RunState, Finding] = {}  # earlier runs' critical findings: act if the run grows
        self.done: set[RunState] = set()
        self.stopped: list[Target] = []  # each process is stopped once, whichever runs it writes
        self.threads: list[threading.Thread] = []

    @property
    def verb(self) -> str:
        return "would stop (--dry-run: nothing is sent)" if self.options.dry_run else "stopping"

    def on_critical(self, state: RunState, finding: Finding) -> None:
        if state in self.done or state in self.pending:
            return
        if not state.grew:
            self.waiting.setdefault(state, finding)
            return
        self.waiting.pop(state, None)
        run = state.run
        at = self._restart_step(state, finding) if finding.kind == Kind.PREDICTED_RESTART_BLOWUP else None
        last = state.analysis.last_step if state.analysis else None
        if at is not None and last is not None and at > last:
            self.pending[state] = (at, finding)
            state.urgent = True  # the stop waits on a step: analyse this run on every change
            when = "would stop" if self.options.dry_run else "will stop"
            self.hooks.action(run, "stop_planned", f"{run.name}: {when} the trainer when step {at} (the predicted "
                                                   "restart, after the cycle-minimum snapshot) is logged",
                              stop_at_step=at, dry_run=self.options.dry_run)
            return
        self._stop(state, finding)

    def _restart_step(self, state: RunState, finding: Finding) -> int | None:
        """The predicted restart's step: the cycle-minimum snapshot is saved before it is logged."""
        a = state.analysis
        if a is None:
            return None
        if a.schedule is not None and a.schedule.restarts is not None:
            return a.schedule.next_restart(finding.step)
        group = next((g for g in a.groups if g.name == finding.group), None)
        if group is None or not group.restarts:
            self.hooks.action(state.run, "note", f"{state.run.name}: cycle length unknown (no restart seen, no "
                                                 "logged config): the stop comes now instead of at the restart",
                              notify=False)
            return None
        starts = [group.cycles[0].start - 1, *group.restarts]  # (cycles are kept whole, the curves maybe not)
        length = starts[-1] - starts[-2]
        nxt = starts[-1] + length
        while nxt <= finding.step:
            nxt += length
        return nxt

    def _stop_command(self, state: RunState, finding: Finding, cmd: str, why: str) -> None:
        """--stop-cmd: the trainer runs elsewhere (Slurm, Kubernetes, a rented GPU); its command
        stops it. Run once per run, in the background; its exit status and output are reported."""
        run = state.run
        if self.options.dry_run:
            self.hooks.action(run, "stop_cmd", f"{run.name}: --dry-run: would run --stop-cmd after {finding.kind} "
                                               f"at step {finding.step}: {cmd} (nothing run)", dry_run=True)
            return
        self.hooks.action(run, "stop_cmd", f"{run.name}: running --stop-cmd after {finding.kind} at step "
                                           f"{finding.step} ({why}): {cmd}")

        def work() -> None:
            try:
                done = run_with_record(cmd, _stop_command_record(state, finding), timeout=STOP_CMD_TIMEOUT)
            except Exception as e:  # reported, never raised into the watcher
                self.hooks.action(run, "stop_cmd_result", f"{run.name}: --stop-cmd failed: {e}", notify=False)
                return
            output = " | ".join((done.stdout + done.stderr).strip().splitlines()[-5:])
            self.hooks.action(run, "stop_cmd_result", f"{run.name}: --stop-cmd exited with {done.returncode}"
                                                      + (f": {output}" if output else ""),
                              notify=False, returncode=done.returncode, output=output)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        self.threads.append(t)

    def tick(self, monitor: Monitor) -> None:
        for state, finding in list(self.waiting.items()):
            if state.grew:
                self.on_critical(state, finding)
        for state, (at, finding) in list(self.pending.items()):
            a = state.analysis
            if a is not None and a.last_step is not None and a.last_step >= at:
                del self.pending[state]
                self._stop(state, finding)

    def _target(self, state: RunState) -> tuple[Target | None, str]:
        if self.guarded is not None:
            mine, why = self.guarded.owns(state)
            return (self.guarded.target, why) if mine else (None, why)
        target, reasons = find_writer(state.run.writer_evidence())
        return target, "; ".join(reasons or ["no writer found"])

    def _stop(self, state: RunState, finding: Finding) -> None:
        run = state.run
        self.done.add(state)  # once per run: a stop, or the stop command, is never repeated
        target, why = self._target(state)
        cmd = self.options.stop_cmd
        if cmd and (target is None or self.options.stop_cmd_always):
            self._stop_command(state, finding, cmd, why if target is None else "--stop-cmd-always")
        if target is None:
            if not cmd:
                self.hooks.action(run, "no_stop", f"{run.name}: critical finding, but no trainer process provably "
                                                  f"writes this run, so nothing is stopped ({why})")
            return
        if any(t.identity == target.identity for t in self.stopped):
            return  # already being stopped for another of its runs
        self.hooks.action(run, "stop", f"{run.name}: {self.verb} the trainer after {finding.kind} at step "
                                       f"{finding.step}: {target.describe()}"
                                       + (f" (the run is its: {why})" if self.guarded is not None else "")
                                       + (f"; {kept}" if (kept := self.kept(state)) else ""),
                          pid=target.identity.pid, found_by=target.found_by, dry_run=self.options.dry_run)
        self.stopped.append(target)

        layout = LAYOUTS.get(state.analysis.trainer or "") if state.analysis else None
        saves = layout is not None and layout.saves_on_interrupt

        def work() -> None:
            stop(target, self.options.grace_int, self.options.grace_term, self.options.dry_run, log=self.hooks.say,
                 skip_sigint=f"{layout.title} saves the current model on Ctrl-C" if saves and layout else None)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        self.threads.append(t)


def _kept_snapshot(monitor: Monitor, state: RunState) -> str | None:
    """For the stop message: the snapshot to keep, as judged so far (None without --snapshots)."""
    if monitor.snapshots is None:
        return None
    monitor.judge_snapshots()
    kept = best_snapshot(monitor.snapshots.by_run.get(state.run.path, []))
    return f"keep {Path(kept.path).name}" if kept else "no snapshot of it is judged safe so far"


def _stop_command_record(state: RunState, finding: Finding) -> dict[str, Any]:
    return {"type": "finding", "time": time.time(), "run": state.run.name, "path": str(state.run.path),
            **finding.to_dict()}


def _given(pid: int) -> Target:
    """The process given with --pid, unless it is one that must never be stopped."""
    refusal = refuse_pid(pid)
    if refusal:
        raise _Refused(f"--pid {pid}: {refusal}; give the trainer's own pid")
    try:
        return Target(Identity.of(psutil.Process(pid)), "pid", "given with --pid")
    except psutil.Error as e:
        raise _Refused(f"--pid {pid}: {e}") from None


class _Refused(Exception):
    """The watch cannot start as asked (a refused pid, a command that does not start)."""


def watch_paths(
    paths: list[str | os.PathLike[str]],
    options: WatchOptions | None = None,
    *,
    tag_map: TagMap | None = None,
    thresholds: Thresholds | None = None,
    snapshots: list[str | os.PathLike[str]] | None = None,
    steps_per_epoch: int | None = None,
    safe_lr: float = DEFAULT_SAFE_LR,
    fried_loss: float = DEFAULT_FRIED_LOSS,
    fried_validation: float = DEFAULT_FRIED_VALIDATION,
    trainer: str | None = None,
    schedule: ScheduleOptions | None = None,
    storage_options: dict[str, Any] | None = None,
    events_out: str | None = None,
    exec_cmd: str | None = None,
    webhook: str | None = None,
    err: TextIO | None = None,
    out: TextIO | None = None,
) -> int:
    """``lrwatch watch`` from Python (``lrwatch.watch``): follow the runs under ``paths``,
    launching ``options.command`` if given, guard the trainer as ``options`` say, print the
    final audit to ``out`` (stdout) and lrwatch's lines to ``err`` (stderr), and return the
    exit code the CLI gives. Options are checked before anything starts: a bad value (or an
    ``events_out`` file that cannot be opened) raises ``OptionError``, a ``ValueError``
    naming it and what it takes."""
    options = options or WatchOptions()
    if webhook and (problem := webhook_problem(webhook)):
        raise OptionError(f"webhook (--webhook) {webhook}: {problem}")
    book = (SnapshotBook(list(snapshots), steps_per_epoch, safe_lr, fried_loss, fried_validation, storage_options)
            if snapshots else None)
    monitor = Monitor(list(paths), tag_map, thresholds, snapshots=book, trainer=trainer, schedule=schedule,
                      storage_options=storage_options)
    try:
        hooks = Hooks(events_out=events_out, exec_cmd=exec_cmd, webhook=webhook, err=err)
    except OSError as e:
        raise OptionError(f"events_out (--events-out) {events_out}: {e.strerror or e}") from None
    try:
        code = watch(monitor, options, hooks, out)
        for line in monitor.unread():
            hooks.say(f"lrwatch: {line}")
    finally:
        hooks.close()
    return code


def watch(monitor: Monitor, options: WatchOptions, hooks: Hooks, out: TextIO | None = None) -> int:
    """Follow the runs until the trainer ends (launched, given or found), ``until_idle``
    passes, or a signal ends the watch (lrwatch.signals); then print the final audit. Returns
    the audit's exit code, or 128 + the signal's number when a signal ended the watch."""
    with signals_end_the_watch():
        try:
            return _watch(monitor, options, hooks, out or sys.stdout)
        except Interrupted as e:  # before anything was launched: nothing is left unguarded
            hooks.say(f"lrwatch: {e.name} during start-up: stopped before watching anything")
            return e.exit_code


def _watch(monitor: Monitor, options: WatchOptions, hooks: Hooks, out: TextIO) -> int:
    try:
        given = _given(options.pid) if options.pid is not None else None
    except _Refused as e:
        hooks.say(f"lrwatch: {e}")
        return EXIT_UNREADABLE
    board = StatusBoard(hooks.err)
    watcher = Watcher(monitor, options.poll, hooks.say)
    watcher.start()
    for root in monitor.missing_roots():
        hooks.say(f"lrwatch: waiting for {monitor.as_given(root)} to appear")
    _announce(monitor, hooks, board)
    monitor.updates_analyses = True
    if monitor.snapshots is None and not options.tensorboard:  # (snapshot verdicts and the export need every point)
        monitor.read_budget, monitor.forget_every = READ_BUDGET, FORGET_EVERY
    _safely(monitor.poll, hooks)  # what is there before anything is launched: earlier runs
    monitor.start_live()
    monitor.analysis_budget = options.analysis_budget
    launched_proc: subprocess.Popen | None = None
    guarded = Guarded.given(given, monitor.roots) if given else None
    stopper = _Stopper(options, hooks, guarded, kept=lambda state: _kept_snapshot(monitor, state))
    writers: dict[RunState, Identity | None] = {}  # runs' writers (None: gone when first checked)
    watch_started = time.time()
    tried_writers: set[Path] = set()  # event files whose named writer was checked
    verdicts = _Verdicts(monitor, hooks, options.manifest)
    exporter = _Export(monitor, hooks) if options.tensorboard else None
    reason = "interrupted"
    ended_by: Interrupted | None = None
    failures = 0

    def survive(e: Exception, doing: str) -> None:
        """Never leave a trainer unguarded because of one bad pass: say it, back off, go on."""
        nonlocal failures
        failures += 1
        hooks.say(f"lrwatch: internal error while {doing} (the watch goes on): {type(e).__name__}: {e}")
        time.sleep(min(2.0, 0.1 * failures))

    try:  # from the launch on: a signal from here must say what becomes of the trainer
        if options.command:
            try:
                launched_proc = launch(options.command)
            except OSError as e:
                hooks.say(f"lrwatch: could not start {options.command[0]!r}: {e}")
                return EXIT_UNREADABLE
            guarded = stopper.guarded = Guarded(Target(Identity.of(psutil.Process(launched_proc.pid)), "launched",
                                                       "started by lrwatch", own_group=WINDOWS), launched=True,
                                                roots=monitor.roots, argv=options.command)
        hooks.say("lrwatch: watching " + ", ".join(monitor.as_given(r) for r in monitor.roots)
                  + (f"; guarding pid {guarded.target.identity.pid} ({guarded.target.found_by})" if guarded else ""))
        for state, finding in [(s, f) for s in monitor.runs if s.analysis for f in s.analysis.findings]:
            hooks.finding(state.run, finding, earlier=True)
            if options.kill_on_spike and stops_for(finding, options.kill_at):
                stopper.on_critical(state, finding)
        last_data = time.monotonic()
        last_full = time.monotonic()
        runs: dict[Path, set[Path]] = {}  # run -> its event files written since the last pass
        rediscover, snapshots_changed = True, True
        books_due, last_books = True, 0.0
        while True:
            try:
                points_before = monitor.points_read
                if rediscover or time.monotonic() - last_full > SAFETY_REPOLL:
                    new = monitor.poll()
                    last_full = time.monotonic()
                else:
                    new = monitor.poll(rediscover=False, written=runs) if runs else []
                changed = bool(runs or new or rediscover)
                if new or monitor.points_read != points_before or (runs and not watcher.remote):
                    last_data = time.monotonic()  # a remote pass that found nothing new is not data
                if new:
                    board.clear()
                for state, finding in new:
                    hooks.finding(state.run, finding)
                    if options.kill_on_spike and stops_for(finding, options.kill_at):
                        stopper.on_critical(state, finding)
                if changed:
                    stopper.tick(monitor)  # every pass: a stop planned for a step must not wait
                books_due = books_due or changed or snapshots_changed
                if books_due and (new or time.monotonic() - last_books >= BOOKKEEPING):
                    # What looks at every run (verdicts, export, notes, status lines, writers) runs at
                    # most every BOOKKEEPING s, not once per file event: with many runs written at
                    # once, it would cost more than the reading.
                    books_due, last_books = False, time.monotonic()
                    verdicts.update()
                    if exporter is not None:
                        exporter.update()
                    _announce(monitor, hooks, board)
                    board.draw(monitor.runs)
                    if guarded is None:
                        _track_writers(monitor, writers, tried_writers, watch_started)
                    else:  # its children, seen while they live (a writer may be one); a stop looks again
                        guarded.refresh()  # (a scan of every process: not once per file event)
            except Exception as e:
                survive(e, "watching")

            if launched_proc is not None and launched_proc.poll() is not None:
                reason = f"the trainer exited with code {launched_proc.returncode}"
                break
            if given is not None and given.identity.process() is None:
                reason = f"pid {given.identity.pid} exited"
                break
            if writers and all(w is None or w.process() is None for w in writers.values()):
                reason = "the trainer writing the run exited"
                break
            if options.until_idle is not None and time.monotonic() - last_data >= options.until_idle:
                reason = f"no new data for {options.until_idle:g} s"
                break
            try:
                runs, rediscover, snapshots_changed = watcher.wait(
                    timeout=0.5 if options.poll is None else min(0.5, options.poll))
            except Exception as e:
                survive(e, "waiting for changes")
                runs, rediscover, snapshots_changed = {}, True, True  # then look at everything again
            for path in monitor.stale_runs():  # points read, analysis put off: nothing to read
                runs.setdefault(path, set())
    except Interrupted as e:
        ended_by = e
        reason = _unguarded(e, launched_proc, given, writers, options.dry_run)
    finally:
        watcher.stop()
    board.clear()
    monitor.analysis_budget = 0.0  # the final pass analyses everything
    for state, finding in _safely(monitor.poll, hooks) or []:  # what the trainer wrote last
        hooks.finding(state.run, finding)
    _safely(verdicts.update, hooks)
    if exporter is not None:
        _safely(exporter.update, hooks)
    for t in stopper.threads:
        t.join(options.grace_int + options.grace_term + 10)
    hooks.say(f"lrwatch: stopped watching: {reason}")
    print(terminal_safe(render(monitor)), file=out, flush=True)
    if ended_by is not None:
        return ended_by.exit_code
    code = exit_code(monitor)
    if stopper.done and code in (EXIT_OK, EXIT_NOT_CHECKED):
        code = EXIT_CRITICAL  # a trainer was stopped (or would be) for a strong prediction: never a plain "ok"
    return EXIT_INTERNAL if failures and code in (EXIT_OK, EXIT_NOT_CHECKED) else code


def _unguarded(ended: Interrupted, launched: subprocess.Popen | None, given: Target | None,
               writers: dict[RunState, Identity | None], dry_run: bool) -> str:
    """Why the watch ended, and what became of each trainer it guarded: a launched trainer is
    handed SIGTERM and SIGHUP (the job is going away; lrwatch.signals), never Ctrl-C."""
    why = f"{ended.name} received"
    if launched is not None and launched.poll() is None:
        if ended.passed_on and not dry_run:
            try:
                os.killpg(launched.pid, ended.signum)  # POSIX only (passed_on): its own session
                return f"{why}; passed {ended.name} on to the trainer lrwatch launched (pid {launched.pid})"
            except OSError as e:
                why += f"; could not pass {ended.name} on ({e})"
        elif ended.passed_on:
            why += f"; --dry-run: {ended.name} not passed on"
        return f"{why}; the trainer lrwatch launched (pid {launched.pid}) keeps running, NO LONGER GUARDED"
    alive = [f"pid {given.identity.pid} (--pid)"] if given is not None and given.identity.process() else []
    alive += [f"pid {w.pid} (writing {s.run.name})" for s, w in writers.items() if w and w.process() is not None]
    return f"{why}; " + (f"{', '.join(alive)} keeps running, NO LONGER GUARDED" if alive else "no trainer was running")


def _safely(fn: Callable[[], Any], hooks: Hooks) -> Any:
    try:
        return fn()
    except Exception as e:
        hooks.say(f"lrwatch: internal error: {type(e).__name__}: {e}")
        return None


def _announce(monitor: Monitor, hooks: Hooks, board: StatusBoard) -> None:
    """Say once, as soon as it is known, what lrwatch could not check in a run and why, and
    which runs' folders went away."""
    while monitor.forgotten:
        board.clear()
        hooks.action(None, "note", f"{monitor.forgotten.pop(0)}: its folder is gone; forgotten (a run written "
                                   "there again is a new run)", notify=False)
    for root, why in monitor.root_errors.items():
        line = f"{monitor.as_given(root)}: {why} (the watch goes on and tries again)"
        if line not in monitor.announced:
            monitor.announced.add(line)
            board.clear()
            hooks.action(None, "note", line, notify=False)
    for state in monitor.runs:
        lines = []
        if state.error:
            lines.append(f"internal error on this run (the others are still watched): {state.error}")
        lines += [f"cannot read {p.name}: {why}" for p, why in state.run.file_errors.items()]
        a = state.analysis
        if a is not None and state.run.tags:
            lines += ["; ".join(mapping_hint(a.unrecognised))] if not a.checked else a.notes
        for line in lines:
            if line not in state.announced:
                state.announced.add(line)
                board.clear()
                hooks.action(state.run, "note", f"{state.run.name}: {line}", notify=False)


class _Verdicts:
    """Snapshot verdicts kept current: a line for each new or changed verdict, and the
    manifest rewritten (atomically) when anything changed."""

    def __init__(self, monitor: Monitor, hooks: Hooks, manifest: bool) -> None:
        self.monitor = monitor
        self.hooks = hooks
        self.manifest = manifest
        self.seen: dict[str, tuple] = {}

    def update(self) -> None:
        book = self.monitor.snapshots
        if book is None:
            return
        self.monitor.judge_snapshots()
        changed = False
        for snaps in [*book.by_run.values(), book.orphans]:
            for snap in snaps:
                key = (snap.step, snap.verdict, snap.reason)
                if self.seen.get(snap.path) == key:
                    continue
                self.seen[snap.path] = key
                changed = True
                self.hooks.action(None, "snapshot", f"snapshot {Path(snap.path).name} (step {snap.step}): "
                                                    f"{snap.verdict}: {snap.reason}", notify=False,
                                  snapshot=snap.to_dict())
        if changed and self.manifest:
            for problem in book.write_manifests():
                self.hooks.action(None, "note", problem, notify=False)


class _Export:
    """The TensorBoard export (``--tensorboard``) kept current; a failed write is said once."""

    def __init__(self, monitor: Monitor, hooks: Hooks) -> None:
        self.monitor, self.hooks, self.exporter = monitor, hooks, Exporter()

    def update(self) -> None:
        book = self.monitor.snapshots
        for problem in self.exporter.update(self.monitor.runs, book.by_run if book else None):
            self.hooks.action(None, "note", problem, notify=False)


def _track_writers(monitor: Monitor, writers: dict[RunState, Identity | None], tried: set[Path],
                   since: float) -> None:
    """Note the proved writer of each run that grew while watched (earlier runs do not keep
    the watch going); a name check, not a scan of every process's open files. A file whose
    named writer was not proved is not asked again: the process it names cannot become it."""
    for state in monitor.runs:
        if state in writers or not state.grew or not state.run.files:
            continue
        path = newest_first(state.run.files)[0]
        if path in tried or state.run.files[path].first_wall_time is None:
            continue
        tried.add(path)
        target, _ = writer_from_name(path, state.run.files[path].first_wall_time)
        if target is not None:
            writers[state] = target.identity
        elif _named_writer_gone(path, since):  # it wrote and exited between two passes: the run is over all the same
            writers[state] = None


def _named_writer_gone(path: Path, since: float) -> bool:
    """Whether ``path`` names a process of this host that is no longer running, and was written
    to while watched (``since``, wall clock): a run copied or synced in keeps its old times, and
    its long-gone writer says nothing about when the watch should end."""
    parsed = parse_writer_name(path)
    if parsed is None or not is_this_host(parsed[1]) or is_remote(path):
        return False
    try:
        if os.stat(path).st_mtime < since - CLOCK_SLACK:
            return False
    except OSError:
        return False
    try:
        return psutil.Process(parsed[2]).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False
