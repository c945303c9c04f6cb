"""The trainers lrwatch reads, in one table, and which one wrote a run.

Each trainer logs the same three things under its own names, and two of them
(OneTrainer, ai-toolkit) log only the product d×lr under their "lr" tag. A
:class:`Layout` says which tags hold lr, d×lr, d and the loss, how its logged
steps relate to the schedule, how its snapshots are named and where its saved
config is; :func:`read_layout` picks the layout from the tags and folder names
(or ``--trainer``) and, where only d×lr is logged, rebuilds the schedule from
the trainer's config (or the user's ``--schedule`` options) so d = d×lr / lr.

Adding a trainer means adding a row to ``LAYOUTS`` (and, if it saves its
schedule somewhere, a config reader) plus a fixture.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lrwatch.runs import RunLike, Series
from lrwatch.schedule_config import MAX_RESTARTS, KnownSchedule
from lrwatch.schedules import cosine_restart_steps, cyclic_restart_steps
from lrwatch.sources import version_key
from lrwatch.tags import Group, TagMap

# Optimizers whose d×lr the trainers log (by the names each trainer's config uses).
_ADAPTIVE = re.compile(r"prodigy|dadapt", re.IGNORECASE)


@dataclass(frozen=True)
class ScheduleOptions:
    """The schedule given on the command line, for logs that hold only d×lr and no config."""

    schedule: str  # cosine_with_restarts (diffusers/kohya hard restarts) | rex (lrwatch's RexWithRestarts)
    cycles: int
    max_steps: int
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine_with_restarts", "rex"):
            raise ValueError("--schedule is cosine_with_restarts (cosine) or rex")
        if self.max_steps < 1 or self.warmup < 0 or self.warmup >= self.max_steps:
            raise ValueError("--max-steps must be positive and longer than --warmup")
        if not 1 <= self.cycles <= min(self.max_steps - self.warmup, MAX_RESTARTS):
            raise ValueError(f"--cycles must be at least 1 and at most the steps after warmup (and {MAX_RESTARTS})")


@dataclass
class TrainerConfig:
    """What a trainer's saved config says: the optimizer, the schedule, accumulation."""

    path: Path | None = None
    adaptive: bool | None = None  # None: the optimizer is not known
    schedule: KnownSchedule | None = None
    accumulation: int = 1
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Layout:
    name: str  # what --trainer takes
    title: str
    tags: TagMap
    sees: str  # what lrwatch can and cannot see in this trainer's logs (README, `lrwatch tags`)
    source: str  # where the trainer writes these tags (its current source)
    lr_tags_hold_dlr: bool = False  # its lr tags hold lr×d with an adaptive optimizer
    step_unit: str = "optimizer step"
    lr_step_offset: int = 0  # the lr logged at step s is the schedule's after s + offset scheduler steps
    # A snapshot's name (a file's without its suffix, or a folder's): groups step, base (the run's
    # output name, when the name has it) and epoch (when it has one).
    snapshot_name: str | None = None
    # The lr of a save's last update was logged this many steps before the save's step: kohya
    # saves at N after update N, whose lr it logged at N-1; OneTrainer's save-<G> holds G updates,
    # the G-th logged (after its scheduler step) at batch G-1 with the next lr, so its own at G-2.
    save_lag: int = 1
    saves_on_interrupt: bool = False  # Ctrl-C makes it save the current (fried) weights: stop with SIGTERM
    config: Callable[[RunLike], TrainerConfig] | None = None


Multiplier = Callable[[np.ndarray], np.ndarray]  # optimizer steps -> the schedule's multiplier there


def _check_schedule(max_steps: float, warmup: float, cycles: float) -> None:
    """Settings lrwatch can rebuild: whole, finite, and no more cycles than steps (or MAX_RESTARTS)."""
    for name, value in (("steps", max_steps), ("warmup", warmup), ("cycles", cycles)):
        if not (math.isfinite(value) and value == int(value) and value >= (0 if name == "warmup" else 1)):
            raise ValueError(f"{name}={value!r} is not a whole number lrwatch can use")
    if max_steps - warmup < 1 or cycles > min(max_steps - warmup, MAX_RESTARTS):
        raise ValueError(f"{int(cycles)} cycles over {int(max_steps)} steps ({int(warmup)} warmup) is not a schedule")


