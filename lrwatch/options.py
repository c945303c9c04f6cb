"""The options of a watch, checked where they are made, so the library takes what the CLI takes
and no more; and lrwatch's exception for a bad option. Light on purpose: ``import lrwatch``
brings this in, not the watch loop (``lrwatch.watching``) and what it needs."""

from __future__ import annotations

from dataclasses import dataclass


class OptionError(ValueError):
    """An option out of its range or in a combination that means nothing; the message names the
    keyword, its flag and what it takes."""


# Of one core, for analyses; one growing run is analysed on every change. 2 %: reading 200 runs
# written at once takes ~6-7 % (bench/bench_load.py), and the whole watcher is meant to stay under 10 %.
ANALYSIS_BUDGET = 0.02
# What a stop acts on. confirm: evidence only (a critical finding: the loss or validation loss far
# above the run's own best, a non-finite value, d running away after its warm-up). predict: also a
# strong prediction (a restart predicted far above the highest d*lr after d's warm-up), the stop
# waiting until the predicted restart's step is logged, so the cycle-minimum snapshot is saved.
KILL_AT = ("confirm", "predict")



@dataclass
class WatchOptions:
    poll: float | None = None  # seconds between polls; None: native file-system events
    kill_on_spike: bool = False
    kill_at: str = "confirm"  # confirm | predict (KILL_AT)
    pid: int | None = None
    command: list[str] | None = None
    dry_run: bool = False
    grace_int: float = 10.0
    grace_term: float = 10.0
    until_idle: float | None = None
    manifest: bool = True  # keep lrwatch-snapshots.json in each snapshot folder up to date
    tensorboard: bool = False  # keep <run folder>/lrwatch/ current (lrwatch.tbexport)
    stop_cmd: str | None = None  # run when a stop is due and no local process provably writes the run
    stop_cmd_always: bool = False  # ... or for every stop that is due
    analysis_budget: float = ANALYSIS_BUDGET  # share of one core for analyses (Monitor._throttled)

    def __post_init__(self) -> None:
        """Checked here, so the library takes what the CLI takes and no more (each message names
        the keyword and its flag)."""
        if self.kill_at not in KILL_AT:
            raise OptionError(f"kill_at (--kill-at) must be one of {', '.join(KILL_AT)}, not {self.kill_at!r}")
        if self.kill_at != "confirm" and not self.kill_on_spike:
            raise OptionError(f"kill_at={self.kill_at!r} (--kill-at) goes with kill_on_spike (--kill-on-spike)")
        if (self.stop_cmd or self.stop_cmd_always) and not self.kill_on_spike:
            raise OptionError("stop_cmd (--stop-cmd) goes with kill_on_spike (--kill-on-spike)")
        if self.stop_cmd_always and not self.stop_cmd:
            raise OptionError("stop_cmd_always (--stop-cmd-always) needs stop_cmd (--stop-cmd CMD)")
        if self.poll is not None and not self.poll > 0:
            raise OptionError(f"poll (--poll) must be a positive number of seconds, not {self.poll}")
        if not (self.grace_int >= 0 and self.grace_term >= 0):
            raise OptionError(f"grace_int and grace_term (--grace-int, --grace-term) take seconds, 0 or more, not "
                             f"{self.grace_int} and {self.grace_term}")
        if self.until_idle is not None and not self.until_idle > 0:
            raise OptionError(f"until_idle (--until-idle) takes positive seconds, not {self.until_idle}")
        if self.pid is not None and self.pid <= 0:
            raise OptionError(f"pid (--pid) must be a process id, not {self.pid}")
        if not 0 < self.analysis_budget <= 1:
            raise OptionError(f"analysis_budget is a share of one core, above 0 and at most 1, "
                              f"not {self.analysis_budget}")
