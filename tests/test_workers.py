"""workers.py: the order units run in, one process or several (the processes themselves: test_reliability)."""

from __future__ import annotations

import pytest

from stagediff.errors import StagediffError
from stagediff.workers import Job, auto_workers, run_jobs


def _graph(log: list[str], done: set[str] = frozenset()) -> list[Job]:
    """The stage-wise graph's shape: S -> D, M -> F_via_D, F_via_M and controls, plus two baselines needing nothing."""
    costs = {"S": 4.0, "D": 1.0, "M": 1.0, "F_via_D": 1.0, "F_via_M": 1.0, "D_ctl0": 1.0, "M_ctl0": 1.0, "crosscoder": 5.0, "diffsae": 3.5}
    needs = {"D": ("S",), "M": ("S",), "F_via_D": ("D",), "F_via_M": ("M",), "D_ctl0": ("D",), "M_ctl0": ("M",)}
    return [Job(u, needs.get(u, ()), c, begin=lambda u=u: None if u in done else f"fp-{u}", work=lambda u=u: log.append(u))
            for u, c in costs.items()]


def test_one_worker_runs_each_unit_after_its_needs_longest_remaining_work_first():
    log: list[str] = []
    run_jobs(_graph(log), 1, spec=lambda u: u, folder=None)
    assert sorted(log) == sorted(j.unit for j in _graph([]))
    for unit, need in (("D", "S"), ("M", "S"), ("F_via_D", "D"), ("F_via_M", "M"), ("D_ctl0", "D"), ("M_ctl0", "M")):
        assert log.index(need) < log.index(unit)
    # S heads 4 + 6 units of work: before the crosscoder (5), which comes before the diff-SAE (3.5; D heads 3)
    assert log[:3] == ["S", "crosscoder", "diffsae"]


def test_finished_units_are_skipped_and_a_need_outside_the_run_is_named(tmp_path):
    log: list[str] = []
    run_jobs(_graph(log, done={"S", "crosscoder"}), 1, spec=lambda u: u, folder=None)
    assert "S" not in log and "crosscoder" not in log and len(log) == 7
    # several workers, a resumed run where everything is done: each skip frees the units that need it, no process starts
    everything = {j.unit for j in _graph([])}
    run_jobs(_graph(log, done=everything), 2, spec=lambda u: u, folder=tmp_path / "jobs")
    assert len(log) == 7 and not (tmp_path / "jobs").exists()
    orphan = [Job("F", ("E",), 1.0, begin=lambda: "fp", work=lambda: None), Job("E", ("F",), 1.0, begin=lambda: "fp", work=lambda: None)]
    with pytest.raises(StagediffError, match="cannot order"):
        run_jobs(orphan, 1, spec=lambda u: u, folder=None)


def test_auto_workers():
    assert auto_workers("cpu", cores=2) == 2
    assert auto_workers("cpu", cores=1) == 1
    assert auto_workers("cpu", cores=64) == 4
    assert auto_workers("cuda", cores=64) == 1


def test_a_negative_worker_count_is_named(tmp_path):
    from stagediff.config import load_config
    from stagediff.pipeline import Run, step_train

    with pytest.raises(StagediffError, match=r"workers=-2: use 0"):
        step_train(Run(load_config(overrides=["workers=-2", "device=cpu"]), tmp_path))