def _with_warmup(warmup: int, inner: Multiplier) -> Multiplier:
    def multiplier(k: np.ndarray) -> np.ndarray:
        k = np.asarray(k, np.int64)
        out = np.empty(len(k))
        ramp = k < warmup
        out[ramp] = k[ramp] / max(1, warmup)
        out[~ramp] = inner(k[~ramp] - warmup)
        return out
    return multiplier


def _schedule_multiplier(kind: str, max_steps: int, warmup: int, cycles: float,
                         min_factor: float = 0.0) -> tuple[Multiplier, list[int]]:
    """A hard-restart cosine (OneTrainer's, diffusers') or lrwatch's REX: multiplier and restarts."""
    _check_schedule(max_steps, warmup, cycles)
    span = max_steps - warmup
    if kind == "rex":  # lrwatch.schedulers.RexWithRestarts, cycles of equal length
        length = max(1, round(span / cycles))

        def rex(j: np.ndarray) -> np.ndarray:  # schedules.rex_shape (b = 0.5), on arrays
            z = 1.0 - (j % length) / length
            return z / (0.5 + 0.5 * z)
        return _with_warmup(warmup, rex), \
            [r for r in cyclic_restart_steps(max_steps, length, warmup=warmup) if r < max_steps]

    def cosine(j: np.ndarray) -> np.ndarray:
        progress = np.minimum(j, span - 1) / span
        return min_factor + (1 - min_factor) * np.maximum(0.0, 0.5 * (1 + np.cos(np.pi * ((progress * cycles) % 1.0))))

    return _with_warmup(warmup, cosine), cosine_restart_steps(max_steps, warmup, int(cycles))


