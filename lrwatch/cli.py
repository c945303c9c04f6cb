"""The command line: a thin layer over the library. ``lrwatch PATH`` watches; ``lrwatch audit`` reports."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from lrwatch import __version__
from lrwatch.analysis import Thresholds
from lrwatch.monitor import Monitor
from lrwatch.report import exit_code, render, to_json
from lrwatch.snapshots import DEFAULT_SAFE_LR, MANIFEST, SnapshotBook, best_safe
from lrwatch.tags import DEFAULT_DLR_TAGS, DEFAULT_LOSS_TAGS, DEFAULT_LR_TAGS, TagMap

_DEFAULTS = Thresholds()


class _WatchByDefault(click.Group):
    """``lrwatch logs/`` means ``lrwatch watch logs/``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["watch", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_WatchByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lrwatch")
def main() -> None:
    """Watch TensorBoard logs of Prodigy / D-Adaptation runs with cyclic lr schedules:
    predict the d*lr blow-up before the restart, flag it or stop the trainer.

    \b
      lrwatch logs/ --kill-on-spike      watch (the default command)
      lrwatch audit logs/                report on finished runs
    """


# (Thresholds field, type, help): each becomes --field-name with the field's default.
THRESHOLD_OPTIONS: list[tuple[str, type, str]] = [
    ("risk_warning", float, "Warn when d now x the next cycle's peak lr exceeds the highest d*lr so far by this ratio."),
    ("risk_critical", float, "Critical at this predicted ratio."),
    ("runaway_window", int, "Steps over which d's growth is measured."),
    ("runaway_warning", float, "Warn when d grows by this factor within the window (after d's warm-up)."),
    ("runaway_critical", float, "Critical at this growth factor."),
    ("loss_divergence", float, "Critical when the smoothed loss reaches this multiple of its best."),
    ("restart_spike", float, "Critical when d*lr right after a restart is this multiple of the highest before."),
    ("restart_jump", float, "An lr rise of this fraction of the cycle's peak, from below it, is a restart."),
]


def analysis_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Tag mapping and thresholds, shared by audit and watch."""
    options = [
        click.option("--lr-tag", "lr_tags", multiple=True, metavar="PATTERN",
                     help=f"lr tag pattern, {{group}} = one path segment (repeatable). Default: {', '.join(DEFAULT_LR_TAGS)}"),
        click.option("--dlr-tag", "dlr_tags", multiple=True, metavar="PATTERN",
                     help=f"d*lr tag pattern (repeatable). Default: {', '.join(DEFAULT_DLR_TAGS)}"),
        click.option("--loss-tag", "loss_tags", multiple=True, metavar="TAG",
                     help=f"loss tag, first present wins (repeatable). Default: {', '.join(DEFAULT_LOSS_TAGS)}"),
        *(click.option("--" + name.replace("_", "-"), type=kind, default=getattr(_DEFAULTS, name),
                       show_default=True, help=text) for name, kind, text in THRESHOLD_OPTIONS),
    ]
    for option in reversed(options):
        f = option(f)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["tag_map"] = TagMap(
            lr=tuple(kwargs.pop("lr_tags")) or DEFAULT_LR_TAGS,
            dlr=tuple(kwargs.pop("dlr_tags")) or DEFAULT_DLR_TAGS,
            loss=tuple(kwargs.pop("loss_tags")) or DEFAULT_LOSS_TAGS,
        )
        try:
            kwargs["thresholds"] = _checked(Thresholds(**{name: kwargs.pop(name) for name, _, _ in THRESHOLD_OPTIONS}))
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        return f(*args, **kwargs)

    return wrapper


def _checked(th: Thresholds) -> Thresholds:
    if th.risk_critical < th.risk_warning or th.runaway_critical < th.runaway_warning:
        raise ValueError("a critical threshold must not be below its warning threshold")
    if th.runaway_window < 1 or min(th.risk_warning, th.runaway_warning, th.loss_divergence, th.restart_spike) <= 1:
        raise ValueError("ratios must be above 1 and the window at least 1 step")
    if not 0 < th.restart_jump <= 1:
        raise ValueError("--restart-jump must be in (0, 1]")
    return th


def snapshot_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Snapshot verdicts, shared by audit and watch."""
    options = [
        click.option("--snapshots", "snapshot_dirs", multiple=True, metavar="DIR",
                     type=click.Path(file_okay=False, path_type=str),
                     help="Folder of saved snapshots to judge (repeatable)."),
        click.option("--steps-per-epoch", type=click.IntRange(min=1),
                     help="For epoch-numbered snapshots, when no snapshot's metadata tells."),
        click.option("--safe-lr", type=click.FloatRange(0, 1, min_open=True), default=DEFAULT_SAFE_LR,
                     show_default=True, help="A save is at a cycle minimum when its last update's lr was at most "
                                             "this fraction of the cycle's peak."),
        click.option("--no-manifest", is_flag=True,
                     help=f"Do not write {MANIFEST} into the snapshot folders."),
    ]
    for option in reversed(options):
        f = option(f)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        dirs = kwargs.pop("snapshot_dirs")
        spe, safe_lr = kwargs.pop("steps_per_epoch"), kwargs.pop("safe_lr")
        kwargs["book"] = SnapshotBook(list(dirs), spe, safe_lr) if dirs else None
        return f(*args, **kwargs)

    return wrapper


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema in the README) instead of tables.")
@click.option("--best", is_flag=True, help="Print only the path of the newest safe snapshot (needs --snapshots).")
@snapshot_options
@analysis_options
def audit(paths: tuple[str, ...], as_json: bool, best: bool, no_manifest: bool, book: SnapshotBook | None,
          tag_map: TagMap, thresholds: Thresholds) -> None:
    """Report on runs under PATHS: cycles, d growth, findings, snapshot verdicts.

    Exit code 0: no critical finding; 1: a run has a critical finding; 2: bad usage,
    or a path that is missing or holds no readable run. With --best: 0 and the path,
    or 1 and nothing on stdout when no snapshot is safe.
    """
    if best and book is None:
        raise click.UsageError("--best needs --snapshots DIR")
    monitor = Monitor(list(paths), tag_map, thresholds, snapshots=book)
    _poll_with_progress(monitor)
    monitor.judge_snapshots()
    if book is not None and not no_manifest:
        book.write_manifests()
    if best:
        pick = best_safe([s for snaps in book.by_run.values() for s in snaps])
        if pick is None:
            click.echo("lrwatch: no safe snapshot", err=True)
            sys.exit(1)
        click.echo(pick.path)
        sys.exit(0)
    click.echo(to_json(monitor) if as_json else render(monitor))
    sys.exit(exit_code(monitor))


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--kill-on-spike", is_flag=True, help="Stop the trainer when a critical finding fires.")
@click.option("--kill-at", type=click.Choice(["now", "restart"]), default="now", show_default=True,
              help="Stop at once, or just before the predicted restart (after the cycle-minimum snapshot).")
