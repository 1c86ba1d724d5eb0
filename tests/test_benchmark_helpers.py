"""The benchmark scripts' own logic: command-line scoping and how a target is judged."""

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("_common"), importlib.import_module("rl100")
    finally:
        sys.path.remove(str(BENCH))


def test_scoped_overrides_apply_to_every_task_or_to_the_named_one(bench):
    common, _ = bench
    items = ["a.b=1", "pushcube:demos.n_episodes=15", "pickcube:c=2", "d=x:y"]
    assert common.scoped_overrides(items, "pushcube") == ["a.b=1", "demos.n_episodes=15", "d=x:y"]
    assert common.scoped_overrides(items, "pickcube") == ["a.b=1", "c=2", "d=x:y"]
    assert common.scoped_overrides(items, "stackcube") == ["a.b=1", "d=x:y"]


def _state(tmp: Path, rates: list[float], accepted: list[bool]) -> Path:
    run = tmp / "run"
    run.mkdir()
    names = [f"offline_{i}" for i in range(len(accepted))]
    evals = {"stage1": {"success_rate": rates[0]}}
    evals.update({n: {"success_rate": r} for n, r, a in zip(names, rates[1:], accepted) if a})
    decisions = [{"iteration": n, "accepted": a, "gate_verdict": a} for n, a in zip(names, accepted)]
    (run / "rl100_state.json").write_text(json.dumps({"evals": evals, "decisions": decisions}))
    return run


@pytest.mark.parametrize(
    ("rates", "accepted", "never_drops", "plus_10"),
    [
        ([0.49, 0.55, 0.57, 0.59], [True, True, True], True, True),  # exactly 10 points (49 -> 59 of 100)
        ([0.20, 0.25, 0.30], [True, True], True, True),  # 10 points, though 0.2 + 0.1 > 0.3 in floats
        ([0.49, 0.55, 0.58], [True, True], True, False),  # 9 points
        ([0.49, 0.62, 0.58], [True, True], False, False),  # a drop
        ([0.90, 0.80, 0.95], [False, True], True, True),  # the rejected dip does not count; 0.95 reached
    ],
)
def test_rl100_targets_count_accepted_iterates_and_whole_points(
    bench, tmp_path, rates, accepted, never_drops, plus_10
):
    _, rl100 = bench
    run = _state(tmp_path, rates, accepted)
    targets = rl100.task_result(run, tmp_path / "missing")["targets"]
    assert targets["success_never_drops_across_accepted"] is never_drops
    assert targets["final_ge_stage1_plus_10pts_or_095"] is plus_10
    assert targets["bad_update_rejected_by_gate"] is False  # no bad-update run