def _logged_schedule(name: str, multiplier: Multiplier, restarts: list[int], max_steps: int | None,
                     warmup: int, base_lr: float, offset: int, accumulation: int, source: str,
                     save_every: int | None = None) -> KnownSchedule:
    """A schedule in the trainer's logged steps: logged step s is optimizer step (s + offset) // accumulation."""
    def lr_at(steps: np.ndarray) -> np.ndarray:
        return base_lr * multiplier((np.asarray(steps, np.int64) + offset) // accumulation)

    logged = tuple(r * accumulation - offset for r in restarts)
    total = None if max_steps is None else max_steps * accumulation - offset
    return KnownSchedule(name, total, warmup * accumulation, logged, save_every, lr_at=lr_at, source=source)


# --- config readers ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _parsed(path: Path, version: tuple) -> object:
    """A config file's contents, parsed once per version: the watcher re-reads a run's layout
    on every change, and a trainer's config changes far less often than its logs."""
    import yaml  # here, not at the top: most commands never read a YAML file

    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def _load(path: Path) -> object:
    return _parsed(path, version_key(path))


_ONETRAINER_SAVE = re.compile(r"-(?:save|backup)-(?P<step>\d+)-(?P<epoch>\d+)-(?P<epoch_step>\d+)")


def _onetrainer_config(run: RunLike) -> TrainerConfig:
    """``<workspace>/config/<prefix><time>.json`` next to ``<workspace>/tensorboard/<prefix><time>/``
    (GenericTrainer.__save_config_to_workspace); the schedule as create_lr_scheduler builds it. Its
    length needs the epoch's length in batches, which only the names of saves and backups tell."""
    workspace = run.path.parent.parent
    configs = sorted((workspace / "config").glob("*.json")) if (workspace / "config").is_dir() else []
    if not configs:
        return TrainerConfig(notes=[f"no OneTrainer config found in {workspace / 'config'}"])
    same = [c for c in configs if c.stem == run.path.name]
    earlier = [c for c in configs if c.stem <= run.path.name]
    path = (same or earlier or configs)[-1]
    try:
        cfg = _load(path)
    except (OSError, ValueError) as e:
        return TrainerConfig(path, notes=[f"{path.name} could not be read: {e}"])
    if not isinstance(cfg, dict):
        return TrainerConfig(path, notes=[f"{path.name} is not a OneTrainer config"])
    optimizer = cfg.get("optimizer")
    name = optimizer.get("optimizer") if isinstance(optimizer, dict) else optimizer
    out = TrainerConfig(path, adaptive=bool(_ADAPTIVE.search(name)) if isinstance(name, str) and name else None)
    try:
        accumulation = int(cfg.get("gradient_accumulation_steps") or 1)
        epochs = int(cfg.get("epochs") or 0)
        if not 1 <= accumulation <= 1_000_000 or epochs < 0:
            raise ValueError(f"gradient_accumulation_steps={accumulation}, epochs={epochs}")
        warmup_raw = float(cfg.get("learning_rate_warmup_steps") or 0)
        cycles = float(cfg.get("learning_rate_cycles") or 1)
        min_factor = float(cfg.get("learning_rate_min_factor") or 0)
        base_lr = float(cfg.get("learning_rate") or 1.0)
    except (TypeError, ValueError, OverflowError) as e:
        out.notes.append(f"{path.name}: {e}")
        return out
    out.accumulation = accumulation
    scheduler = str(cfg.get("learning_rate_scheduler") or "")
    epoch_length = _onetrainer_epoch_length(workspace)
    if scheduler != "COSINE_WITH_HARD_RESTARTS":
        if scheduler in ("CONSTANT", "LINEAR", "COSINE", "REX"):
            out.schedule = KnownSchedule(scheduler, None, 0, (), None, source=path.name)
        else:
            out.notes.append(f"{path.name}: scheduler {scheduler or '?'} is not rebuilt by lrwatch")
        return out
    if epoch_length is None or not epochs:
        out.notes.append(f"{path.name} names {scheduler} with {cycles:g} cycles, but its length depends on the "
                         "epoch's length, which no save or backup name in the workspace tells yet: give "
                         "--max-steps (optimizer steps of the whole run)")
        return out
    try:
        if not all(math.isfinite(x) for x in (warmup_raw, cycles, min_factor, base_lr)) or base_lr <= 0 \
                or not 0 < epochs * epoch_length / accumulation < 1e9:
            raise ValueError("learning rate, warmup, cycles or the run's length out of range")
        total = int(epoch_length * epochs / accumulation)
        warmup = int(warmup_raw / accumulation) if warmup_raw > 1 else int(warmup_raw * total) if warmup_raw > 0 else 0
        multiplier, restarts = _schedule_multiplier("cosine", total, warmup, cycles, min_factor)
    except ValueError as e:
        out.notes.append(f"{path.name}: not a schedule lrwatch can rebuild ({e})")
        return out
    out.schedule = _logged_schedule(scheduler.lower(), multiplier, restarts, total, warmup, base_lr, 1,
                                    accumulation, f"{path.name}; an epoch of {epoch_length} batches, from a save name")
    return out


def _onetrainer_epoch_length(workspace: Path) -> int | None:
    for folder in (workspace / "save", workspace / "backup"):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            m = _ONETRAINER_SAVE.search(entry.name)
            if m and int(m["epoch"]) >= 1:
                return (int(m["step"]) - int(m["epoch_step"])) // int(m["epoch"])
    return None


def _ai_toolkit_config(run: RunLike) -> TrainerConfig:
    """``<training_folder>/<name>/config.yaml`` (BaseTrainProcess.save_training_config); the run's
    folder is ``<log_dir>/<name>_<time>``, so the config is looked for next to it and above it."""
    name = re.sub(r"_\d{8}-\d{6}$", "", run.path.name)
    candidates: list[Path] = []
    for base in [run.path, *list(run.path.parents)[:3]]:  # log_dir is free; training_folder often its sibling
        candidates += [base / "config.yaml", base / name / "config.yaml", *sorted(base.glob(f"*/{name}/config.yaml"))]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        return TrainerConfig(notes=[f"no ai-toolkit config.yaml found for {name} near the logs"])
    import yaml

    try:
        raw = _load(path)
        process = raw["config"]["process"][0]  # type: ignore[index]
    except (OSError, yaml.YAMLError, ValueError, KeyError, IndexError, TypeError) as e:
        return TrainerConfig(path, notes=[f"{path} is not an ai-toolkit config ({type(e).__name__}: {e})"])
    process = _mapping(process)
    train = _mapping(process.get("train"))
    optimizer = train.get("optimizer")
    out = TrainerConfig(path, adaptive=bool(_ADAPTIVE.search(optimizer)) if isinstance(optimizer, str) and optimizer
                        else None)
    scheduler = str(train.get("lr_scheduler", "constant"))
    params = _mapping(train.get("lr_scheduler_params"))
    try:
        steps = int(train["steps"])
        base_lr = float(train.get("lr", 1.0))
        save_every = int(_mapping(process.get("save")).get("save_every") or 0) or None
        if scheduler == "cosine_with_restarts":  # torch's CosineAnnealingWarmRestarts
            t0 = int(params.get("T_0", steps))
            mult = float(params.get("T_mult", 1))
            eta = float(params.get("eta_min", 0.0)) / base_lr if base_lr else 0.0
        elif scheduler in ("constant", "linear", "cosine", "step", "constant_with_warmup"):
            out.schedule = KnownSchedule(scheduler, steps, 0, (), save_every, source=path.name)
            return out
        else:
            out.notes.append(f"{path.name}: scheduler {scheduler} is not rebuilt by lrwatch")
            return out
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        out.notes.append(f"{path.name}: the schedule's settings could not be read ({type(e).__name__}: {e})")
        return out
    if not (t0 >= 1 and 1 <= mult <= 10 and math.isfinite(eta) and 1 <= steps < 1e9 and steps / t0 <= MAX_RESTARTS):
        out.notes.append(f"{path.name}: steps={steps}, T_0={t0}, T_mult={mult}: not a schedule lrwatch can rebuild")
        return out

    def multiplier(k: np.ndarray) -> np.ndarray:
        if mult == 1:
            pos, length = k % t0, np.full(len(k), t0)
        else:
            starts, lengths = zip(*(cyclic_position(int(x), t0, mult) for x in k)) if len(k) else ((), ())
            pos, length = k - np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
        return eta + (1 - eta) * 0.5 * (1 + np.cos(np.pi * pos / length))

    restarts = [r for r in cyclic_restart_steps(steps, t0, mult) if r < steps]
    out.schedule = _logged_schedule("cosine_with_restarts (CosineAnnealingWarmRestarts)", multiplier, restarts,
                                    steps, 0, base_lr, 1, 1, path.name, save_every)
    return out


def _mapping(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def cyclic_position(step: int, first: int, mult: float) -> tuple[int, int]:
    """(start, length) of the SGDR cycle holding ``step``."""
    start, length, cycle = 0, first, 0
    while step >= start + length:
        start += length
        cycle += 1
        length = max(1, round(first * mult**cycle))
    return start, length


# --- the table -----------------------------------------------------------------------------------

_KOHYA_EPOCH = ("loss/epoch_average", "loss/epoch")  # step = the epoch number: never a per-step loss

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout(
        "kohya", "kohya sd-scripts / musubi-tuner",
        TagMap(lr=("lr/{group}", "lr"), dlr=("lr/d*lr/{group}", "lr/d*lr"),
               loss=("loss/current", "loss/average", "loss")),
        "lr, d×lr and d per param group; loss per step; the schedule from --log_config",
        "sd-scripts train_network.py generate_step_logs (lr/<desc>, lr/d*lr/<desc>, and the duplicate "
        "lr/group<i> of its for-else); musubi-tuner training/trainer_base.py",
        snapshot_name=r"^(?P<base>.+?)-step(?P<step>\d{8})$",
    ),
    Layout(
        "kohya-base-lr", "kohya forks logging d×lr as lr/<desc>, the raw lr as lr/base/<desc>",
        TagMap(lr=("lr/base/{group}",), dlr=("lr/{group}",), loss=("loss/current", "loss/average", "loss")),
        "lr, d×lr and d per param group; loss per step",
        "forks of sd-scripts' generate_step_logs",
        snapshot_name=r"^(?P<base>.+?)-step(?P<step>\d{8})$",
    ),
    Layout(
        "onetrainer", "OneTrainer",
        TagMap(lr=(), dlr=("lr/{group}",), loss=("loss/train_step", "smooth_loss/train_step")),
        "lr×d per group (no raw lr, no d): d needs the schedule, rebuilt from the workspace's config/*.json "
        "(or --schedule ...); loss per optimizer step; steps count batches",
        "modules/modelSetup/BaseModelSetup.py report_to_tensorboard (lr/<name> after Optimizer.maybe_adjust_lrs); "
        "modules/trainer/GenericTrainer.py (loss/train_step at train_progress.global_step)",
        lr_tags_hold_dlr=True, step_unit="batch (micro-batch with gradient accumulation)", lr_step_offset=1,
        snapshot_name=r"^(?P<base>.+?)-save-(?P<step>\d+)-(?P<epoch>\d+)-\d+$", save_lag=2,
        saves_on_interrupt=True,  # scripts/train.py: KeyboardInterrupt -> trainer.end() with backup_before_save
        config=_onetrainer_config,
    ),
    Layout(
        "ai-toolkit", "ai-toolkit (ostris)",
        TagMap(lr=(), dlr=("lr",), loss=("loss",)),
        "one d×lr (param group 0) every log_every steps (default 100): d needs the schedule, rebuilt from "
        "config.yaml (or --schedule ...); loss",
        "jobs/process/BaseSDTrainProcess.py (add_scalar 'lr' = d*lr for prodigy/dadaptation, loss_dict keys)",
        lr_tags_hold_dlr=True, lr_step_offset=1, snapshot_name=r"^(?P<base>.+)_(?P<step>\d{9})$",
        config=_ai_toolkit_config,
    ),
    Layout(
        "simpletuner", "SimpleTuner",
        TagMap(lr=("learning_rate",), dlr=("prodigy_effective_lr",), d=("prodigy_d",), loss=("train_loss",),
               lr_is_d_when_d_logged=True),
        "with Prodigy: d and d×lr (lr = d×lr / d); otherwise the lr; loss",
        "simpletuner/helpers/training/trainer.py (learning_rate holds d with prodigy; prodigy_d, "
        "prodigy_effective_lr, train_loss)",
        snapshot_name=r"^checkpoint-(?P<step>\d+)$",
    ),
    Layout(
        "diffusers", "diffusers example scripts",
        TagMap(lr=("lr",), dlr=(), loss=("train_loss", "loss")),
        "lr and loss; d is not logged by these scripts, so d cannot be checked",
        "examples/*/train_*_lora.py (accelerator.log lr, train_loss or loss)",
        snapshot_name=r"^checkpoint-(?P<step>\d+)$",
    ),
)}
# Snapshot names of every trainer, most specific first (each pattern once).
SNAPSHOT_NAMES: list[tuple[str, re.Pattern[str]]] = list({
    layout.snapshot_name: (layout.name, re.compile(layout.snapshot_name, re.ASCII))
    for layout in LAYOUTS.values() if layout.snapshot_name}.values())
