"""Callbacks that tests put into real training jobs (they must be importable by ``class_path`` in subprocesses)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_power import TokenCounter, UpdateSparsityMonitor


class KillAtStep(pl.Callback):
    """SIGKILL this process (every rank) right after optimizer step ``step``, before that step's checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordSteps(pl.Callback):
    """Append one JSON line per optimizer step to ``path`` (rank 0): step, LR of every group, loss, first input byte,
    and the tokens seen when a TokenCounter runs. At the end of the fit, an UpdateSparsityMonitor's whole history
    (restored from the checkpoint on resume) goes to ``<path>.sparsity.json``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._batch_first_bytes: list[int] = []
        self._last_step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_first_bytes.append(int(batch[0][0, 0]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._lrs = [group["lr"] for group in optimizer.param_groups]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # a gradient-accumulation micro-batch: no optimizer step yet
            return
        self._last_step = trainer.global_step
        if trainer.global_rank != 0:
            return
        record = {
            "step": trainer.global_step,
            "lrs": self._lrs,
            "loss": float(outputs["loss"]),
            "first_bytes": self._batch_first_bytes,
        }
        counter = _find(trainer, TokenCounter)
        if counter is not None:
            record["tokens_seen"] = counter.tokens_seen
        self._batch_first_bytes = []
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_end(self, trainer, pl_module) -> None:
        monitor = _find(trainer, UpdateSparsityMonitor)
        if monitor is not None and trainer.global_rank == 0:
            self.path.with_suffix(".sparsity.json").write_text(json.dumps(monitor.history))


class RecordBatches(pl.Callback):
    """Every rank appends each training batch's inputs, as one JSON list of rows, to ``<path>.rank<global rank>``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps(batch[0].tolist()) + "\n")


def read_batches(path: Path, rank: int) -> list[list[list[int]]]:
    """The batches :class:`RecordBatches` wrote on ``rank``, in order."""
    return [json.loads(line) for line in Path(f"{path}.rank{rank}").read_text().splitlines()]


def _find(trainer: pl.Trainer, kind: type) -> pl.Callback | None:
    return next((callback for callback in trainer.callbacks if isinstance(callback, kind)), None)


def read_records(path: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run repeats the steps after its checkpoint)."""
    records = {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def final_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
