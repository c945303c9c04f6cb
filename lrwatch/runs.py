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
from typing import Protocol

import numpy as np

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

    def series(self, tag: str) -> Series | None: ...


class GrowingArray:
    """An array that grows at its end: an append costs what it adds (amortised), and ``view``
    is the filled part without a copy, read-only: what was handed out is shared, and a view
    taken earlier keeps its length and values."""

    __slots__ = ("data", "n", "_view", "_read_only")

    def __init__(self, dtype: type = np.float64) -> None:
        self.data: np.ndarray = np.empty(0, dtype)
        self.n = 0
        self._view: np.ndarray | None = None
        self._read_only = _read_only(self.data)  # all of ``data``, unwritable: its slices are too

    def extend(self, x: np.ndarray | Sequence[float]) -> None:
        need = self.n + len(x)
        if need > len(self.data):
            grown = np.empty(max(need, 2 * len(self.data)), self.data.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data, self._read_only = grown, _read_only(grown)
        self.data[self.n : need] = x
        self.n, self._view = need, None

    def clear(self) -> None:
        self.data, self.n, self._view = self.data[:0], 0, None
        self._read_only = _read_only(self.data)

    @property
    def view(self) -> np.ndarray:
        if self._view is None:  # a slice of an unwritable array: a third of setting a view's flag
            self._view = self._read_only[: self.n]
        return self._view


def _read_only(data: np.ndarray) -> np.ndarray:
    view = data[:]
    view.flags.writeable = False
    return view


class _TagChunks:
    """One tag's points as read: the series so far (merged, in step order), then arrays from
    large reads and plain tuples from a watched step's few records (cheaper to append one by
    one), merged in when the series is asked for."""

    __slots__ = ("steps", "values", "walls", "tail", "merged", "superseded", "replaced", "series")

    def __init__(self) -> None:
        self.series = (GrowingArray(np.int64), GrowingArray(), GrowingArray())  # steps, values, wall times
        self.steps: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.walls: list[np.ndarray] = []
        self.tail: list[tuple[int, float, float]] = []  # (step, value, wall time), after the arrays
        self.merged: Series | None = None
        self.superseded = 0  # points replaced by a later write of an earlier step (a resume)
        self.replaced = 0  # points replaced by a later write of the same or an earlier step

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
        return Series(self.series[0].view, self.series[1].view, self.series[2].view, self.replaced)


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

    def refresh(self, relist: bool = True, only: Collection[Path] | None = None) -> int:
        """Read what is new in every file of the run; return the number of new scalar points.
        ``relist=False`` reads the files already known without listing the folder again (the
        watcher relists on its own schedule: a listing costs more than reading a new step);
        ``only``, without a listing: just these of them (the files written, as file events tell)."""
        new_points = 0
        self.new_nonfinite = False
        listed = relist or not self.files
        if listed:  # the paths already known stay the same objects: dict look-ups by identity, not by comparison
            known = {path: path for path in self.files}
            for known_file in self.files.values():  # (a file kept open whose path names another now is let go)
                known_file.check_name()
            self._listed = [known.get(path, path) for path in self.event_files()]
        for path in self._listed:
            if only is not None and not listed and path not in only:
                continue
            loader = self.files.get(path)
            if loader is None:
                loader = self.files[path] = EventFile(path)
            batch = loader.read_new()
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

    def _read_again(self) -> None:
        self._dropped = None
        for path in self.files:
            batch = EventFile(path).read_new()
            if len(batch.scalars):
                self._add(batch.scalars)

    def step_range(self) -> tuple[int, int] | None:
        """(first, last) step over every tag, or None without points."""
        if not self._step_range_known:
            ends = [(int(s.steps[0]), int(s.steps[-1])) for t in self.tags
                    if (s := self.series(t)) is not None and len(s.steps)]
            self._step_range = (min(e[0] for e in ends), max(e[1] for e in ends)) if ends else None
            self._step_range_known = True
        return self._step_range

    def series(self, tag: str) -> Series | None:
        if self._dropped is not None and tag in self._dropped[0]:
            self._read_again()
        chunks = self._chunks.get(tag)
        if chunks is None:
            return None
        if chunks.merged is None:
            appended = self._appended(chunks)
            chunks.merged = appended if appended is not None else self._merged(chunks)
        return chunks.merged

    @staticmethod
    def _appended(chunks: _TagChunks) -> Series | None:
        """The watched case, in plain Python: only a step or a few read one by one, each past
        the last; None (nothing done) for anything else, which ``_merged`` resolves."""
        if chunks.steps or not chunks.tail:
            return None
        steps, values, walls = zip(*chunks.tail)
        last = chunks.series[0]
        if last.n and steps[0] <= last.data[last.n - 1] or any(a >= b for a, b in zip(steps, steps[1:])):
            return None
        chunks.tail = []
        return chunks.extended(steps, values, walls)

    @staticmethod
    def _merged(chunks: _TagChunks) -> Series:
        """The series with the points read since it was last asked for. Points that only go on
        (steps rising past the last one) are appended, at the cost of what was added; steps
        that go back or repeat are resolved over the whole series (``resolve_relogged``)."""
        chunks.flush_tail()
        merged = chunks.series
        steps = chunks.steps[0] if len(chunks.steps) == 1 else np.concatenate(chunks.steps)
        values = chunks.values[0] if len(chunks.values) == 1 else np.concatenate(chunks.values)
        walls = chunks.walls[0] if len(chunks.walls) == 1 else np.concatenate(chunks.walls)
        chunks.steps, chunks.values, chunks.walls = [], [], []
        rising = bool(np.all(steps[1:] > steps[:-1]))
        if not (rising and (merged[0].n == 0 or steps[0] > merged[0].data[merged[0].n - 1])):
            steps = np.concatenate((merged[0].view, steps))
            values = np.concatenate((merged[1].view, values))
            walls = np.concatenate((merged[2].view, walls))
            for part in merged:
                part.clear()
            keep = resolve_relogged(steps)  # what is kept is strictly increasing in step
            if not keep.all():
                # Points at one step written in a row (kohya logs every micro-batch of a gradient
                # accumulation at the same global step) are not a resume: only points that a
                # later, lower step replaces are counted.
                dropped = np.flatnonzero(~keep)
                later_min = np.minimum.accumulate(steps[::-1])[::-1]
                went_back = steps[dropped] > later_min[np.minimum(dropped + 1, len(steps) - 1)]
                chunks.superseded += int(went_back.sum())
                chunks.replaced += len(dropped)
                steps, values, walls = steps[keep], values[keep], walls[keep]
        return chunks.extended(steps, values, walls)

    @property
    def superseded_points(self) -> int:
        """Points replaced because steps went back (a resume); counted once series are built."""
        if self._dropped is not None:
            return self._dropped[1]
        return sum(c.superseded for c in self._chunks.values())
