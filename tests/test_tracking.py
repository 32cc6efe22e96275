"""Experiment trackers: every train_log.jsonl record mirrored to TensorBoard / wandb (offline)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_train import CFG, TensorStore, directions, planted

from stagediff.config import LogConfig, WandbConfig, load_config
from stagediff.errors import StagediffError
from stagediff.tracking import Trackers
from stagediff.train import train_sae


def _train(tmp_path, trackers, stage="S"):
    torch.set_num_threads(1)
    train_sae(TensorStore(planted(directions())), CFG, tokens=256 * 60, out_dir=tmp_path / stage, stage=stage,
              on_record=trackers.hook(stage))
    return [json.loads(line) for line in (tmp_path / stage / "train_log.jsonl").read_text().splitlines()]


def test_tensorboard_gets_every_log_record(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, [f"log.tensorboard={tmp_path / 'tb'}"])
    trackers = Trackers(cfg.log, tmp_path)
    log = _train(tmp_path, trackers)
    trackers.close()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    mse = events.Scalars("S/mse")
    assert [e.step for e in mse] == [r["step"] for r in log] and len(log) >= 10
    assert [e.value for e in mse] == pytest.approx([r["mse"] for r in log], rel=1e-6)
    assert "S/explained_variance" in events.Tags()["scalars"]


def test_no_tracker_no_hook_and_missing_packages_are_named(tmp_path, monkeypatch):
    assert Trackers(LogConfig(), tmp_path).hook("S") is None  # nothing set: training runs as before
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(StagediffError, match=r"wandb is not installed: pip install 'stagediff\[wandb\]'"):
        Trackers(LogConfig(wandb=WandbConfig(project="p")), tmp_path)
    cfg = load_config(None, ["log.wandb={project: diffs, entity: me}"])
    assert cfg.log.wandb == WandbConfig(project="diffs", entity="me")


def test_wandb_offline_run_holds_the_records(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = Trackers(LogConfig(wandb=WandbConfig(project="stagediff-test")), tmp_path)
    log = _train(tmp_path, trackers)
    summary = dict(trackers._wandb.summary)
    trackers.close()
    assert summary["S/step"] == log[-1]["step"] and summary["S/mse"] == pytest.approx(log[-1]["mse"])
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # a file `wandb sync` uploads later