CUSTOM = Layout("custom", "tags given with --lr-tag/--dlr-tag/--loss-tag", TagMap(), "as mapped", "")

_AI_TOOLKIT_FOLDER = re.compile(r"_\d{8}-\d{6}$")  # BaseTrainProcess.setup_tensorboard: <name>_%Y%m%d-%H%M%S


def detect(run: RunLike) -> tuple[Layout, str]:
    """The layout of a run's logs and why (tags present, folder names)."""
    tags = set(run.tags)
    if tags & {"prodigy_d", "prodigy_effective_lr"} or {"learning_rate", "train_loss"} <= tags:
        return LAYOUTS["simpletuner"], "tags learning_rate/prodigy_d/train_loss"
    if any(t.startswith("lr/base/") for t in tags):
        return LAYOUTS["kohya-base-lr"], "tags lr/base/<group>"
    if any(t.startswith("lr/d*lr") for t in tags) or tags & {"loss/current", "loss/average", *_KOHYA_EPOCH}:
        return LAYOUTS["kohya"], "tags lr/d*lr or loss/current"
    if tags & {"loss/train_step", "smooth_loss/train_step"} or (
            run.path.parent.name == "tensorboard" and (run.path.parent.parent / "config").is_dir()):
        return LAYOUTS["onetrainer"], "tags loss/train_step" if tags & {"loss/train_step"} else \
            "a OneTrainer workspace (tensorboard/ next to config/)"
    if "lr" in tags and _AI_TOOLKIT_FOLDER.search(run.path.name):
        return LAYOUTS["ai-toolkit"], f"tag lr in a folder named <name>_<date>-<time> ({run.path.name})"
    if "lr" in tags and "train_loss" in tags:
        return LAYOUTS["diffusers"], "tags lr and train_loss"
    if "lr" in tags and "loss" in tags:
        return LAYOUTS["diffusers"], ("tags lr and loss; ai-toolkit logs the same names (its lr holds d×lr): "
                                      "if this is an ai-toolkit run, pass --trainer ai-toolkit")
    return LAYOUTS["kohya"], "no trainer's tags recognised; kohya's names tried"


