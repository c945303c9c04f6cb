"""Which process is the trainer, and stopping it safely.

A process is only ever signalled if lrwatch launched it, was given its pid, or
proved it the writer of the run's event files (this host by its full name, the
pid alive, the process older than the file and than the file's first record),
and only while its identity (pid + create time) is still the one that was found.
A process that merely has the file open (TensorBoard, ``tail -f``) is never a
candidate. Stopping escalates SIGINT -> SIGTERM -> SIGKILL over the trainer's
process tree (with a launcher parent such as ``accelerate launch``, recognised by
its executable or module, never by a pattern in a command line); on Windows,
CTRL_BREAK (for a process group lrwatch launched), then TerminateProcess.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

WINDOWS = os.name == "nt"
# events.out.tfevents.<unix time>.<hostname, may contain dots>.<pid>.<n><suffix>
_WRITER_NAME = re.compile(r"tfevents\.(?P<time>\d+)\.(?P<host>.+)\.(?P<pid>\d+)\.(?P<n>\d+)(?P<suffix>[^/\\]*)$")
# Parents that only launch the trainer: stopping the trainer alone would leave them (or restart it).
# Recognised by what they are: the program they run (console script or executable) ...
LAUNCHER_PROGRAMS = {"torchrun": None, "deepspeed": None, "accelerate": "launch"}  # name -> required subcommand
# ... or the module given to ``python -m``.
LAUNCHER_MODULES = {"torch.distributed.run", "torch.distributed.launch", "accelerate.commands.launch",
                    "deepspeed.launcher.runner"}
# What the console scripts that pip installs for them import: on Linux a console script runs as
# ``python /venv/bin/torchrun``, so a script is a launcher only if it is one of these entry points.
LAUNCHER_ENTRY_POINTS = re.compile(r"^\s*from\s+(torch\.distributed\.run|accelerate\.commands\.accelerate_cli|"
                                   r"deepspeed\.launcher\.runner)\s+import\b", re.M)
# A process must be older than its event file; allow for the name's whole-second timestamp.
CLOCK_SLACK = 2.0


@dataclass(frozen=True)
class Identity:
    pid: int
    create_time: float

    @classmethod
    def of(cls, proc: psutil.Process) -> Identity:
        return cls(proc.pid, proc.create_time())

    def process(self) -> psutil.Process | None:
        """The live process with this identity, or None (gone, or the pid was reused)."""
        try:
            proc = psutil.Process(self.pid)
            if proc.create_time() != self.create_time or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None


@dataclass
class Target:
    identity: Identity
    found_by: str  # launched | pid | writer (proved from the event file's name and records)
    detail: str
    own_group: bool = False  # launched by lrwatch in its own process group (Windows CTRL_BREAK)

    def describe(self) -> str:
        proc = self.identity.process()
        cmd = _cmdline(proc) if proc else "(exited)"
        return f"pid {self.identity.pid} ({cmd}), {self.found_by}: {self.detail}"


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:160] or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"


def parse_writer_name(path: Path) -> tuple[int, str, int] | None:
    """(file creation time, host, pid) from an event file's name."""
    m = _WRITER_NAME.search(path.name)
    if not m:
        return None
    return int(m["time"]), m["host"], int(m["pid"])


def is_this_host(host: str) -> bool:
    """The whole name must match (the writer uses ``socket.gethostname()``): ``vm`` is not
    ``vm.cluster-b.example``."""
    return host.lower() in _this_host_names()


@functools.lru_cache(maxsize=1)
def _this_host_names() -> frozenset[str]:
    """Asked once: ``getfqdn`` may ask DNS, and the watcher checks writers on every change."""
    return frozenset({socket.gethostname().lower(), socket.getfqdn().lower()})


