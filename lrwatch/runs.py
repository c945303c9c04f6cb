"""Find runs under a path and assemble each run's scalar series from its event files.

A run is a folder holding event files (kohya: ``logs/<prefix><timestamp>/network_train``).
Folders named by a unix timestamp inside a run (torch's ``add_hparams``) and an
``hparams.yml`` belong to that run: they hold the trainer's logged configuration.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lrwatch.events import Scalars, concat
from lrwatch.loader import EventFile, Point
from lrwatch.records import Damage
from lrwatch.sources import location, walk_files

EVENT_FILE = re.compile(r"(?:^|\.)tfevents\.")
_HPARAMS_SUBDIR = re.compile(r"^\d{9,11}(\.\d+)?$")
_FILE_STAMP = re.compile(r"tfevents\.(\d+)\.")


SMALL_ADD = 32  # points: up to this many (a watched step's) are appended one by one, not per tag with masks
OWN_EXPORT_SUFFIX = ".lrwatch"  # lrwatch's own TensorBoard output (lrwatch.tbexport): never read as a run


def is_event_name(name: str) -> bool:
    return EVENT_FILE.search(name) is not None and not name.endswith(OWN_EXPORT_SUFFIX)


def is_event_file(path: Path) -> bool:
    return is_event_name(path.name) and path.is_file()


def _file_order(path: Path) -> tuple[int, str]:
    m = _FILE_STAMP.search(path.name)
    return (int(m.group(1)) if m else 0, path.name)


def run_dir_of(folder: Path) -> Path:
    """The run a folder of event files belongs to: an add_hparams timestamp folder is its parent's."""
    return folder.parent if _HPARAMS_SUBDIR.match(folder.name) else folder


def discover(path: str | os.PathLike[str], unlistable: dict[Path, str] | None = None) -> list[Path]:
    """Run folders under ``path`` (or the single event file ``path`` names), sorted; folders
    that could not be listed go into ``unlistable`` (walk_files)."""
    root = location(path)
    if root.is_file():
        return [root]
    runs: set[Path] = set()
    for folder, files in walk_files(root, unlistable):
        if any(is_event_name(f) for f in files):
            runs.add(run_dir_of(folder))
    return sorted(runs, key=str)


@dataclass
class Series:
    """One tag's points, in step order after resolving re-logged steps."""

    steps: np.ndarray
    values: np.ndarray
    wall_times: np.ndarray
    replaced: int = 0  # points dropped so far because a later write took their step (nonzero: the past changed)
    first: int = 0  # how many points came before ``steps[0]`` (``Run.recent`` after ``Run.forget``)

    @property
    def total(self) -> int:
        """Points in the whole series, kept or not."""
        return self.first + len(self.steps)


class RunLike(Protocol):
    """What the analysis reads of a run: a :class:`Run`, or a resumed run joined to the run it
    continues (:class:`lrwatch.resume.JoinedRun`)."""

    path: Path
    name: str
    config: dict[str, object]
    config_problems: list[str]

    @property
    def config_version(self) -> int:
        """Changes whenever ``config`` does: cheaper to compare than the config itself."""

    @property
    def tags(self) -> list[str]: ...

    @property
    def reads(self) -> int:
        """Times its points were read again from the start (what was analysed may have changed)."""

    def series(self, tag: str) -> Series | None: ...

    def recent(self, tag: str) -> Series | None:
        """The series as kept (``Series.first``: the points before it that were let go)."""