@dataclass
class Reading:
    """How one run's tags are read: the layout, why, the tag map and the schedule to use."""

    layout: Layout
    why: str
    tag_map: TagMap
    schedule: KnownSchedule | None = None  # None: take the schedule from kohya's logged config, if any
    notes: list[str] = field(default_factory=list)
    steps_per_update: int = 1  # logged steps per optimizer step (OneTrainer counts batches)


def read_layout(run: RunLike, trainer: str | None = None, tag_map: TagMap | None = None,
                schedule: ScheduleOptions | None = None) -> Reading:
    """The reading of ``run``: ``tag_map`` (the user's tag options) wins, then ``trainer``, then detection."""
    if tag_map is not None:
        return Reading(CUSTOM, "--lr-tag/--dlr-tag/--loss-tag", tag_map)
    if trainer is not None:
        layout, why = LAYOUTS[trainer], "--trainer"
    else:
        layout, why = detect(run)
    reading = Reading(layout, why, layout.tags)
    if not layout.lr_tags_hold_dlr:
        return reading
    config = layout.config(run) if layout.config else TrainerConfig()
    reading.notes += config.notes
    reading.steps_per_update = config.accumulation
    if config.adaptive is False:  # a plain optimizer: its lr tags hold the lr itself
        reading.tag_map = replace(layout.tags, lr=layout.tags.dlr, dlr=())
        reading.notes.append(f"{config.path.name if config.path else 'the config'} names a non-adaptive optimizer: "
                             "the lr tags are read as the lr")
        return reading
    if schedule is not None:
        multiplier, restarts = _schedule_multiplier("rex" if schedule.schedule == "rex" else "cosine",
                                                    schedule.max_steps, schedule.warmup, schedule.cycles)
        reading.schedule = _logged_schedule(schedule.schedule, multiplier, restarts, schedule.max_steps,
                                            schedule.warmup, 1.0, layout.lr_step_offset, config.accumulation,
                                            "--schedule options")
    elif config.schedule is not None:
        reading.schedule = config.schedule
    if reading.schedule is None or reading.schedule.lr_at is None:
        reading.notes.append(
            f"{layout.title} logs only d×lr: without its schedule, d cannot be computed, so d's growth and the "
            "next restart cannot be predicted (non-finite values, spikes at restarts and the loss are checked); "
            "give the schedule with --schedule cosine_with_restarts --cycles N --max-steps N [--warmup N]")
    return reading


