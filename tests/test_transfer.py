"""lrwatch's defaults on the three realistic tasks of fixtures/tasks (bench/transfer.py), with
and without a validation loss in the logs: the README's table, pinned so that a change to a
rule shows what it costs. (The defaults were chosen on all three tasks; the leave-one-task-out
numbers, each task judged with thresholds chosen on the other two, come from
``python bench/transfer.py``, ~6 minutes, and are in the README.)"""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import transfer  # noqa: E402

from lrwatch.analysis import Thresholds  # noqa: E402
from lrwatch.snapshots import DEFAULT_FRIED_LOSS, DEFAULT_FRIED_VALIDATION  # noqa: E402

# task -> (with a validation loss?) -> what the README says: (count, out of)
MEASURED = {
    "dit_flow": {False: {"caught": (31, 33), "verdicts": (1079, 1104), "last_safe": (4, 5)},
                 True: {"caught": (33, 33), "verdicts": (1088, 1104), "last_safe": (5, 5),
                        "at_first_validation": (29, 29), "best_within_5": (36, 36)}},
    "mlp_eps": {False: {"caught": (29, 30), "verdicts": (1065, 1120), "last_safe": (6, 6)},
                True: {"caught": (29, 30), "verdicts": (1102, 1120), "last_safe": (6, 6),
                       "at_first_validation": (26, 26), "best_within_5": (37, 37)}},
    "unet_v": {False: {"caught": (38, 39), "verdicts": (1074, 1103), "last_safe": (9, 10)},
               True: {"caught": (39, 39), "verdicts": (1097, 1103), "last_safe": (10, 10),
                      "at_first_validation": (35, 35), "best_within_5": (29, 29)}},
}


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    cases = transfer.cases()
    scratch = tmp_path_factory.mktemp("without-validation")
    return cases, {c: transfer.without_validation(c, scratch) for c in cases}


@pytest.mark.parametrize("task", sorted(MEASURED))
@pytest.mark.parametrize("with_validation", [False, True])
def test_the_defaults_on_each_task_are_what_the_readme_says(logs, task, with_validation):
    cases, plain = logs
    held = [c for c in cases if c.task == task]
    assert len(held) == 56
    judged = [transfer.Judged(c, c.folder / "logs" if with_validation else plain[c], Thresholds()) for c in held]
    got = transfer.summary(judged, (DEFAULT_FRIED_LOSS, DEFAULT_FRIED_VALIDATION), with_validation)
    assert got["healthy_critical"][0] == 0  # no clear-healthy run is stopped, on any task
    assert got["predict_healthy_stopped"][0] == 0
    for key, (count, total) in MEASURED[task][with_validation].items():
        assert got[key] == (count, total), key
    right, total = got["verdicts"]
    assert right / total >= 0.95
