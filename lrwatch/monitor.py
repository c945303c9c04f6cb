"""The pipeline audit and watch share: find runs, read what is new, analyse, report
findings not reported before. An audit is one pass of it; the watcher repeats the
pass whenever files change."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lrwatch.analysis import Analysis, Finding, Thresholds, analyze
from lrwatch.runs import Run, discover
from lrwatch.snapshots import SnapshotBook
from lrwatch.tags import TagMap


@dataclass
class RunState:
    run: Run
    analysis: Analysis | None = None
    reported: set[tuple] = field(default_factory=set)


class Monitor:
    """Runs under ``roots``, each analysed again when new points arrive."""

    def __init__(
        self,
        roots: list[str | os.PathLike[str]],
        tag_map: TagMap | None = None,
        thresholds: Thresholds | None = None,
        snapshots: SnapshotBook | None = None,
    ) -> None:
        # Absolute (not resolved: a symlinked log folder keeps the name it was given), so that
        # paths from the file-system observer compare equal to the runs' paths.
        self.roots = [Path(os.path.abspath(r)) for r in roots]
        self._as_given = {root: str(r) for root, r in zip(self.roots, roots)}  # for messages
        self.tag_map = tag_map or TagMap()
        self.thresholds = thresholds or Thresholds()
        self.states: dict[Path, RunState] = {}
        self.snapshots = snapshots

    def missing_roots(self) -> list[Path]:
        return [r for r in self.roots if not r.exists()]

    def as_given(self, root: Path) -> str:
        """A root spelled the way the user gave it."""
        return self._as_given.get(root, str(root))

    def discover(self) -> list[Run]:
        """Add runs that appeared under the roots since the last call."""
        new = []
        for root in self.roots:
            if not root.exists():
                continue
            base = root if root.is_dir() else root.parent
            for path in discover(root):
                if path not in self.states:
                    run = Run(path, base)
                    self.states[path] = RunState(run)
                    new.append(run)
        return new

    def poll(self, run_paths: set[Path] | None = None, rediscover: bool = True) -> list[tuple[Run, Finding]]:
        """Read what is new (in the given runs, or all) and return findings not reported before."""
        if rediscover:
            self.discover()
        out: list[tuple[Run, Finding]] = []
        for path, state in self.states.items():
            if run_paths is not None and path not in run_paths:
                continue
            if not state.run.refresh() and state.analysis is not None:
                continue
            state.analysis = analyze(state.run, self.tag_map, self.thresholds)
            for finding in state.analysis.findings:
                key = finding.key()
                if key in state.reported:
                    continue
                state.reported.add(key)
                out.append((state.run, finding))
        return out

    def judge_snapshots(self) -> None:
        """Verdicts for the snapshot folders (if any), from the current analyses."""
        if self.snapshots is not None:
            self.snapshots.judge(self.runs)

    def run_for(self, file_path: Path) -> Path | None:
        """The run folder a changed file belongs to (known runs only)."""
        for path in self.states:
            if file_path == path or path in file_path.parents:
                return path
        return None

    @property
    def runs(self) -> list[RunState]:
        return [self.states[p] for p in sorted(self.states)]
