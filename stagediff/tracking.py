"""Experiment trackers: each training log record mirrored to wandb and/or TensorBoard (`log:` in the config).

train_log.jsonl stays the record of a run; trackers are optional copies for the
dashboards researchers already use. Every stage logs under its own name
(`S/mse`, `D/l0`, ...) against its own step. wandb runs offline with
WANDB_MODE=offline (sync later with `wandb sync`); TensorBoard writes local files.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from stagediff.config import LogConfig
from stagediff.errors import StagediffError


class Trackers:
    """The trackers a config asks for, opened once per run; `record(stage, rec)` after each log record."""

    def __init__(self, cfg: LogConfig, run_dir: str | Path, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self._wandb = self._tensorboard = None
        if cfg.wandb is not None:
            try:
                import wandb
            except ImportError:
                raise StagediffError("log.wandb is set but wandb is not installed: pip install 'stagediff[wandb]' "
                                     "(or remove log.wandb)") from None
            self._wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=self.run_dir.name,
                                     dir=str(self.run_dir), config=config, reinit=True)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise StagediffError("log.tensorboard is set but tensorboard is not installed: "
                                     "pip install 'stagediff[tensorboard]' (or remove log.tensorboard)") from None
            self._tensorboard = SummaryWriter(log_dir=str(Path(cfg.tensorboard).expanduser()))
        self._stages: set[str] = set()

    @property
    def active(self) -> bool:
        """True when a tracker (wandb, TensorBoard) is set."""
        return self._wandb is not None or self._tensorboard is not None

    def hook(self, stage: str) -> Callable[[dict], None] | None:
        """The `on_record` callback of `stage`'s training (None when no tracker is set)."""
        return functools.partial(self.record, stage) if self.active else None

    def record(self, stage: str, rec: dict) -> None:
        """Mirror one train_log.jsonl record (its numbers) of `stage`."""
        step = int(rec["step"])
        scalars = {f"{stage}/{k}": float(v) for k, v in rec.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._wandb is not None:
            if stage not in self._stages:  # each stage counts its own steps
                self._wandb.define_metric(f"{stage}/step")
                self._wandb.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self._wandb.log({**scalars, f"{stage}/step": step})
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, step)
            self._tensorboard.flush()  # a killed run keeps what it logged (a record every ~1% of a stage)
        self._stages.add(stage)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tensorboard is not None:
            self._tensorboard.close()