@click.option("--pid", type=int, help="The trainer's pid (else: the command after --, else the run's writer).")
@click.option("--dry-run", is_flag=True, help="Say what would be stopped; stop nothing.")
@click.option("--grace-int", type=float, default=10.0, show_default=True,
              help="Seconds after SIGINT before SIGTERM.")
@click.option("--grace-term", type=float, default=10.0, show_default=True,
              help="Seconds after SIGTERM before SIGKILL.")
@click.option("--poll", type=float, metavar="SECONDS",
              help="Poll every SECONDS instead of native file events (network filesystems).")
@click.option("--until-idle", type=float, metavar="SECONDS",
              help="Finish (final audit, exit code) after SECONDS without new data.")
@click.option("--events-out", type=click.Path(dir_okay=False), metavar="FILE",
              help="Append every finding and action as a JSON line to FILE.")
@click.option("--exec", "exec_cmd", metavar="CMD",
              help="Run CMD (through the shell) for every finding, with LRWATCH_* environment variables.")
@click.option("--webhook", metavar="URL", help="POST every finding as JSON (Discord and Slack accept it).")
@snapshot_options
@analysis_options
def watch(paths: tuple[str, ...], kill_on_spike: bool, kill_at: str, pid: int | None, dry_run: bool,
          grace_int: float, grace_term: float, poll: float | None, until_idle: float | None,
          events_out: str | None, exec_cmd: str | None, webhook: str | None, no_manifest: bool,
          book: SnapshotBook | None, tag_map: TagMap, thresholds: Thresholds) -> None:
    """Follow the runs under PATHS as they are written (PATHS may not exist yet).

    \b
    Launch and guard a trainer:   lrwatch logs/ --kill-on-spike -- accelerate launch train_network.py ...
    Guard a running trainer:      lrwatch logs/ --kill-on-spike
    Ends when the trainer exits (or --until-idle), printing the final audit; exit codes as audit.
    Ctrl-C stops lrwatch, never the trainer.
    """
    from lrwatch.hooks import Hooks
    from lrwatch.watch import WatchOptions, watch as run_watch

    paths, command = _split_command(paths)
    if poll is not None and poll <= 0:
        raise click.UsageError("--poll must be a positive number of seconds")
    if kill_at == "restart" and not kill_on_spike:
        raise click.UsageError("--kill-at restart goes with --kill-on-spike")
    options = WatchOptions(poll=poll, kill_on_spike=kill_on_spike, kill_at=kill_at, pid=pid, command=command,
                           dry_run=dry_run, grace_int=grace_int, grace_term=grace_term, until_idle=until_idle,
                           manifest=not no_manifest)
    hooks = Hooks(events_out=events_out, exec_cmd=exec_cmd, webhook=webhook)
    monitor = Monitor(list(paths), tag_map, thresholds, snapshots=book)
    try:
        code = run_watch(monitor, options, hooks)
    finally:
        hooks.close()
    sys.exit(code)