class GrowingArray:
    """An array that grows at its end: an append costs what it adds (amortised), and ``view``
    is the part kept without a copy, read-only: what was handed out is shared, and a view
    taken earlier keeps its length and values. Its head can be let go (``forget_before``):
    ``n`` counts every item appended, ``start`` those let go, and indices into it (``at``,
    ``since``, ``between``) count from the first item ever appended, so a rule that keeps
    indices keeps them across a forgetting."""

    __slots__ = ("data", "n", "start", "_view", "_read_only")

    def __init__(self, dtype: type = np.float64) -> None:
        self.data: np.ndarray = np.empty(0, dtype)
        self.n = 0
        self.start = 0
        self._view: np.ndarray | None = None
        self._read_only = _read_only(self.data)  # all of ``data``, unwritable: its slices are too

    def extend(self, x: np.ndarray | Sequence[float]) -> None:
        kept = self.n - self.start
        need = kept + len(x)
        if need > len(self.data):
            grown = np.empty(max(need, 2 * len(self.data)), self.data.dtype)
            grown[:kept] = self.data[:kept]
            self.data, self._read_only = grown, _read_only(grown)
        self.data[kept:need] = x
        self.n, self._view = self.n + len(x), None

    def clear(self) -> None:
        self.data, self.n, self.start, self._view = self.data[:0], 0, 0, None
        self._read_only = _read_only(self.data)

    def forget_before(self, i: int) -> None:
        """Let go of the items before index ``i`` (into a smaller array: the memory goes too); the
        last item is always kept (``last``: where the next items must come after)."""
        i = min(i, self.n - 1)
        if i <= self.start:
            return
        kept = self.data[i - self.start : self.n - self.start]
        self.data = np.empty(max(2 * len(kept), 16), self.data.dtype)
        self.data[: len(kept)] = kept
        self.start, self._view, self._read_only = i, None, _read_only(self.data)

    @property
    def view(self) -> np.ndarray:
        """The items kept (``start`` .. ``n - 1``)."""
        if self._view is None:  # a slice of an unwritable array: a third of setting a view's flag
            self._view = self._read_only[: self.n - self.start]
        return self._view

    def at(self, i: int) -> Any:  # a numpy scalar of the array's type
        """The item at index ``i`` (kept: ``start <= i < n``)."""
        return self.data[i - self.start]

    def last(self) -> Any:
        return self.data[self.n - self.start - 1]

    def since(self, i: int) -> np.ndarray:
        """The items from index ``i`` on (``i >= start``)."""
        return self.view[i - self.start :]

    def between(self, a: int, b: int) -> np.ndarray:
        """The items at indices ``a`` .. ``b - 1`` (``a >= start``)."""
        return self.view[a - self.start : b - self.start]


def _read_only(data: np.ndarray) -> np.ndarray:
    view = data[:]
    view.flags.writeable = False
    return view


class _TagChunks:
    """One tag's points as read: the series so far (merged, in step order), then arrays from
    large reads and plain tuples from a watched step's few records (cheaper to append one by
    one), merged in when the series is asked for."""

    __slots__ = ("steps", "values", "walls", "tail", "merged", "superseded", "replaced", "series", "first_step")

    def __init__(self) -> None:
        self.series = (GrowingArray(np.int64), GrowingArray(), GrowingArray())  # steps, values, wall times
        self.steps: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.walls: list[np.ndarray] = []
        self.tail: list[tuple[int, float, float]] = []  # (step, value, wall time), after the arrays
        self.merged: Series | None = None
        self.superseded = 0  # points replaced by a later write of an earlier step (a resume)
        self.replaced = 0  # points handed out (in a series) that a later write of their step or an earlier one replaced
        self.first_step: int | None = None  # the series' first step, once its first points are let go

    def flush_tail(self) -> None:
        if self.tail:
            steps, values, walls = zip(*self.tail)
            self.steps.append(np.asarray(steps, np.int64))
            self.values.append(np.asarray(values, np.float64))
            self.walls.append(np.asarray(walls, np.float64))
            self.tail = []

    def extended(self, steps: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray,
                 walls: Sequence[float] | np.ndarray) -> Series:
        """The series with these points (steps past its last) appended: views, no copies."""
        for part, new in zip(self.series, (steps, values, walls)):
            part.extend(new)
        return Series(self.series[0].view, self.series[1].view, self.series[2].view, self.replaced,
                      self.series[0].start)

    def forget_before(self, i: int) -> None:
        steps = self.series[0]
        if i > steps.start and self.first_step is None and steps.n:
            self.first_step = int(steps.at(steps.start))
        for part in self.series:
            part.forget_before(i)
        self.merged = None


