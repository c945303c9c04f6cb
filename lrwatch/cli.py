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


def analysis_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Tag mapping and thresholds, shared by audit and watch."""
    options = [
        click.option("--lr-tag", "lr_tags", multiple=True, metavar="PATTERN",
                     help=f"lr tag pattern, {{group}} = one path segment (repeatable). Default: {', '.join(DEFAULT_LR_TAGS)}"),
        click.option("--dlr-tag", "dlr_tags", multiple=True, metavar="PATTERN",
                     help=f"d*lr tag pattern (repeatable). Default: {', '.join(DEFAULT_DLR_TAGS)}"),
        click.option("--loss-tag", "loss_tags", multiple=True, metavar="TAG",
                     help=f"loss tag, first present wins (repeatable). Default: {', '.join(DEFAULT_LOSS_TAGS)}"),
        click.option("--risk-warning", type=float, default=_DEFAULTS.risk_warning, show_default=True,
                     help="Warn when d now x the next cycle's peak lr exceeds the highest d*lr so far by this ratio."),
        click.option("--risk-critical", type=float, default=_DEFAULTS.risk_critical, show_default=True,
                     help="Critical at this predicted ratio."),
        click.option("--runaway-window", type=int, default=_DEFAULTS.runaway_window, show_default=True,
                     help="Steps over which d's growth is measured."),
        click.option("--runaway-warning", type=float, default=_DEFAULTS.runaway_warning, show_default=True,
                     help="Warn when d grows by this factor within the window (after d's warm-up)."),
        click.option("--runaway-critical", type=float, default=_DEFAULTS.runaway_critical, show_default=True,
                     help="Critical at this growth factor."),
        click.option("--loss-divergence", type=float, default=_DEFAULTS.loss_divergence, show_default=True,
                     help="Critical when the smoothed loss reaches this multiple of its best."),
        click.option("--restart-spike", type=float, default=_DEFAULTS.restart_spike, show_default=True,
                     help="Critical when d*lr right after a restart is this multiple of the highest before."),
        click.option("--restart-jump", type=float, default=_DEFAULTS.restart_jump, show_default=True,
                     help="An lr rise of this fraction of the cycle's peak, from below it, is a restart."),
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
        fields = ("risk_warning", "risk_critical", "runaway_window", "runaway_warning", "runaway_critical",
                  "loss_divergence", "restart_spike", "restart_jump")
        try:
            kwargs["thresholds"] = _checked(Thresholds(**{k: kwargs.pop(k) for k in fields}))
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


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema in the README) instead of tables.")
@analysis_options
def audit(paths: tuple[str, ...], as_json: bool, tag_map: TagMap, thresholds: Thresholds) -> None:
    """Report on runs under PATHS: cycles, d growth, findings.

    Exit code 0: no critical finding; 1: a run has a critical finding; 2: bad usage,
    or a path that is missing or holds no readable run.
    """
    monitor = Monitor(list(paths), tag_map, thresholds)
    _poll_with_progress(monitor)
    click.echo(to_json(monitor) if as_json else render(monitor))
    sys.exit(exit_code(monitor))


def _poll_with_progress(monitor: Monitor) -> None:
    runs = monitor.discover()
    if len(runs) < 2 or not sys.stderr.isatty():
        monitor.poll()
        return
    with click.progressbar(runs, label="reading runs", file=sys.stderr) as bar:
        for run in bar:
            monitor.poll({run.path})