def writer_from_name(path: Path, first_wall_time: float | None = None) -> tuple[Target | None, str]:
    """The writer named in an event file's name, confirmed: this host, alive, older than the
    file and than its first record (``first_wall_time``, when known)."""
    parsed = parse_writer_name(path)
    if parsed is None:
        return None, f"{path.name}: no writer pid in the name"
    stamp, host, pid = parsed
    if not is_this_host(host):
        return None, f"{path.name}: written on host {host!r}, not this machine"
    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
        status = proc.status()
    except psutil.NoSuchProcess:
        return None, f"{path.name}: writer pid {pid} is not running"
    except psutil.AccessDenied:
        return None, f"{path.name}: pid {pid} belongs to another user"
    if status == psutil.STATUS_ZOMBIE:
        return None, f"{path.name}: writer pid {pid} has exited"
    if pid in _protected():
        return None, f"{path.name}: pid {pid} is lrwatch itself, its parent or init; never a target"
    if created > stamp + CLOCK_SLACK:
        return None, (f"{path.name}: pid {pid} started {created - stamp:.0f} s after the file was created, "
                      "so it is not the writer (pid reused)")
    if first_wall_time is not None and created > first_wall_time + CLOCK_SLACK:
        return None, (f"{path.name}: pid {pid} started {created - first_wall_time:.0f} s after the file's first "
                      "record was written, so it is not the writer")
    return Target(Identity(pid, created), "writer", f"named in {path.name}"), "ok"


def newest_first(event_files: Iterable[Path]) -> list[Path]:
    """Event files by the creation time in their names, newest first (unnamed ones last). Most
    runs have one file: it is returned without parsing its name (the watcher asks for 200 runs
    four times a second)."""
    files = list(event_files)
    if len(files) < 2:
        return files
    return sorted(files, key=lambda p: (parse_writer_name(p) or (0,))[0], reverse=True)


def find_writer(event_files: dict[Path, float | None]) -> tuple[Target | None, list[str]]:
    """The process writing a run (event file -> its first record's wall time), newest file
    first; with the reason each file was ruled out. Only a writer named in a file's name can
    be proved: a process that has the file open may just be reading it (TensorBoard)."""
    reasons: list[str] = []
    for path in newest_first(event_files):
        target, why = writer_from_name(path, event_files[path])
        if target:
            return target, reasons
        reasons.append(why)
    return None, reasons


def _protected() -> set[int]:
    """lrwatch itself, its ancestors and init: never part of a tree to stop."""
    pids = {0, 1, os.getpid()}
    try:
        pids |= {p.pid for p in psutil.Process().parents()}
    except psutil.Error:
        pass
    return pids


def refuse_pid(pid: int) -> str | None:
    """Why ``--pid`` must not be ``pid`` (init, lrwatch itself, one of its ancestors), or None."""
    if pid <= 1:
        return f"pid {pid} is init (or not a process): stopping it would stop everything"
    if pid == os.getpid():
        return f"pid {pid} is lrwatch itself"
    if pid in _protected():
        return f"pid {pid} is one of lrwatch's parents (the shell or terminal it runs in)"
    return None


def _program(arg: str) -> str:
    name = re.split(r"[/\\]", arg)[-1].lower()
    for suffix in (".exe", ".py"):
        name = name.removesuffix(suffix)
    return name


def is_launcher(proc: psutil.Process) -> bool:
    """``accelerate launch``, ``torchrun``, ``deepspeed`` or ``python -m torch.distributed.run``
    (and the like), recognised by the program or module they run. A script whose name only
    contains such a word (``sweep_torchrun.py``) is not one."""
    try:
        argv = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    if not argv:
        return False
    args = argv[1:]
    if _program(argv[0]).startswith("python"):  # python [-opts] (script | -m module) ...
        while args and args[0].startswith("-") and args[0] != "-m":
            args = args[1:]
        if len(args) >= 2 and args[0] == "-m":
            return args[1] in LAUNCHER_MODULES
        if not args or not _is_launcher_entry_point(proc, args[0]):
            return False  # a script: a launcher only as an installed entry point, never by its name
        argv, args = args, args[1:]
    name = _program(argv[0])
    if name not in LAUNCHER_PROGRAMS:
        return False
    sub = LAUNCHER_PROGRAMS[name]
    return sub is None or (bool(args) and args[0] == sub)


def _is_launcher_entry_point(proc: psutil.Process, script: str) -> bool:
    """Whether the script python runs is a launcher's console script: ``/venv/bin/torchrun``,
    read from the file, or pip's ``torchrun.exe`` on Windows. ``torchrun.py``, or a sweep
    driver named ``torchrun``, is not one."""
    if script.lower().endswith((".py", ".pyw")):
        return False
    if script.lower().endswith(".exe"):  # Windows: pip's launcher exe, which python runs as its script
        return _program(script) in LAUNCHER_PROGRAMS
    try:
        with open(os.path.join(proc.cwd(), script), "rb") as fh:
            head = fh.read(4096).decode("utf-8", "replace")
    except (OSError, psutil.Error):
        return False
    return LAUNCHER_ENTRY_POINTS.search(head) is not None