@main.command()
@click.option("--max-steps", type=click.IntRange(min=1), required=True, help="--max_train_steps of the run.")
@click.option("--save-every", type=click.IntRange(min=1), required=True, help="--save_every_n_steps.")
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True, help="--lr_warmup_steps.")
@click.option("--cycles", type=click.IntRange(min=1), help="--lr_scheduler_num_cycles. Default: max steps / save every.")
@click.option("--schedule", type=click.Choice(["cosine", "rex"]), default="cosine", show_default=True,
              help="cosine: kohya's cosine_with_restarts; rex: lrwatch.schedulers.RexWithRestarts.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(max_steps: int, save_every: int, warmup: int, cycles: int | None, schedule: str, as_json: bool) -> None:
    """How many cycles, where their minima fall, whether every save lands on one, and the kohya
    arguments to paste. Exit code 0 when every save lands on a minimum, 1 when not."""
    import json

    from lrwatch.plan import make_plan, render_plan

    try:
        result = make_plan(max_steps, save_every, warmup, schedule, cycles)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else render_plan(result))
    sys.exit(0 if result.ok else 1)


def _split_command(args: tuple[str, ...]) -> tuple[list[str], list[str] | None]:
    """``PATHS -- COMMAND...``: click hands everything after ``--`` to PATHS; split it back off."""
    raw = sys.argv[1:]
    if "--" not in raw:
        return list(args), None
    after = raw[raw.index("--") + 1 :]
    if not after:
        raise click.UsageError("nothing to launch after --")
    paths = list(args[: len(args) - len(after)])
    if not paths:
        raise click.UsageError("give the log folder to watch before --")
    return paths, after


def _poll_with_progress(monitor: Monitor) -> None:
    runs = monitor.discover()
    if len(runs) < 2 or not sys.stderr.isatty():
        monitor.poll()
        return
    with click.progressbar(runs, label="reading runs", file=sys.stderr) as bar:
        for run in bar:
            monitor.poll({run.path})