_GROUP_INDEX = re.compile(r"group\d+")


SAME, DIFFERS, PENDING = "same", "differs", "pending"


def series_match(a: Series | None, b: Series | None, start: int = 0) -> str:
    """Whether two series are one: SAME (equal), DIFFERS (they differ where both have points, or
    one is not logged: for good, as long as points are only appended) or PENDING (equal where
    both have points, one has more: a flush can split twins). Points before ``start`` were
    compared already."""
    if a is None or b is None:
        return SAME if a is b else DIFFERS
    n = min(a.total, b.total)
    if start < max(a.first, b.first):  # points let go of (``Run.forget``) were compared already
        raise ValueError(f"points from {start} on are not all kept")
    sa, sb = slice(start - a.first, n - a.first), slice(start - b.first, n - b.first)
    if not (np.array_equal(a.steps[sa], b.steps[sb]) and np.array_equal(a.values[sa], b.values[sb], equal_nan=True)):
        return DIFFERS
    return SAME if a.total == b.total else PENDING


def group_match(run: RunLike, group: Group, twin: Group, start: int = 0) -> str:
    """``series_match`` over a group's lr, d*lr and d tags and a candidate twin's."""
    found = [series_match(run.recent(a) if a else None, run.recent(b) if b else None, start)
             for a, b in ((twin.lr_tag, group.lr_tag), (twin.dlr_tag, group.dlr_tag), (twin.d_tag, group.d_tag))]
    return DIFFERS if DIFFERS in found else PENDING if PENDING in found else SAME