def descendants(root: Identity) -> set[int]:
    """Pids of ``root`` and everything below it, now."""
    proc = root.process()
    if proc is None:
        return set()
    try:
        return {proc.pid, *(c.pid for c in proc.children(recursive=True))}
    except psutil.Error:
        return {proc.pid}


def ignores_sigint(pid: int) -> bool:
    """Whether the process ignores SIGINT (started in the background by a shell): Linux tells."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def process_tree(target: Target) -> list[Identity]:
    """The trainer and its children; for a writer found from its file, also a launcher parent
    with all of its children (deepest first). A launched or given process's tree never reaches
    above it."""
    root = target.identity.process()
    if root is None:
        return []
    protected = _protected()
    top = root
    if target.found_by == "writer":
        for parent in root.parents():
            if parent.pid in protected or not is_launcher(parent):
                break
            top = parent
    members = [top]
    try:
        members += top.children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    out = []
    for proc in reversed(members):  # children before parents
        if proc.pid in protected:
            continue
        try:
            out.append(Identity.of(proc))
        except psutil.NoSuchProcess:
            continue
    return out


@dataclass
class StopResult:
    signalled: list[tuple[int, str]] = field(default_factory=list)  # (pid, signal name)
    refused: list[str] = field(default_factory=list)  # identity changed: not signalled
    exited: bool = False


def stop(
    target: Target,
    grace_int: float = 10.0,
    grace_term: float = 10.0,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
    skip_sigint: str | None = None,
) -> StopResult:
    """Stop ``target``'s tree: SIGINT, then SIGTERM, then SIGKILL, each after its grace period.
    ``skip_sigint`` (why) starts at SIGTERM: a trainer that saves its weights on Ctrl-C would
    save the very weights the stop is about."""
    result = StopResult()
    tree = process_tree(target)
    if not tree:
        log(f"lrwatch: {target.describe()}: already gone, nothing to stop")
        result.exited = True
        return result
    names = ", ".join(f"{i.pid}" for i in tree)
    first = "SIGTERM" if skip_sigint else "SIGINT"
    if dry_run:
        log(f"lrwatch: --dry-run: would send {first} to pid(s) {names} (nothing sent)")
        return result
    phases: list[tuple[str, float]] = [("SIGINT", grace_int), ("SIGTERM", grace_term), ("SIGKILL", 0.0)]
    if skip_sigint:
        log(f"lrwatch: {skip_sigint}: sending SIGTERM, not SIGINT")
        phases = phases[1:]
    elif not WINDOWS and ignores_sigint(target.identity.pid):
        log(f"lrwatch: pid {target.identity.pid} ignores SIGINT (started in the background by a shell?): "
            "sending SIGTERM instead")
        phases = phases[1:]
    for phase, grace in phases:
        alive = []
        for ident in tree:
            proc = ident.process()
            if proc is None:
                if _pid_reused(ident):
                    result.refused.append(f"pid {ident.pid}: now a different process; not signalled")
                continue
            if _send(proc, phase, target.own_group and ident == target.identity):
                result.signalled.append((ident.pid, phase))
                alive.append(proc)
        if not alive:
            break
        log(f"lrwatch: sent {phase} to pid(s) {', '.join(str(p.pid) for p in alive)}")
        if _wait_gone(alive, grace if grace > 0 else 5.0):
            break
    result.exited = all(i.process() is None for i in tree)
    for line in result.refused:
        log(f"lrwatch: {line}")
    return result


def _wait_gone(procs: list[psutil.Process], timeout: float) -> bool:
    """Wait until every process has exited. A zombie has exited (its parent just has not
    reaped it yet), which psutil.wait_procs would keep waiting for."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() >= deadline:
            return not alive
        time.sleep(0.05)


def _pid_reused(ident: Identity) -> bool:
    try:
        return psutil.Process(ident.pid).create_time() != ident.create_time
    except psutil.Error:
        return False


def _send(proc: psutil.Process, phase: str, own_group: bool) -> bool:
    try:
        if phase == "SIGKILL":
            proc.kill()
        elif phase == "SIGTERM":
            proc.terminate()
        elif not WINDOWS:
            proc.send_signal(signal.SIGINT)
        elif own_group:  # Windows: Ctrl-Break reaches only a process group lrwatch created
            proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
        else:
            return False  # no interrupt on Windows for processes lrwatch did not launch: go on to terminate
        return True
    except psutil.NoSuchProcess:
        return False
