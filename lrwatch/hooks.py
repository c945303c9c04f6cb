"""Telling people: finding lines on stderr, JSON lines to a file, a command, a webhook.

Hooks run in the background; a failing hook is reported on stderr and never
stops or slows the watcher.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any, TextIO

from lrwatch.analysis import Finding
from lrwatch.runs import Run

HOOK_TIMEOUT = 30.0


def finding_record(run: Run, finding: Finding) -> dict[str, Any]:
    return {"type": "finding", "time": time.time(), "run": run.name, "path": str(run.path), **finding.to_dict()}


def finding_line(run: Run, finding: Finding) -> str:
    where = f" [{finding.group}]" if finding.group else ""
    return f"lrwatch: {finding.severity.upper()} {run.name} step {finding.step}: {finding.kind}{where}: {finding.message}"


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
        with self._lock:
            print(line, file=self.err, flush=True)

    def record(self, record: dict[str, Any]) -> None:
        """One JSON line per event, written whole and flushed (readers never see half a line)."""
        if self._events is not None:
            with self._lock:
                self._events.write(json.dumps(record, default=str) + "\n")
                self._events.flush()

    def finding(self, run: Run, finding: Finding) -> None:
        self.say(finding_line(run, finding))
        record = finding_record(run, finding)
        self.record(record)
        if self.exec_cmd:
            self._background(self._run_exec, record)
        if self.webhook:
            self._background(self._post, record, finding_line(run, finding))

    def action(self, run: Run | None, what: str, **details: Any) -> None:
        self.say(f"lrwatch: {what}")
        self.record({"type": "action", "time": time.time(), "run": run.name if run else None, "message": what,
                     **details})

    def _background(self, fn, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _run_exec(self, record: dict[str, Any]) -> None:
        env = dict(os.environ)
        env.update({
            "LRWATCH_KIND": record["kind"], "LRWATCH_SEVERITY": record["severity"],
            "LRWATCH_GROUP": record["group"] or "", "LRWATCH_STEP": str(record["step"]),
            "LRWATCH_MESSAGE": record["message"], "LRWATCH_RUN": record["run"], "LRWATCH_PATH": record["path"],
            "LRWATCH_JSON": json.dumps(record, default=str),
        })
        try:
            done = subprocess.run(self.exec_cmd, shell=True, env=env, timeout=HOOK_TIMEOUT,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
                self.say(f"lrwatch: --exec hook exited with {done.returncode}: {tail[0]}")
        except (OSError, subprocess.SubprocessError) as e:
            self.say(f"lrwatch: --exec hook failed: {e}")

    def _post(self, record: dict[str, Any], line: str) -> None:
        # Discord reads "content", Slack reads "text"; both ignore the other fields.
        body = json.dumps({"content": line, "text": line, "lrwatch": record}, default=str).encode()
        req = urllib.request.Request(self.webhook, data=body, headers={"Content-Type": "application/json",
                                                                       "User-Agent": "lrwatch"})
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
