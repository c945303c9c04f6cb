"""Telling people: lines on stderr, JSON lines to a file, a command, a webhook.

Findings and actions (a trainer stopped, a stop planned or impossible) reach every
hook; each record is serialised by :mod:`lrwatch.output`, so it is always valid JSON.
Hooks run in the background; a failing hook is reported on stderr and never stops
or slows the watcher.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from typing import Any, TextIO

from lrwatch.analysis import Finding
from lrwatch.output import dumps, terminal_safe
from lrwatch.runs import Run

HOOK_TIMEOUT = 30.0


def webhook_problem(url: str) -> str | None:
    """Why ``url`` cannot be a webhook (checked before the watch starts), or None."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as e:
        return f"not a URL ({e})"
    if parts.scheme not in ("http", "https"):
        return f"only http:// and https:// URLs are posted to, not {parts.scheme + '://' if parts.scheme else url!r}"
    if not parts.hostname:
        return "the URL has no host"
    return None


def finding_line(run: Run, finding: Finding) -> str:
    where = f" [{finding.group}]" if finding.group else ""
    return (f"lrwatch: {finding.severity.upper()} {run.name} step {finding.step}: "
            f"{finding.kind}{where}: {finding.message}")


# Characters of one LRWATCH_* variable: Linux refuses a command whose single argument or variable
# exceeds 128 KiB (E2BIG), and a tag from a log may be that long. LRWATCH_JSON is cut the same way,
# so it stays whole only when it fits; a longer value ends in "..." and LRWATCH_TRUNCATED names it.
MAX_ENV_VALUE = 32 * 1024


def _env_value(value: object) -> str:
    """Environment values cannot hold NUL; names from logs may."""
    return "" if value is None else str(value).replace("\x00", "\\x00")


def _record_env(record: dict[str, Any]) -> dict[str, str]:
    values = {
        "LRWATCH_TYPE": record["type"], "LRWATCH_KIND": record["kind"],
        "LRWATCH_SEVERITY": record.get("severity"), "LRWATCH_GROUP": record.get("group"),
        "LRWATCH_STEP": record.get("step"), "LRWATCH_MESSAGE": record["message"],
        "LRWATCH_RUN": record["run"], "LRWATCH_PATH": record["path"], "LRWATCH_JSON": dumps(record),
    }
    env = {k: _env_value(v) for k, v in values.items()}
    cut = sorted(k for k, v in env.items() if len(v) > MAX_ENV_VALUE)
    for k in cut:
        env[k] = env[k][: MAX_ENV_VALUE - 3] + "..."
    if cut:
        env["LRWATCH_TRUNCATED"] = " ".join(cut)
    return env


def run_with_record(cmd: str, record: dict[str, Any], timeout: float = HOOK_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``cmd`` through the shell with the record in ``LRWATCH_*`` variables (--exec, --stop-cmd)."""
    env = {k: _env_value(v) for k, v in os.environ.items()} | _record_env(record)
    return subprocess.run(cmd, shell=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")


class Hooks:
    def __init__(self, events_out: str | None = None, exec_cmd: str | None = None, webhook: str | None = None,
                 err: TextIO | None = None) -> None:
        self.err = err or sys.stderr
        self.exec_cmd = exec_cmd
        self.webhook = webhook
        self._events = open(events_out, "a", encoding="utf-8") if events_out else None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def say(self, line: str) -> None:
        """A line for the person at the terminal; names from logs are shown escaped."""
        with self._lock:
            print(terminal_safe(line), file=self.err, flush=True)

    def record(self, record: dict[str, Any]) -> None:
        """One JSON line per event, written whole and flushed (readers never see half a line)."""
        if self._events is not None:
            with self._lock:
                try:
                    self._events.write(dumps(record) + "\n")
                    self._events.flush()
                except OSError as e:
                    print(terminal_safe(f"lrwatch: --events-out write failed: {e}"), file=self.err, flush=True)

    def finding(self, run: Run, finding: Finding, earlier: bool = False) -> None:
        """A new finding; ``earlier``: it was in the logs before the watch started."""
        line = finding_line(run, finding) + (" (earlier run: in the logs before lrwatch started)" if earlier else "")
        self.say(line)
        self._deliver({"type": "finding", "time": time.time(), "run": run.name, "path": str(run.path),
                       "earlier_run": earlier, **finding.to_dict()}, line)

    def action(self, run: Run | None, kind: str, what: str, notify: bool = True, **details: Any) -> None:
        """Something lrwatch did or decided (``kind``: stop, stop_planned, no_stop, snapshot, ...).
        With ``notify``, it also reaches --exec and --webhook."""
        line = f"lrwatch: {what}"
        self.say(line)
        record = {"type": "action", "kind": kind, "time": time.time(), "run": run.name if run else None,
                  "path": str(run.path) if run else None, "message": what, **details}
        if notify:
            self._deliver(record, line)
        else:
            self.record(record)

    def _deliver(self, record: dict[str, Any], line: str) -> None:
        self.record(record)
        if self.exec_cmd:
            self._background(self._run_exec, record)
        if self.webhook:
            self._background(self._post, record, line)

    def _background(self, fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _run_exec(self, record: dict[str, Any]) -> None:
        try:
            done = run_with_record(self.exec_cmd or "", record)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
                self.say(f"lrwatch: --exec hook exited with {done.returncode}: {tail[0]}")
        except Exception as e:  # any failure of the hook is reported, never raised into the watcher
            self.say(f"lrwatch: --exec hook failed: {e}")

    def _post(self, record: dict[str, Any], line: str) -> None:
        # Discord reads "content", Slack reads "text"; both ignore the other fields.
        body = dumps({"content": line, "text": line, "lrwatch": record}).encode()
        req = urllib.request.Request(self.webhook or "", data=body,
                                     headers={"Content-Type": "application/json", "User-Agent": "lrwatch"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
        except Exception as e:  # any network or HTTP failure: report, never raise
            self.say(f"lrwatch: --webhook failed: {e}")

    def close(self, wait: float = 5.0) -> None:
        deadline = time.monotonic() + wait
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._events is not None:
            self._events.close()
