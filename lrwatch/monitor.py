"""The pipeline audit and watch share: find runs, read what is new, analyse, report
findings not reported before. An audit is one pass of it; the watcher repeats the
pass whenever files change.

One run's trouble (an unreadable file, a config that cannot be understood, a bug in
the analysis of odd data) is kept on that run and reported; the other runs go on.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrwatch.analysis import Analyser, Analysis, Finding, Thresholds, analyze, paired
from lrwatch.resume import JoinedRun, find_continued, first_step, output_name, resumed_from
from lrwatch.runs import Run, RunLike, discover
from lrwatch.snapshots import SnapshotBook
from lrwatch.sources import is_remote, location
from lrwatch.tags import TagMap
from lrwatch.trainers import ScheduleOptions, read_layout

# Seconds between listings of a watched run's folder (for files no event told of); a file event
# about a file the run does not know yet lists it at once.
RELIST_INTERVAL = 10.0
ACTIVE_WINDOW = 2.0  # seconds: a run that got points this recently counts as growing
# Seconds: the longest a growing run's analysis waits for its turn (a non-finite value, a stop
# waiting on a step and a first analysis never wait). With 200 runs written at once each waits
# ~active runs x an update's cost / the budget: 200 x ~0.3 ms / 2 % = 3 s.
MAX_ANALYSIS_DELAY = 3.0
ANALYSIS_SLICE = 0.01  # seconds of put-off analyses per pass, at most (Monitor._throttled)
# Bytes of a run read and analysed at once where points are let go of: a part's points and arrays,
# and the rules' carried window, are what is held, whatever the run's length (32 MB: ~700k points).
READ_BUDGET = 32 << 20
# Points a watched run may gather beyond what its rules need before they are let go of: letting go
# copies what is kept, so it is done now and then, not at every step.
FORGET_EVERY = 4096


def _identity(path: Path) -> tuple[int, int] | None:
    if is_remote(path):
        return None  # object stores have no folders to delete and recreate
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass(eq=False)  # compared by identity: a recreated run folder is a new RunState
class RunState:
    run: Run
    analysis: Analysis | None = None
    reported: set[tuple] = field(default_factory=set)
    error: str | None = None  # why the last read or analysis of this run failed
    seen_at_start: bool = False  # the run was there when the watch started
    grew: bool = False  # it received new data while watched (only such runs may lead to a stop)
    folder: tuple[int, int] | None = None  # (device, inode) of the run's path when it was found
    announced: set[str] = field(default_factory=set)  # live notes already said about this run
    view: RunLike | None = None  # what was analysed: the run, or the run it continues joined with it
    stale: bool = False  # points read but not analysed yet (Monitor.analysis_budget)
    analysed_at: float = -1e9  # time.monotonic() of the last analysis
    grew_at: float = -1e9  # time.monotonic() of the last new points
    urgent: bool = False  # a stop waits on this run's steps: analyse every change
    listed_at: float = -1e9  # time.monotonic() of the last listing of the run's folder
    resume_note: tuple[tuple, str | None] | None = None  # (what it depends on, the note) for runs without a config
    rendered: str | None = None  # its JSON report entry, rendered where it was analysed (an audit's worker)
    analyser: Analyser | None = None  # a watched run's analysis, updated with its new points only
    unforgotten: int = 0  # points read since its points were last let go of (``Monitor.forget_every``)

    @property
    def series_source(self) -> RunLike:
        return self.view or self.run

    @property
    def earlier(self) -> bool:
        """A run that was there before the watch started and got nothing new since."""
        return self.seen_at_start and not self.grew


class Monitor:
    """Runs under ``roots``, each analysed again when new points arrive."""

    def __init__(
        self,
        roots: list[str | os.PathLike[str]],
        tag_map: TagMap | None = None,
        thresholds: Thresholds | None = None,
        snapshots: SnapshotBook | None = None,
        trainer: str | None = None,
        schedule: ScheduleOptions | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        # Absolute (not resolved: a symlinked log folder keeps the name it was given), so that
        # paths from the file-system observer compare equal to the runs' paths. URLs stay URLs.
        self.roots = [_absolute(location(r, storage_options)) for r in roots]
        self._as_given = {root: str(r) for root, r in zip(self.roots, roots)}  # for messages
        self.tag_map = tag_map  # None: each run's trainer layout (lrwatch.trainers)
        self.trainer = trainer  # None: detected per run
        self.schedule = schedule
        self.thresholds = thresholds or Thresholds()
        self.states: dict[Path, RunState] = {}
        self.snapshots = snapshots
        self.live = False  # set by the watcher once the runs already there have been read
        self.points_read = 0  # scalar points read so far, over all runs (the watcher's sign of new data)
        self.analysis_budget = 0.0  # share of one core for analyses (the watcher sets it; 0: analyse every change)
        self.updates_analyses = False  # the watcher's: each run's analysis is kept and updated with its new points
        # When only what the report says is kept (an audit without curves; a watch without snapshot
        # verdicts or a TensorBoard export, which draw on every point): runs are read in parts of about
        # ``read_budget`` bytes, each analysed and its points let go of (``Analyser.forget``) once a run
        # has ``forget_every`` more than its rules need, so memory does not grow with a run's length.
        self.read_budget: int | None = None
        self.forget_every: int | None = None
        self._analysis_cost = 0.001  # seconds per analysis, a moving average
        self.root_errors: dict[Path, str] = {}  # roots (and folders below them) that could not be listed, and why
        self._unlistable: dict[Path, str] = {}  # the folders below roots among them, as the last listing found
        self.announced: set[str] = set()  # the watcher's notes about roots, each said once
        self.forgotten: list[str] = []  # runs whose folder went away, not said yet (the watcher says them)
        self._names: dict[Path, tuple[tuple, str]] = {}  # run -> its output name, by config
        self._named: dict[str, list[Path]] | None = None  # output name -> runs (None: to build again)
        self._sorted: list[Path] | None = None  # the runs' paths in order (None: to sort again)

    def missing_roots(self) -> list[Path]:
        return [r for r in self.roots if self._exists(r) is False]

    def _exists(self, root: Path) -> bool | None:
        """Whether a root is there; None when that could not be found out (the reason is kept in
        ``root_errors``: object storage refusing the credentials, a network error, no permission)."""
        try:
            there = root.exists()
        except Exception as e:  # fsspec backends raise their own errors, not only OSError
            self.root_errors[root] = _reason(e)
            return None
        self.root_errors.pop(root, None)
        return there

    def as_given(self, root: Path) -> str:
        """A root spelled the way the user gave it."""
        return self._as_given.get(root, str(root))

    def start_live(self) -> None:
        """From now on, new data marks a run as growing; the runs there now are earlier runs."""
        self.live = True
        for state in self.states.values():
            state.seen_at_start = True

    def discover(self) -> list[Run]:
        """Add runs that appeared under the roots since the last call; a run folder that was
        deleted (and perhaps created again) is forgotten and, if there, found anew."""
        for path, state in list(self.states.items()):
            if _identity(path) != state.folder:
                del self.states[path]
                self._named = self._sorted = None
                self.forgotten.append(state.run.name)
        new = []
        for folder in self._unlistable:  # listed again below: kept only while still refused
            self.root_errors.pop(folder, None)
        self._unlistable = {}
        for root in self.roots:
            if not self._exists(root):
                continue
            try:
                base = root if root.is_dir() else root.parent
                found = discover(root, self._unlistable)
            except Exception as e:
                self.root_errors[root] = _reason(e)
                continue
            for path in found:
                if path not in self.states:
                    run = Run(path, base)
                    self.states[path] = RunState(run, folder=_identity(path))
                    new.append(run)
                    self._named = self._sorted = None
        for folder, why in self._unlistable.items():
            self.root_errors[folder] = (f"cannot list this folder ({why}), so any run in it is not checked; "
                                        "run lrwatch as a user who may read it, or leave it out of the paths given")
        return new

    def poll(self, run_paths: set[Path] | None = None, rediscover: bool = True,
             written: dict[Path, set[Path]] | None = None) -> list[tuple[RunState, Finding]]:
        """Read what is new (in the given runs, or all) and return findings not reported before.
        ``written``: by run, the event files that file events said were written (its runs are the
        ones read, unless ``run_paths`` names them); a run's other files are read only when its
        folder is listed again (every ``RELIST_INTERVAL`` s, or for a file it does not know): a
        resumed run has a file per start, kohya's config its own."""
        if rediscover:
            self.discover()
        out: list[tuple[RunState, Finding]] = []
        delay = self._analysis_delay(time.monotonic()) if self.analysis_budget > 0 else 0.0  # once per pass
        spent = 0.0  # seconds of analyses in this pass
        paths = run_paths if run_paths is not None else written
        if paths is None:
            targets = list(self.states.values())
        else:  # a look-up per changed run, not a pass over every run (an audit polls each run alone)
            targets = [self.states[p] for p in sorted(paths, key=str) if p in self.states]
        for state in targets:
            try:
                now = time.monotonic()
                relist = not self.live or now - state.listed_at >= RELIST_INTERVAL
                if relist:
                    state.listed_at = now
                only = None if written is None or relist else written.get(state.run.path, set())
                new_points = state.run.refresh(relist, only, self.read_budget)
                while state.run.more:
                    new_points += self._next_part(state)
                self.points_read += new_points
                state.unforgotten += new_points
                if not new_points and state.analysis is not None and not state.stale:
                    continue
                if self.live and (new_points or not state.seen_at_start):
                    state.grew = True
                if self._throttled(state, new_points, delay, busy=spent >= ANALYSIS_SLICE):
                    continue
                self._analyse(state)
                spent += time.monotonic() - state.analysed_at
                if self.forget_every is not None and state.unforgotten >= self.forget_every and state.analyser:
                    state.analyser.forget(state.run)
                    state.unforgotten = 0
                    for group in state.analysis.groups if state.analysis else []:
                        group.drop_curves()  # (they held the points let go of; the next analysis has the recent ones)
            except Exception as e:  # one run's trouble never stops the others (or the watch)
                state.error = f"{type(e).__name__}: {e} (at {_where(e)})"
                continue
            out += self._new_findings(state)
        return out

    def _next_part(self, state: RunState) -> int:
        """Analyse the part of a run read so far, let go of the points the rules no longer need,
        and read the next part (``read_budget``); the rest of it at once where the run is
        analysed joined to the run it resumed (that analysis reads every point each time)."""
        self._analyse(state)
        if state.analyser is None:
            return state.run.refresh(relist=False)
        state.analyser.forget(state.run)
        return state.run.refresh(relist=False, budget=self.read_budget)

    def _analyse(self, state: RunState) -> None:
        state.stale, state.analysed_at, state.rendered = False, time.monotonic(), None
        reading = read_layout(state.run, self.trainer, self.tag_map, self.schedule)
        state.view, resume_note, resume_step = self._joined_view(state.run)
        incremental = self.updates_analyses or self.read_budget is not None
        if incremental and state.view is state.run:  # (a joined run's history can change under it)
            state.analyser = state.analyser or Analyser(self.thresholds)
            state.analysis = state.analyser.update(state.view, reading)
        else:
            state.analyser = None
            state.analysis = analyze(state.view, thresholds=self.thresholds, reading=reading)
        if resume_note:
            state.analysis.notes.insert(0, resume_note)
        if resume_step is not None:  # what came before the resume is the earlier run's to report
            state.analysis.findings = [f for f in state.analysis.findings if f.step > resume_step]
        cost = time.monotonic() - state.analysed_at
        self._analysis_cost = 0.9 * self._analysis_cost + 0.1 * cost  # a moving average
        state.error = None

    def _new_findings(self, state: RunState) -> list[tuple[RunState, Finding]]:
        out = []
        for finding in state.analysis.findings if state.analysis else []:
            key = finding.key()
            if key not in state.reported:
                state.reported.add(key)
                out.append((state, finding))
        return out

    def adopt(self, states: list[RunState]) -> None:
        """Take the places of known runs with ``states``: the same runs, each read and analysed
        alone in another process. What depends on the other runs is done again here, once all
        are in: a resumed run is joined to the run it continues and analysed again; a run named
        like an earlier one gets its note."""
        for state in states:
            self.states[state.run.path] = state
        self._sorted = None
        for state in states:
            if state.analysis is None or state.error:
                continue
            try:
                if resumed_from(state.run.config) is not None:
                    self._analyse(state)  # joined here, where the run it continues is
                else:
                    _, note, _ = self._joined_view(state.run)
                    if note:
                        state.analysis.notes.insert(0, note)
                        state.rendered = None
            except Exception as e:  # as in poll: reported with the run
                state.error, state.rendered = f"{type(e).__name__}: {e} (at {_where(e)})", None
            self._new_findings(state)

    def _joined_view(self, run: Run) -> tuple[RunLike, str | None, int | None]:
        """The run as analysed (joined to the run it resumed, when that is here), a note, and the
        resume step below which findings belong to the earlier run."""
        state = resumed_from(run.config)
        if state is None:
            known = self.states.get(run.path)
            cached = known.resume_note if known else None
            # What can change the note: a new run, the run's config (its name), its first points
            key = (len(self.states), run.config_version, bool(run.tags))
            if cached is None or cached[0] != key:
                cached = (key, self._maybe_resumed_note(run))
                if known is not None:
                    known.resume_note = cached
            return run, cached[1], None
        found = find_continued(run, self._others(run))
        if found is None:
            first = first_step(run)
            offset = state[1] if first is not None and first <= state[1] else 0
            shift = f"its steps are shifted by {offset} to global steps; " if offset else ""
            return (JoinedRun(None, run, state[1], offset),
                    f"resumed from {state[0]}-step{state[1]:08d}-state, whose run is not among the runs read: "
                    f"{shift}the history before the resume (the highest d*lr so far) is not counted", None)
        earlier, step, offset = found
        shift = f"; its steps are shifted by {offset} to global steps" if offset else ""
        return (JoinedRun(earlier, run, step, offset),
                f"resumed from {state[0]}-step{step:08d}-state: joined to run {earlier.name} up to step {step}{shift}",
                step)

    def _others(self, run: Run) -> list[Run]:
        return [s.run for s in self.states.values() if s.run is not run]

    def _throttled(self, state: RunState, new_points: int, delay: float, busy: bool) -> bool:
        """Whether to leave a run's new points for a later pass. Analyses get ``analysis_budget``
        of one core: with one growing run that is every change (a millisecond each); with 200
        runs each written every fraction of a second, each run's analysis waits its turn, up to
        ``MAX_ANALYSIS_DELAY``, and a pass that has spent ``ANALYSIS_SLICE`` on analyses leaves
        the runs whose turn came for the next pass (turns come in bunches; a pass that analysed
        them all would hold up the finding of a run that needs one now). A non-finite value, a
        run with a stop pending on its step and a first analysis are never put off. The findings
        are the same either way (the analysis is causal): only found later."""
        now = time.monotonic()
        if new_points:
            state.grew_at = now
        if self.analysis_budget <= 0 or state.analysis is None or state.run.new_nonfinite or state.urgent:
            return False
        if now - state.analysed_at >= delay and not busy:
            return False
        state.stale = state.stale or bool(new_points)
        return True

    def _analysis_delay(self, now: float) -> float:
        active = sum(1 for s in self.states.values() if now - s.grew_at < ACTIVE_WINDOW)
        return min(MAX_ANALYSIS_DELAY, active * self._analysis_cost / self.analysis_budget)

    def stale_runs(self) -> set[Path]:
        """Runs with points not analysed yet whose turn has come (the watcher polls them)."""
        now = time.monotonic()
        delay = self._analysis_delay(now)
        return {p for p, s in self.states.items() if s.stale and now - s.analysed_at >= delay}

    def _output_name(self, run: Run) -> str:
        """Cached: the watcher asks on every change of every run."""
        key = (len(run.config), str(run.config.get("output_name")))
        cached = self._names.get(run.path)
        if cached is None or cached[0] != key:
            name = output_name(run)
            if cached is None or cached[1] != name:
                self._named = None
            cached = self._names[run.path] = (key, name)
        return cached[1]

    def _runs_named(self, name: str) -> list[Path]:
        """The runs with this output name, in path order: built once, not per run (an audit of
        a thousand runs would otherwise compare every pair)."""
        if self._named is None:
            names = {path: self._output_name(state.run) for path, state in self.states.items()}
            named: dict[str, list[Path]] = {}
            for path in sorted(names, key=str):
                named.setdefault(names[path], []).append(path)
            self._named = named
        return self._named.get(name, [])

    def _maybe_resumed_note(self, run: Run) -> str | None:
        """A run that starts again at step 1 in a log folder named like an earlier run's, with
        its ``d`` from the start far above where the earlier run's began (the optimizer's state
        went on), may be a resume whose config was not logged: its steps would then be local.
        Say so, never guess; a second run of the same training starts at ``d0`` again and is
        just an earlier run's namesake (the quick start's second run is one)."""
        first = first_step(run)
        if first is None or first > 1:
            return None
        name = self._output_name(run)
        earlier = [self.states[p].run for p in self._runs_named(name) if str(p) < str(run.path)]
        if not earlier:
            return None
        d_now, d_before = self._first_d(run), self._first_d(earlier[-1])
        if d_now is None or d_before is None or not d_now >= self.thresholds.settle_climb * d_before:
            return None
        return (f"named like the earlier run {earlier[-1].name}, starting at step {first} with d {d_now:.3g}, "
                f"{d_now / d_before:.0f}x where that run's began: if it resumed that run, its steps are local and "
                "the history before the resume is not counted (kohya's --log_config logs the resume state, and "
                "lrwatch then joins the two)")

    def _first_d(self, run: Run) -> float | None:
        """``d`` at the run's first point where it is known: logged, or d*lr over lr."""
        reading = read_layout(run, self.trainer, self.tag_map, self.schedule)
        for group in reading.tag_map.groups(set(run.tags)):
            if group.d_tag and (d := run.series(group.d_tag)) is not None:
                known = d.values[np.isfinite(d.values) & (d.values > 0)]
                if len(known):
                    return float(known[0])
            if group.lr_tag and group.dlr_tag:
                lr, dlr = run.series(group.lr_tag), run.series(group.dlr_tag)
                if lr is None or dlr is None:
                    continue
                _, lr_values, dlr_values = paired((lr.steps, lr.values), (dlr.steps, dlr.values))
                ratio = dlr_values / np.where(lr_values > 0, lr_values, np.nan)
                known = ratio[np.isfinite(ratio) & (ratio > 0)]
                if len(known):
                    return float(known[0])
        return None

    def unread(self) -> list[str]:
        """What could not be read, each with why: roots missing or unlistable, or no event files."""
        out = [f"{self.as_given(p)}: no such file or directory" for p in self.missing_roots()]
        out += [f"{self.as_given(p)}: {why}" for p, why in self.root_errors.items()]
        if not self.runs and not out:
            out.append("no event files found under " + ", ".join(map(self.as_given, self.roots)))
        return out

    def judge_snapshots(self) -> None:
        """Verdicts for the snapshot folders (if any), from the current analyses."""
        if self.snapshots is not None:
            self.snapshots.judge(self.runs)

    def run_for(self, file_path: Path) -> Path | None:
        """The run folder a changed file belongs to (known runs only): a look-up per folder above
        the file, not a scan of every run (the watcher asks for every file event). It is the run's
        own ``path``, the object keying ``states``: the watcher's later look-ups match by identity."""
        path = file_path
        while True:  # the file's folder first: an event file sits directly in its run (or one below)
            if path in self.states:
                return self.states[path].run.path
            parent = path.parent
            if parent == path:
                return None
            path = parent

    @property
    def runs(self) -> list[RunState]:
        if self._sorted is None or len(self._sorted) != len(self.states):  # sorted once per change, not per ask
            self._sorted = sorted(self.states)
        return [self.states[p] for p in self._sorted]


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return f"cannot list: {text}" if isinstance(e, OSError) else f"cannot list: {type(e).__name__}: {text}"


def _absolute(path: Path) -> Path:
    return path if is_remote(path) else Path(os.path.abspath(path))


def _where(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    return f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?"
