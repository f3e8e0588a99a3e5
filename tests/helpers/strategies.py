"""Strategies that tests put into real training jobs (importable by ``class_path`` in subprocesses)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_power.strategies import FSDPStrategy, ModelParallelStrategy


class AdamBoringModel(BoringModel):
    def configure_optimizers(self):  # FSDP cannot reload the empty state of plain SGD
        return torch.optim.Adam(self.parameters(), lr=0.01)


def sharded_fsdp_trainer(root: Path, max_steps: int) -> pl.Trainer:
    """A 1-process FSDP1 Trainer on CPU with sharded checkpoints, no logger and no automatic checkpoints."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=FSDPStrategy(state_dict_type="sharded"),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


class KillBeforeSwap(ModelParallelStrategy):
    """FSDP2 that SIGKILLs every rank while saving ``last.ckpt`` at ``kill_at_step``: after all shards are staged,
    before the staged checkpoint replaces the old one (the worst moment for a non-atomic save)."""

    def __init__(self, kill_at_step: int, data_parallel_size: Any = "auto", tensor_parallel_size: Any = 1) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size)
        self.kill_at_step = kill_at_step
        self._saving_step = -1

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        self._saving_step = checkpoint["global_step"]
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def _swap_into_place(self, staging: Path, path: Path) -> None:
        if self._saving_step == self.kill_at_step and path.name == "last.ckpt":
            os.kill(os.getpid(), signal.SIGKILL)
        super()._swap_into_place(staging, path)