def twin_candidates(groups: list[Group]) -> list[tuple[Group, list[Group]]]:
    """Each ``group<i>`` with the groups it may be a twin of, in the order they are tried.
    kohya's current main logs every group twice (``lr/<desc>`` and, from a for-else,
    ``lr/group<i>``): a ``group<i>`` whose series equal another group's is that group."""
    named = [k for k in groups if not _GROUP_INDEX.fullmatch(k.name)]
    return [(g, named) for g in groups if _GROUP_INDEX.fullmatch(g.name)]


def _twin_of(run: RunLike, group: Group, groups: list[Group]) -> Group | None:
    if not _GROUP_INDEX.fullmatch(group.name):
        return None
    return next((k for k in groups if not _GROUP_INDEX.fullmatch(k.name) and group_match(run, group, k) == SAME),
                None)


def tag_roles(run: RunLike, reading: Reading) -> dict[str, str]:
    """What each of the run's scalar tags is taken as under ``reading`` (for ``lrwatch tags``)."""
    tags = set(run.tags)
    roles = {tag: "not used" for tag in tags}
    for tag in tags & set(_KOHYA_EPOCH):
        roles[tag] = "epoch loss (step = epoch number): not used"
    groups = reading.tag_map.groups(tags)
    for g in groups:
        twin = _twin_of(run, g, groups)
        if twin is not None:
            for folded in (g.lr_tag, g.dlr_tag, g.d_tag):
                if folded:
                    roles[folded] = f"the same series as group {twin.name} (kohya logs each group twice): folded"
            continue
        if g.lr_tag:
            roles[g.lr_tag] = f"lr of group {g.name}"
        if g.dlr_tag:
            roles[g.dlr_tag] = f"d×lr of group {g.name}" + (
                "" if g.lr_tag or g.d_tag else " (lr from the schedule)" if reading.schedule and reading.schedule.lr_at
                else " (no lr: d unknown)")
        if g.d_tag:
            roles[g.d_tag] = f"d of group {g.name}"
    if reading.tag_map.lr_is_d_when_d_logged and any(g.d_tag for g in reading.tag_map.groups(tags)):
        for pattern in reading.tag_map.lr:
            if pattern in tags:
                roles[pattern] = "d (this trainer logs d under its lr tag with Prodigy): not used"
    loss = reading.tag_map.loss_tag(tags)
    if loss:
        roles[loss] = "loss"
    return roles


def describe_tags(run: RunLike, reading: Reading) -> list[dict[str, object]]:
    """Each scalar tag of ``run``: points, first and last step, and what it is taken as."""
    roles = tag_roles(run, reading)
    rows: list[dict[str, object]] = []
    for tag in run.tags:
        series = run.series(tag)
        steps = series.steps if series is not None else np.zeros(0, np.int64)
        rows.append({"tag": tag, "points": len(steps), "first_step": int(steps[0]) if len(steps) else None,
                     "last_step": int(steps[-1]) if len(steps) else None, "taken_as": roles[tag]})
    return rows
