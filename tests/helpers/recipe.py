"""The all-features recipe (``gpt_mup_power.yaml`` + UpdateSparsityMonitor + step recorder) as console-script jobs,
shrunk to a few steps; shared by ``tests/test_all_features.py`` and ``benchmarks/gpu_check.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.helpers.callbacks import final_weights
from tests.helpers.jobs import CONFIGS, job_env, read_metrics, run_cli

GLOBAL_BATCH = 8
CONTEXT = 16
TOKENS_PER_STEP = GLOBAL_BATCH * CONTEXT
MAX_STEPS = 8
STRATEGIES = {
    "single": [],
    "ddp": ["--config", str(CONFIGS / "strategy_ddp.yaml")],
    "fsdp": ["--config", str(CONFIGS / "strategy_fsdp.yaml")],
    "fsdp2": ["--config", str(CONFIGS / "strategy_fsdp2.yaml")],
}


SPARSITY_MONITOR = [
    "--trainer.callbacks+=lightning_power.UpdateSparsityMonitor",
    "--trainer.callbacks.every_n_steps=2",
    "--trainer.callbacks.rank_every_n_checks=2",
    "--trainer.callbacks.save_masks=true",
]


def recipe_args(
    devices: int = 1,
    strategy: str | None = None,
    max_steps: int = MAX_STEPS,
    width: int = 64,
    depth: int = 2,
    context: int = CONTEXT,
    global_batch: int = GLOBAL_BATCH,
    checkpoint_every: int = 4,
    accelerator: str = "cpu",
    precision: str = "32-true",
    monitor=(),
    sparsity: bool = True,
    extra=(),
) -> list[str]:
    """``gpt_mup_power.yaml`` (muP with base width 32, delta 64; Power; TokenCounter) shrunk to a few steps, plus the
    sparsity monitor (unless ``sparsity`` is false; ``monitor``: more of its arguments) and the step recorder;
    checkpoints every ``checkpoint_every`` steps to ``ckpt/``. ``global_batch`` sequences per step are split over
    ``devices``."""
    tokens_per_step = global_batch * context
    return [
        "fit",
        "--config",
        str(CONFIGS / "gpt_mup_power.yaml"),
        *STRATEGIES[strategy or "single"],
        f"--model.init_args.width={width}",
        f"--model.init_args.depth={depth}",
        "--model.init_args.head_dim=16",
        f"--model.init_args.context_length={context}",
        f"--data.init_args.context_length={context}",
        f"--data.init_args.batch_size={global_batch // devices}",
        f"--data.init_args.max_bytes={max(100_000, 2 * max_steps * tokens_per_step)}",
        "--data.init_args.max_val_bytes=4096",
        f"--lr_scheduler.init_args.warmup_tokens={2 * tokens_per_step}",
        f"--lr_scheduler.init_args.total_tokens={max_steps * tokens_per_step}",
        f"--lr_scheduler.init_args.decay_tokens={2 * tokens_per_step}",
        f"--trainer.max_steps={max_steps}",
        f"--trainer.devices={devices}",
        f"--trainer.accelerator={accelerator}",
        f"--trainer.precision={precision}",
        "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir=.",
        "--trainer.logger.name=csv",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.dirpath=ckpt",
        f"--trainer.callbacks.every_n_train_steps={checkpoint_every}",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.save_last=true",
        *(SPARSITY_MONITOR if sparsity else []),
        *monitor,
        "--trainer.callbacks+=tests.helpers.callbacks.RecordSteps",
        "--trainer.callbacks.path=steps.jsonl",
        *extra,
    ]


def fit_in(directory: Path, args: list[str], timeout: float = 300) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    run_cli(args, directory, timeout)
    return directory


def fit_until_killed(directory: Path, args: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lightning_power.cli", *args]
    killed = subprocess.run(command, cwd=directory, env=job_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, f"expected SIGKILL, got {killed.returncode}\n{killed.stderr[-4000:]}"


def sparsity_history(run: Path) -> list[tuple[int, dict[str, float]]]:
    return [(step, metrics) for step, metrics in json.loads((run / "steps.sparsity.json").read_text())]


def train_losses(run: Path, version: int = 0) -> dict[int, float]:
    """The logged ``train/loss`` (averaged over ranks) by optimizer step (the CSV's step is the step before it)."""
    metrics = read_metrics(run / "csv" / f"version_{version}" / "metrics.csv")
    return {step + 1: value for step, value in metrics["train/loss"]}


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint file, or of a sharded checkpoint folder (converted to one file beside it)."""
    if checkpoint.is_dir():
        whole = checkpoint.with_name(checkpoint.name + ".pt")
        dcp_to_torch_save(checkpoint, whole)
        return torch.load(whole, weights_only=False)["state_dict"]
    return final_weights(checkpoint)