def _split_last_step(scalars: Scalars) -> tuple[Scalars, Scalars]:
    """(the points written before each tag's trailing points at its last step, those points):
    a tag's next part may log more at that step (kohya logs each micro-batch at one step),
    which only the whole of them, in write order, resolves."""
    ids, steps = scalars.tag_ids, scalars.steps
    order = np.arange(len(steps))
    last = np.full(len(scalars.tags), -1)
    np.maximum.at(last, ids, order)  # each tag's last point
    other = steps != steps[last[ids]]  # a point at another step than its tag's last
    cut = np.full(len(scalars.tags), -1)
    np.maximum.at(cut, ids[other], order[other])
    held = order > cut[ids]

    def part(mask: np.ndarray, hparams: dict[str, object]) -> Scalars:
        return Scalars(scalars.tags, ids[mask], steps[mask], scalars.values[mask], scalars.wall_times[mask], hparams)

    return part(~held, scalars.hparams), part(held, {})


def resolve_relogged(steps: np.ndarray) -> np.ndarray:
    """Mask of points to keep when steps go back (a resume): a point is superseded by any
    later point at the same or an earlier step, so the later write wins."""
    if len(steps) == 0:
        return np.zeros(0, bool)
    later_min = np.minimum.accumulate(steps[::-1])[::-1]
    keep = np.ones(len(steps), bool)
    keep[:-1] = steps[:-1] < later_min[1:]
    return keep


