"""How well lrwatch's findings and snapshot verdicts match what really happened, on the
realistic corpus (``fixtures/corpus``: LoRA on a tiny diffusion model, labelled by a
held-out eval loss, never by lrwatch).

    python bench/detection.py [--split train|eval|later|fresh|all] [--runs] [--every K] [--fried-loss X]
                              [threshold options, e.g. --loss-over-best 3]

Prints, per split of the seeds: fried runs caught by a critical finding before
their first fried eval step, healthy runs with a critical finding, the median lead time,
and snapshot verdict accuracy (fried/at_risk exactly where the snapshot's own eval loss
says fried).
``--every K`` judges the runs as a trainer that logs every K-th step would have written them
(ai-toolkit's ``log_every``): the same points, every K-th step kept, written again with
tensorboard's RecordWriter into a temporary folder.
Thresholds are chosen by leave-one-task-out on the tasks of ``fixtures/tasks.py``
(``bench/transfer.py``); this corpus, one task's seeds, was not used to choose them: it is a
further check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lrwatch  # noqa: E402
from lrwatch.analysis import CRITICAL, Thresholds  # noqa: E402
from lrwatch.snapshots import DEFAULT_FRIED_LOSS  # noqa: E402

CORPUS = ROOT / "fixtures" / "corpus"
# train: thresholds are chosen on these; eval: reported on these (but seen while rules were
# compared, README); later: added a pair at a time, each pair's first run through lrwatch led
# to a change of the loss-level rule; fresh: added after the last change, run as they came.
SPLITS = {"train": (0, 1), "eval": (2, 3), "later": (4, 5, 6, 7), "fresh": (8, 9)}


def corpus_run(name: str):
    """A corpus run's logs, read."""
    from lrwatch.runs import Run

    (tb,) = (CORPUS / "runs" / name / "logs").iterdir()
    run = Run(tb / "network_train")
    run.refresh()
    return run


def every_kth_step(name: str, k: int, dest: Path) -> Path:
    """The run's logs as a trainer logging every ``k``-th step would have written them."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    full = corpus_run(name)
    folder = dest / name / full.path.parent.name / "network_train"
    folder.mkdir(parents=True)
    rows = sorted((int(step), tag, float(value), float(wall)) for tag in full.tags
                  if (series := full.series(tag)) is not None
                  for step, value, wall in zip(series.steps, series.values, series.wall_times) if step % k == 0)
    with open(folder / f"events.out.tfevents.{int(time.time())}.corpus.1.0", "wb") as fh:
        writer = RecordWriter(fh)
        writer.write(Event(wall_time=rows[0][3] if rows else 0.0, file_version="brain.Event:2").SerializeToString())
        for step, tag, value, wall in rows:
            writer.write(Event(wall_time=wall, step=step, summary=Summary(
                value=[Summary.Value(tag=tag, simple_value=value)])).SerializeToString())
    return dest / name


def judge_run(name: str, label: dict, thresholds: Thresholds, fried_loss: float, logs: Path | None = None) -> dict:
    run_dir = CORPUS / "runs" / name
    result = lrwatch.audit([logs or run_dir / "logs"], thresholds=thresholds, snapshots=[run_dir / "output"],
                           manifest=False, fried_loss=fried_loss)
    state = result.runs[0]
    criticals = [f for f in state.analysis.findings if f.severity == CRITICAL] if state.analysis else []
    first_critical = min((f.step for f in criticals), default=None)
    fried_at = label["first_fried_step"]
    verdicts = {Path(s.path).name: s.verdict for s in result.monitor.snapshots.by_run.get(state.run.path, [])}
    right = 0
    for snap in label["snapshots"]:
        says_fried = verdicts.get(snap["file"]) in ("fried", "at_risk")
        known = verdicts.get(snap["file"]) not in (None, "unknown")
        right += known and says_fried == snap["fried"]
    return {"name": name, "fry": label["fry"], "fried_at": fried_at, "first_critical": first_critical,
            "first_kind": next((f.kind for f in criticals if f.step == first_critical), None),
            "found": first_critical is not None and fried_at is not None,
            "caught": first_critical is not None and fried_at is not None and first_critical < fried_at,
            "snapshots": len(label["snapshots"]), "verdicts_right": right}


def summary(rows: list[dict]) -> list[str]:
    fried = [r for r in rows if r["fry"] != "healthy"]
    healthy = [r for r in rows if r["fry"] == "healthy"]
    lines = []
    for kind in ("permanent", "transient"):
        group = [r for r in fried if r["fry"] == kind]
        caught = [r for r in group if r["caught"]]
        leads = [r["fried_at"] - r["first_critical"] for r in caught]
        lead = f", median lead {statistics.median(leads):.0f} steps" if leads else ""
        lines.append(f"  {kind} fries caught before their first fried step: {len(caught)}/{len(group)}{lead}")
        found = [r for r in group if r["found"]]
        after = [r["first_critical"] - r["fried_at"] for r in found if r["first_critical"] >= r["fried_at"]]
        late = f", median {statistics.median(after):.0f} steps after it when later" if after else ""
        lines.append(f"    found at all: {len(found)}/{len(group)}{late}")
    false = [r for r in healthy if r["first_critical"] is not None]
    lines.append(f"  healthy runs with a critical finding: {len(false)}/{len(healthy)}"
                 + (f" ({', '.join(r['name'] for r in false)})" if false else ""))
    snaps = sum(r["snapshots"] for r in rows)
    right = sum(r["verdicts_right"] for r in rows)
    lines.append(f"  snapshot verdicts right: {right}/{snaps} ({100 * right / max(1, snaps):.0f}%)")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", choices=[*SPLITS, "all"], default="all")
    ap.add_argument("--runs", action="store_true", help="one line per run")
    ap.add_argument("--every", type=int, default=1, help="keep every K-th step's points (a sparse logger)")
    ap.add_argument("--fried-loss", type=float, default=DEFAULT_FRIED_LOSS, help="as lrwatch's --fried-loss")
    defaults = Thresholds()
    for f in fields(Thresholds):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                        default=getattr(defaults, f.name))
    args = ap.parse_args()
    thresholds = Thresholds(**{f.name: getattr(args, f.name) for f in fields(Thresholds)})
    labels = json.loads((CORPUS / "labels.json").read_text())
    splits = list(SPLITS) if args.split == "all" else [args.split]
    sparse = tempfile.TemporaryDirectory(prefix="lrwatch-corpus-") if args.every > 1 else None
    for split in splits:
        names = [n for n, lab in labels.items() if lab["spec"]["seed"] in SPLITS[split]]
        rows = [judge_run(n, labels[n], thresholds, args.fried_loss,
                          every_kth_step(n, args.every, Path(sparse.name)) if sparse else None) for n in sorted(names)]
        print(f"{split} seeds {SPLITS[split]}: {len(rows)} runs "
              f"({sum(r['fry'] == 'healthy' for r in rows)} healthy, "
              f"{sum(r['fry'] == 'permanent' for r in rows)} permanent fries, "
              f"{sum(r['fry'] == 'transient' for r in rows)} transient)")
        if args.runs:
            for r in rows:
                print(f"    {r['name']:24s} {r['fry']:9s} fried at {r['fried_at']!s:5s} first critical "
                      f"{r['first_critical']!s:5s} {r['first_kind'] or '':26s} verdicts {r['verdicts_right']}/"
                      f"{r['snapshots']}")
        print("\n".join(summary(rows)))
    if sparse:
        sparse.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
