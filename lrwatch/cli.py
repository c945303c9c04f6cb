"""The command line: a thin layer over the library. ``lrwatch PATH`` watches; ``lrwatch audit`` reports.

``main(argv) -> int`` runs it in-process (the console script calls it); every command
ends with its exit code, errors go to stderr and reports to stdout.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from lrwatch import __version__
from lrwatch.analysis import Thresholds
from lrwatch.output import dumps, terminal_safe
from lrwatch.report import EXIT_CRITICAL, EXIT_OK, EXIT_UNREADABLE
from lrwatch.snapshots import DEFAULT_FRIED_LOSS, DEFAULT_FRIED_VALIDATION, DEFAULT_SAFE_LR, MANIFEST
from lrwatch.sources import RemoteUnavailable
from lrwatch.tags import DEFAULT_DLR_TAGS, DEFAULT_LOSS_TAGS, DEFAULT_LR_TAGS, TagMap
from lrwatch.trainers import LAYOUTS, ScheduleOptions

_DEFAULTS = Thresholds()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: the process's arguments) and return its exit code."""
    try:
        rv = cli.main(args=argv, prog_name="lrwatch", standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.ClickException as e:
        e.show()
        return int(e.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while a watch prints its final audit, or one during an audit
        click.echo("lrwatch: interrupted", err=True)
        return 128 + signal.SIGINT
    except RemoteUnavailable as e:
        click.echo(terminal_safe(f"lrwatch: {e}"), err=True)
        return EXIT_UNREADABLE
    return rv if isinstance(rv, int) else EXIT_OK


class _WatchByDefault(click.Group):
    """``lrwatch logs/`` means ``lrwatch watch logs/``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["watch", *args]
        return super().parse_args(ctx, args)


class _CommandAfterDashes(click.Command):
    """``PATHS... [OPTIONS] -- COMMAND...``: what follows ``--`` is the trainer to launch,
    split off here, before click would take it as more PATHS."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            i = args.index("--")
            ctx.meta["lrwatch.command"] = args[i + 1 :]
            if not args[i + 1 :]:
                raise click.UsageError("nothing to launch after --", ctx)
            args = args[:i]
        return super().parse_args(ctx, args)


@click.group(cls=_WatchByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lrwatch")
def cli() -> None:
    """Watch TensorBoard logs of Prodigy / D-Adaptation runs with cyclic lr schedules:
    predict the d*lr blow-up before the restart, flag it or stop the trainer.

    \b
      lrwatch logs/ --kill-on-spike      watch (the default command)
      lrwatch audit logs/                report on finished runs
    """


# (Thresholds field, type, help): each becomes --field-name with the field's default.
THRESHOLD_OPTIONS: list[tuple[str, type, str]] = [
    ("risk_warning", float,
     "Warn when d now x the next cycle's peak lr exceeds the highest d*lr so far by this ratio."),
    ("risk_stop", float, "A strong prediction at this ratio (after d's warm-up): still a warning; "
                         "--kill-at predict stops on it."),
    ("runaway_window", int, "Steps over which d's growth is measured."),
    ("runaway_warning", float, "Warn when d grows by this factor within the window (after d's warm-up)."),
    ("runaway_critical", float, "Critical at this growth factor."),
    ("loss_window", int, "Steps (and at least as many losses) whose geometric mean is the loss's level."),
    ("loss_over_best", float, "Critical when the loss's level reaches this multiple of the run's own best level "
                              "so far, beyond chance (next option)."),
    ("loss_noise_sigmas", float, "Standard errors of that ratio allowed as chance, from the spread of the losses "
                                 "in the best window (0: none)."),
    ("validation_over_best", float, "Critical when the validation loss reaches this multiple of its best so far."),
    ("restart_spike", float, "A warning when d*lr right after a restart is this multiple of the highest before."),
    ("restart_jump", float, "An lr rise of this fraction of the cycle's peak, from below it, is a restart."),
]


def analysis_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Tag mapping and thresholds, shared by audit and watch."""
    options = [
        click.option("--lr-tag", "lr_tags", multiple=True, metavar="PATTERN",
                     help="lr tag pattern, {group} = one path segment (repeatable). "
                          f"Default: {', '.join(DEFAULT_LR_TAGS)}"),
        click.option("--dlr-tag", "dlr_tags", multiple=True, metavar="PATTERN",
                     help=f"d*lr tag pattern (repeatable). Default: {', '.join(DEFAULT_DLR_TAGS)}"),
        click.option("--loss-tag", "loss_tags", multiple=True, metavar="TAG",
                     help=f"loss tag, first present wins (repeatable). Default: {', '.join(DEFAULT_LOSS_TAGS)}"),
        click.option("--trainer", type=click.Choice(sorted(LAYOUTS)),
                     help="Read every run as this trainer's layout (default: detected per run; tag options win)."),
        click.option("--schedule", type=click.Choice(["cosine_with_restarts", "cosine", "rex"]),
                     help="The schedule of logs that hold only d*lr (OneTrainer, ai-toolkit) when its config "
                          "is not found; with --cycles and --max-steps. cosine = cosine_with_restarts."),
        click.option("--cycles", type=click.IntRange(min=1), help="With --schedule: the number of cycles."),
        click.option("--max-steps", type=click.IntRange(min=1),
                     help="With --schedule: the optimizer steps of the whole run."),
        click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True,
                     help="With --schedule: linear warmup steps before the first cycle."),
        click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
                     callback=_storage_options,
                     help="Passed to fsspec for URL paths (s3://, gs://, ...), e.g. endpoint_url=http://minio:9000 "
                          "or anon=true (repeatable)."),
        *(click.option("--" + name.replace("_", "-"), type=kind, default=getattr(_DEFAULTS, name),
                       show_default=True, help=text) for name, kind, text in THRESHOLD_OPTIONS),
    ]
    for option in reversed(options):
        f = option(f)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        lr, dlr, loss = (tuple(kwargs.pop(k)) for k in ("lr_tags", "dlr_tags", "loss_tags"))
        kwargs["tag_map"] = TagMap(lr=lr or DEFAULT_LR_TAGS, dlr=dlr or DEFAULT_DLR_TAGS,
                                   loss=loss or DEFAULT_LOSS_TAGS) if lr or dlr or loss else None
        kwargs["schedule"] = _schedule_options(*(kwargs.pop(k) for k in ("schedule", "cycles", "max_steps", "warmup")))
        try:
            kwargs["thresholds"] = Thresholds(**{name: kwargs.pop(name) for name, _, _ in THRESHOLD_OPTIONS})
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        return f(*args, **kwargs)

    return wrapper


def _storage_options(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if not values:
        return options
    import yaml

    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        try:
            options[key] = yaml.safe_load(value) if value else ""  # anon=true -> True, a URL stays a string
        except yaml.YAMLError:
            options[key] = value
    return options


def _schedule_options(schedule: str | None, cycles: int | None, max_steps: int | None,
                      warmup: int) -> ScheduleOptions | None:
    if schedule is None:
        if cycles is not None or max_steps is not None or warmup:
            raise click.UsageError("--cycles, --max-steps and --warmup describe a --schedule: give it too")
        return None
    if cycles is None or max_steps is None:
        raise click.UsageError("--schedule needs --cycles and --max-steps")
    try:
        return ScheduleOptions("rex" if schedule == "rex" else "cosine_with_restarts", cycles, max_steps, warmup)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


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
        click.option("--fried-loss", type=click.FloatRange(1, min_open=True), default=DEFAULT_FRIED_LOSS,
                     show_default=True, help="A snapshot is fried when the geometric mean of the loss over the 25 "
                                             "steps before its save is at least this multiple of the run's best "
                                             "such level before (used where no validation loss is logged)."),
        click.option("--fried-validation", type=click.FloatRange(1, min_open=True),
                     default=DEFAULT_FRIED_VALIDATION, show_default=True,
                     help="A snapshot is fried when the validation loss at its step is at least this multiple of "
                          "its best before."),
        click.option("--no-manifest", is_flag=True,
                     help=f"Do not write {MANIFEST} into the snapshot folders."),
    ]
    for option in reversed(options):
        f = option(f)

    return f


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema in the README) instead of tables.")
@click.option("--best", is_flag=True, help="Print only the path of the snapshot to keep: the best safe one by the "
                                           "validation loss, else the loss before each save (needs --snapshots).")
@click.option("--tensorboard", is_flag=True,
              help="Write each run's analysis as a TensorBoard run <run folder>/lrwatch/ (rewritten atomically).")
@click.option("--workers", type=click.IntRange(min=1),
              help="Processes reading and analysing runs at once (default: every core; from 4 runs on).")
@snapshot_options
@analysis_options
def audit(paths: tuple[str, ...], as_json: bool, best: bool, tensorboard: bool, workers: int | None,
          no_manifest: bool,
          snapshot_dirs: tuple[str, ...], steps_per_epoch: int | None, safe_lr: float,
          fried_loss: float, fried_validation: float,
          tag_map: TagMap | None, trainer: str | None, schedule: ScheduleOptions | None,
          storage_option: dict[str, Any], thresholds: Thresholds) -> int:
    """Report on runs under PATHS: cycles, d growth, findings, snapshot verdicts.

    Exit codes (most urgent first): 1 a critical finding; 4 lrwatch failed on a run;
    2 bad usage, a missing path or nothing readable; 3 a run where no tag was
    recognised (nothing checked); 0 otherwise. With --best: 0 and the path, 1 and
    nothing on stdout when no snapshot is safe, 2 when a path is missing or unreadable.
    """
    from lrwatch.audit import audit as run_audit
    from lrwatch.audit import keep_freed_memory

    keep_freed_memory()
    if best and not snapshot_dirs:
        raise click.UsageError("--best needs --snapshots DIR")
    result = run_audit(list(paths), tag_map, thresholds, list(snapshot_dirs), steps_per_epoch, safe_lr,
                       manifest=not no_manifest, fried_loss=fried_loss, fried_validation=fried_validation,
                       on_run=_progress(), trainer=trainer,
                       schedule=schedule, tensorboard=tensorboard, storage_options=storage_option, workers=workers,
                       keep_points=False)  # the report needs what is said of each run, not its curves
    for line in result.monitor.unread() + result.manifest_problems + result.export_problems:
        click.echo(terminal_safe(f"lrwatch: {line}"), err=True)
    if best:
        if result.exit_code not in (EXIT_OK, EXIT_CRITICAL):
            click.echo("lrwatch: --best: not every path could be checked (see above)", err=True)
            return _exit(result.exit_code)
        pick = result.best_snapshot()
        if pick is None:
            click.echo("lrwatch: no safe snapshot", err=True)
            return _exit(1)
        click.echo(pick.path)
        return _exit(0)
    report = result.to_json() if as_json else terminal_safe(result.render())
    if report:
        click.echo(report)
    return _exit(result.exit_code)


def _exit(code: int) -> int:
    """End the command with ``code``, also under click's standalone mode (CliRunner)."""
    click.get_current_context().exit(code)
    return code  # not reached


def _progress() -> Callable[[int, int], None] | None:
    """A progress bar on stderr when it is a terminal and there is more than one run."""
    if not sys.stderr.isatty():
        return None
    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if total < 2:
            return
        if "bar" not in state:
            state["bar"] = click.progressbar(length=total, label="reading runs", file=sys.stderr)
            state["bar"].__enter__()
        state["bar"].update(1)
        if done == total:
            state["bar"].__exit__(None, None, None)

    return update


@cli.command(cls=_CommandAfterDashes)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--kill-on-spike", is_flag=True, help="Stop the trainer when a critical finding fires.")
@click.option("--kill-at", type=click.Choice(["confirm", "predict"]), default="confirm", show_default=True,
              help="confirm: stop on evidence only (the loss or validation loss far above the run's own best, a "
                   "non-finite value, d running away). predict: also on a strong prediction, stopping when the "
                   "predicted restart is logged (after the cycle-minimum snapshot).")
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
@click.option("--tensorboard", is_flag=True,
              help="Keep each run's analysis current as a TensorBoard run <run folder>/lrwatch/.")
@click.option("--stop-cmd", metavar="CMD",
              help="With --kill-on-spike: when a stop is due and no local process provably writes the run (a "
                   "trainer on Slurm, Kubernetes, a rented GPU), run CMD through the shell once per run, with "
                   "the finding in LRWATCH_* variables, e.g. 'scancel $SLURM_JOB_ID'.")
@click.option("--stop-cmd-always", is_flag=True, help="Run --stop-cmd for every stop that is due, local or not.")
@snapshot_options
@analysis_options
def watch(paths: tuple[str, ...], kill_on_spike: bool, kill_at: str, pid: int | None, dry_run: bool,
          grace_int: float, grace_term: float, poll: float | None, until_idle: float | None,
          events_out: str | None, exec_cmd: str | None, webhook: str | None, tensorboard: bool,
          stop_cmd: str | None, stop_cmd_always: bool, no_manifest: bool,
          snapshot_dirs: tuple[str, ...], steps_per_epoch: int | None, safe_lr: float,
          fried_loss: float, fried_validation: float,
          tag_map: TagMap | None, trainer: str | None, schedule: ScheduleOptions | None,
          storage_option: dict[str, Any], thresholds: Thresholds) -> int:
    """Follow the runs under PATHS as they are written (PATHS may not exist yet).

    \b
    Launch and guard a trainer:   lrwatch logs/ --kill-on-spike -- accelerate launch train_network.py ...
    Guard a running trainer:      lrwatch logs/ --kill-on-spike
    Ends when the trainer exits (or --until-idle), printing the final audit; exit codes as audit.
    Ctrl-C stops lrwatch, never the trainer.
    """
    from lrwatch.options import OptionError
    from lrwatch.watching import WatchOptions, watch_paths

    try:
        options = WatchOptions(poll=poll, kill_on_spike=kill_on_spike, kill_at=kill_at, pid=pid,
                               command=click.get_current_context().meta.get("lrwatch.command"), dry_run=dry_run,
                               grace_int=grace_int, grace_term=grace_term, until_idle=until_idle,
                               manifest=not no_manifest, tensorboard=tensorboard, stop_cmd=stop_cmd,
                               stop_cmd_always=stop_cmd_always)
        code = watch_paths(list(paths), options, tag_map=tag_map, thresholds=thresholds,
                           snapshots=list(snapshot_dirs), steps_per_epoch=steps_per_epoch, safe_lr=safe_lr,
                           fried_loss=fried_loss, fried_validation=fried_validation, trainer=trainer,
                           schedule=schedule, storage_options=storage_option, events_out=events_out,
                           exec_cmd=exec_cmd, webhook=webhook)
    except OptionError as e:
        raise click.UsageError(str(e)) from None
    return _exit(code)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--output", "png", metavar="FILE.png",
              help="Write a picture: one run, or a grid of the runs under PATHS.")
@click.option("--html", "html_path", metavar="FILE.html",
              help="Write one self-contained page: each run's audit and picture, for sharing a post-mortem.")
@snapshot_options
@analysis_options
def plot(paths: tuple[str, ...], png: str | None, html_path: str | None, no_manifest: bool,
         snapshot_dirs: tuple[str, ...], steps_per_epoch: int | None, safe_lr: float,
          fried_loss: float, fried_validation: float,
         tag_map: TagMap | None, trainer: str | None, schedule: ScheduleOptions | None,
         storage_option: dict[str, Any], thresholds: Thresholds) -> int:
    """Draw each run under PATHS: lr with restarts, d*lr with its maximum and the predicted next
    restart, d (log), the loss; findings as markers by severity, snapshots as lines by verdict.
    Needs matplotlib (pip install 'lrwatch[plot]'). Exit codes as audit."""
    from lrwatch.audit import audit as run_audit
    from lrwatch.plot import PlotUnavailable, write_html, write_png

    if not png and not html_path:
        raise click.UsageError("give -o FILE.png, --html FILE.html or both")
    result = run_audit(list(paths), tag_map, thresholds, list(snapshot_dirs), steps_per_epoch, safe_lr,
                       manifest=not no_manifest, fried_loss=fried_loss, fried_validation=fried_validation,
                       trainer=trainer, schedule=schedule,
                       storage_options=storage_option)
    for line in result.monitor.unread() + result.manifest_problems:
        click.echo(terminal_safe(f"lrwatch: {line}"), err=True)
    book = result.monitor.snapshots
    by_run = book.by_run if book else None
    drawable = [s for s in result.runs if s.analysis is not None and s.analysis.checked]
    try:
        if png and drawable:
            write_png(png, drawable, by_run)
            click.echo(f"wrote {png} ({len(drawable)} run{'s' if len(drawable) != 1 else ''})", err=True)
        if html_path:
            write_html(html_path, result.runs, by_run)
            click.echo(f"wrote {html_path}", err=True)
    except PlotUnavailable as e:
        raise click.UsageError(str(e)) from None
    except OSError as e:
        click.echo(terminal_safe(f"lrwatch: could not write: {e}"), err=True)
        return _exit(EXIT_UNREADABLE)
    if png and not drawable:
        click.echo("lrwatch: no run with data to draw", err=True)
    return _exit(result.exit_code)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--trainer", type=click.Choice(sorted(LAYOUTS)), help="Read the runs as this trainer's layout.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE", callback=_storage_options,
              help="Passed to fsspec for URL paths (repeatable).")
def tags(paths: tuple[str, ...], trainer: str | None, as_json: bool, storage_option: dict[str, Any]) -> int:
    """The scalar tags of each run under PATHS: counts, step ranges, the trainer layout detected
    and what lrwatch takes each tag as. Exit code 2 when a path is missing or holds no event files."""

    from lrwatch.monitor import Monitor
    from lrwatch.report import table
    from lrwatch.trainers import describe_tags, read_layout

    monitor = Monitor(list(paths), storage_options=storage_option)
    monitor.discover()
    docs: list[dict[str, Any]] = []
    for state in monitor.runs:
        state.run.refresh()
        reading = read_layout(state.run, trainer)
        docs.append({"run": state.run.name, "path": str(state.run.path), "trainer": reading.layout.name,
                     "detected_from": reading.why, "notes": reading.notes, "tags": describe_tags(state.run, reading)})
    for line in monitor.unread():
        click.echo(terminal_safe(f"lrwatch: {line}"), err=True)
    if as_json:
        click.echo(dumps(docs, indent=2))
    for doc in [] if as_json else docs:
        lines = [f"run {doc['run']}", f"  trainer: {doc['trainer']} ({doc['detected_from']})"]
        lines += [f"  note: {note}" for note in doc["notes"]]
        lines += table([["tag", "points", "steps", "taken as"]] + [
            [r["tag"], str(r["points"]), f"{r['first_step']}-{r['last_step']}", r["taken_as"]] for r in doc["tags"]])
        click.echo(terminal_safe("\n".join(lines)))
    return _exit(2 if monitor.unread() else 0)


@cli.command()
@click.option("--max-steps", type=click.IntRange(min=1), required=True, help="--max_train_steps of the run.")
@click.option("--save-every", type=click.IntRange(min=1), required=True, help="--save_every_n_steps.")
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True, help="--lr_warmup_steps.")
@click.option("--cycles", type=click.IntRange(min=1),
              help="--lr_scheduler_num_cycles. Default: max steps / save every.")
@click.option("--schedule", type=click.Choice(["cosine", "rex"]), default="cosine", show_default=True,
              help="cosine: kohya's cosine_with_restarts; rex: lrwatch.schedulers.RexWithRestarts.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(max_steps: int, save_every: int, warmup: int, cycles: int | None, schedule: str, as_json: bool) -> int:
    """How many cycles, where their minima fall, whether every save lands on one, and the kohya
    arguments to paste. Exit code 0 when every save lands on a minimum, 1 when not."""

    from lrwatch.plan import make_plan, render_plan

    try:
        result = make_plan(max_steps, save_every, warmup, schedule, cycles)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(dumps(result.to_dict(), indent=2) if as_json else render_plan(result))
    return _exit(0 if result.ok else 1)