class Run:
    """A run's event files, read incrementally; ``refresh`` picks up new files and bytes."""

    def __init__(self, path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> None:
        self.path = location(path)
        self.single_file = self.path.is_file()
        base = location(root) if root is not None else self.path.parent
        try:
            self.name = str(self.path.relative_to(base)) if self.path != base else self.path.name
        except ValueError:
            self.name = str(self.path)
        self.files: dict[Path, EventFile] = {}
        self.config: dict[str, object] = {}
        self.config_version = 0  # bumped at every change of ``config``
        self.damage: list[tuple[Path, Damage]] = []
        self.file_errors: dict[Path, str] = {}  # files that could not be read at the last attempt
        self.rewritten: set[Path] = set()  # files replaced by shorter or different ones, read again from the start
        self.new_nonfinite = False  # the last refresh read a NaN or inf (a blow-up: analyse it at once)
        self._listed: list[Path] = []  # the event files found by the last listing
        self._pending: dict[Path, int] = {}  # bytes of an unfinished record at each file's end
        self._chunks: dict[str, _TagChunks] = {}
        self._dropped: tuple[list[str], int] | None = None  # (tags, superseded points) once points are dropped
        self._forgotten = False  # ``forget`` let go of points: ``series`` reads the files again for them
        self._held: dict[Path, Scalars] = {}  # a budgeted read's last step, added with the file's next part
        self.more = False  # the last (budgeted) refresh stopped before the ends of the files
        self.reads = 0  # times every point was read again from the files (``_read_again``)
        self._step_range: tuple[int, int] | None = None  # (first, last) step over every tag
        self._step_range_known = False
        self._yml_seen: dict[Path, float] = {}  # hparams.yml files read, by mtime
        self.config_problems: list[str] = []  # logged configuration that could not be read

    # -- reading ---------------------------------------------------------------------------
    def event_files(self) -> list[Path]:
        if self.single_file:
            return [self.path]
        if not self.path.is_dir():
            return []
        found = []
        for entry in self.path.iterdir():
            if entry.is_dir() and _HPARAMS_SUBDIR.match(entry.name):
                found += [p for p in entry.iterdir() if is_event_file(p)]
            elif is_event_file(entry):
                found.append(entry)
        return sorted(found, key=_file_order)

    def refresh(self, relist: bool = True, only: Collection[Path] | None = None, budget: int | None = None) -> int:
        """Read what is new in every file of the run; return the number of new scalar points.
        ``relist=False`` reads the files already known without listing the folder again (the
        watcher relists on its own schedule: a listing costs more than reading a new step);
        ``only``, without a listing: just these of them (the files written, as file events tell).
        ``budget``: read at most about that many bytes of each file (``more`` says whether any
        has more); the points of the last step read wait for the file's next part, where the
        trainer may have logged more at that step (kohya logs each micro-batch at one step)."""
        new_points = 0
        self.new_nonfinite = False
        self.more = False
        listed = relist or not self.files
        if listed:  # the paths already known stay the same objects: dict look-ups by identity, not by comparison
            known = {path: path for path in self.files}
            for known_file in self.files.values():  # (a file kept open whose path names another now is let go)
                known_file.check_name()
            self._listed = [known.get(path, path) for path in self.event_files()]
        for path in self._listed:
            if only is not None and not listed and path not in only:
                continue
            if self.more and path.parent == self.path:
                # A budgeted read goes file by file (a run's files in write order: resolve_relogged); the
                # config's own files (add_hparams' subfolder) are read at once: the rules start from it.
                continue
            loader = self.files.get(path)
            if loader is None:
                loader = self.files[path] = EventFile(path)
            batch = loader.read_new(budget)
            self.more = self.more or batch.more
            if batch.error:
                self.file_errors[path] = batch.error
                continue
            if self.file_errors:
                self.file_errors.pop(path, None)
            if batch.restarted:
                self.rewritten.add(path)
            self._pending[path] = batch.pending
            if batch.damage:
                self.damage += [(path, d) for d in batch.damage]
            held = self._held.pop(path, None)
            if batch.restarted:  # (read again from its start: what was held is the old content's)
                held = None
            if held is not None or batch.more:  # a part of a budgeted read: in columns, the last step held back
                scalars = batch.scalars if held is None else concat([held, batch.scalars])
                if batch.more:
                    scalars, self._held[path] = _split_last_step(scalars)
                batch.points, batch.columns = None, scalars
            if batch.points is not None:  # a watched flush: its points as they are
                if batch.points:
                    self.new_nonfinite = self._add_points(batch.points) or self.new_nonfinite
                    new_points += len(batch.points)
                continue
            if batch.scalars.hparams:
                self.config.update(batch.scalars.hparams)
                self.config_version += 1
            if len(batch.scalars):
                self.new_nonfinite = self._add(batch.scalars) or self.new_nonfinite
                new_points += len(batch.scalars)
        if not self.single_file and relist:
            self._read_hparams_yml()
        return new_points

    def _add(self, scalars) -> bool:
        """Keep the points; True if any value is NaN or infinite."""
        # Files are read in creation order and each file in write order, so concatenation order
        # is write order, which is what resolve_relogged needs.
        if len(scalars) <= SMALL_ADD:
            tags = scalars.tags
            return self._add_points(list(zip([tags[i] for i in scalars.tag_ids.tolist()], scalars.steps.tolist(),
                                              scalars.values.tolist(), scalars.wall_times.tolist())))
        self._step_range_known = False
        for tag_id, tag in enumerate(scalars.tags):
            sel = scalars.tag_ids == tag_id
            if not sel.any():
                continue
            chunks = self._chunks.setdefault(tag, _TagChunks())
            chunks.flush_tail()
            chunks.steps.append(scalars.steps[sel])
            chunks.values.append(scalars.values[sel])
            chunks.walls.append(scalars.wall_times[sel])
            chunks.merged = None
        return not bool(np.isfinite(scalars.values).all())

    def _add_points(self, points: list[Point]) -> bool:
        """A few points (a watched step's), kept one by one; True if any value is NaN or infinite."""
        self._step_range_known = False
        finite = True
        for tag, step, value, wall in points:
            chunks = self._chunks.get(tag)
            if chunks is None:
                chunks = self._chunks[tag] = _TagChunks()
            chunks.tail.append((step, value, wall))
            chunks.merged = None
            finite = finite and math.isfinite(value)
        return not finite

    @property
    def pending_bytes(self) -> int:
        """Bytes of unfinished records at the ends of the files (a trainer mid-write, or a cut file)."""
        return sum(self._pending.get(path, 0) for path in self._listed)

    def writer_evidence(self) -> dict[Path, float | None]:
        """Each event file with the wall time of its first record (who wrote it, and when)."""
        return {path: loader.first_wall_time for path, loader in self.files.items()}

    def _read_hparams_yml(self) -> None:
        for candidate in [self.path / "hparams.yml", *self.path.glob("*/hparams.yml")]:
            try:
                mtime = candidate.stat().st_mtime
            except OSError:
                continue  # none there (or gone since listed)
            if self._yml_seen.get(candidate) == mtime:
                continue
            self._yml_seen[candidate] = mtime
            import yaml  # here, not at the top: most runs have no hparams.yml

            try:
                loaded = yaml.safe_load(candidate.read_text(encoding="utf-8", errors="replace"))
            except (OSError, yaml.YAMLError) as e:
                self.config_problems.append(f"{candidate.name}: {e}".splitlines()[0])
                continue
            if not isinstance(loaded, dict):
                self.config_problems.append(f"{candidate.name}: not a mapping of settings")
                continue
            for key, value in loaded.items():
                self.config.setdefault(str(key), value)
            self.config_version += 1

    # -- series ------------------------------------------------------------------------------
    @property
    def tags(self) -> list[str]:
        return list(self._dropped[0]) if self._dropped is not None else sorted(self._chunks)

    def drop_points(self) -> None:
        """Forget the points once the run is analysed (an audit of thousands of runs keeps what
        it says about each, not every curve); its tags, step range and superseded count stay,
        and a series asked for later is read again from the files."""
        if self._dropped is None:
            self.step_range()
            self._dropped = (self.tags, self.superseded_points)
            self._chunks = {}

    def forget(self, keep_from: dict[str, int]) -> None:
        """Let go of each tag's points before index ``keep_from[tag]`` (of a tag not named, all
        but its last point): the rules carry what they need of them, so a long run's memory is
        what the rules keep, not its length. ``recent`` gives what is kept; ``series`` reads
        the files again for the rest (a plot or snapshot verdicts of a run read this way)."""
        for tag, chunks in self._chunks.items():
            series = self.recent(tag)
            if series is None:
                continue
            i = keep_from.get(tag, series.total - 1)
            if i > series.first:
                chunks.forget_before(i)
                self._forgotten = True

    def _read_again(self) -> None:
        """Every point again, from the files (after ``drop_points`` or ``forget``). The files
        are read to their ends by new readers, which then follow them."""
        self._dropped, self._forgotten, self.more = None, False, False
        self.reads += 1
        self._chunks, self._held, self._step_range_known = {}, {}, False
        readers = {}
        for path in self.files:
            readers[path] = reader = EventFile(path)
            batch = reader.read_new()
            if len(batch.scalars):
                self._add(batch.scalars)
        self.files = readers

    def step_range(self) -> tuple[int, int] | None:
        """(first, last) step over every tag, or None without points."""
        if not self._step_range_known:
            ends = [(self._first_step(t, s), int(s.steps[-1])) for t in self.tags
                    if (s := self.recent(t)) is not None and len(s.steps)]
            self._step_range = (min(e[0] for e in ends), max(e[1] for e in ends)) if ends else None
            self._step_range_known = True
        return self._step_range

    def _first_step(self, tag: str, kept: Series) -> int:
        first = self._chunks[tag].first_step if kept.first else None
        return int(kept.steps[0]) if first is None else first

    def series(self, tag: str) -> Series | None:
        """The tag's whole series."""
        if self._forgotten:
            self._read_again()
        return self.recent(tag)

    def recent(self, tag: str) -> Series | None:
        if self._dropped is not None and tag in self._dropped[0]:
            self._read_again()
        chunks = self._chunks.get(tag)
        if chunks is None:
            return None
        if chunks.merged is None:
            appended = self._appended(chunks)
            merged = appended if appended is not None else self._merged(chunks)
            if merged is None:  # steps went back into points let go of: only every point resolves them
                self._read_again()
                return self.recent(tag)
            chunks.merged = merged
        return chunks.merged

    @staticmethod
    def _appended(chunks: _TagChunks) -> Series | None:
        """The watched case, in plain Python: only a step or a few read one by one, each past
        the last; None (nothing done) for anything else, which ``_merged`` resolves."""
        if chunks.steps or not chunks.tail:
            return None
        steps, values, walls = zip(*chunks.tail)
        last = chunks.series[0]
        if last.n and steps[0] <= last.last() or any(a >= b for a, b in zip(steps, steps[1:])):
            return None
        chunks.tail = []
        return chunks.extended(steps, values, walls)

    @staticmethod
    def _merged(chunks: _TagChunks) -> Series | None:
        """The series with the points read since it was last asked for. Points that only go on
        (steps rising past the last one) are appended, at the cost of what was added; steps
        that go back or repeat are resolved over the whole series (``resolve_relogged``), or
        None where its first points were let go of (``forget``)."""
        chunks.flush_tail()
        merged = chunks.series
        if not chunks.steps:  # nothing new (asked for again after ``forget``)
            return chunks.extended(merged[0].view[:0], merged[1].view[:0], merged[2].view[:0])
        steps = chunks.steps[0] if len(chunks.steps) == 1 else np.concatenate(chunks.steps)
        values = chunks.values[0] if len(chunks.values) == 1 else np.concatenate(chunks.values)
        walls = chunks.walls[0] if len(chunks.walls) == 1 else np.concatenate(chunks.walls)
        chunks.steps, chunks.values, chunks.walls = [], [], []
        rising = bool(np.all(steps[1:] > steps[:-1]))
        appends = merged[0].n == 0 or (steps[0] if rising else steps.min()) > merged[0].last()  # all past the last
        if not appends:  # steps went back into the series: resolved over the whole of it, the past changes
            if merged[0].start:
                return None
            steps = np.concatenate((merged[0].view, steps))
            values = np.concatenate((merged[1].view, values))
            walls = np.concatenate((merged[2].view, walls))
            for part in merged:
                part.clear()
        if not (appends and rising):
            keep = resolve_relogged(steps)  # what is kept is strictly increasing in step
            if not keep.all():
                # Points at one step written in a row (kohya logs every micro-batch of a gradient
                # accumulation at the same global step) are not a resume: only points that a
                # later, lower step replaces are counted.
                dropped = np.flatnonzero(~keep)
                later_min = np.minimum.accumulate(steps[::-1])[::-1]
                went_back = steps[dropped] > later_min[np.minimum(dropped + 1, len(steps) - 1)]
                chunks.superseded += int(went_back.sum())
                if not appends:  # (repeats among the new points alone leave what was handed out as it was)
                    chunks.replaced += len(dropped)
                steps, values, walls = steps[keep], values[keep], walls[keep]
        return chunks.extended(steps, values, walls)

    @property
    def superseded_points(self) -> int:
        """Points replaced because steps went back (a resume); counted once series are built."""
        if self._dropped is not None:
            return self._dropped[1]
        return sum(c.superseded for c in self._chunks.values())
