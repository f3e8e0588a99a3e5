"""Tiny settings of the demo so that a test trains in seconds on 2 CPU cores."""

from __future__ import annotations

TINY_MODEL = {"width": 32, "depth": 1, "head_dim": 16, "context_length": 16}
TINY_DATA = {"context_length": 16, "batch_size": 8, "max_bytes": 100_000, "max_val_bytes": 4_096}


def tiny_cli_args(max_steps: int = 6, logger_dir: str = ".") -> list[str]:
    """Overrides of ``examples/configs/gpt_demo.yaml`` for a CPU fit of a few steps, logged to ``metrics.csv``."""
    args = [f"--model.init_args.{k}={v}" for k, v in TINY_MODEL.items()]
    args += [f"--data.init_args.{k}={v}" for k, v in TINY_DATA.items()]
    return args + [
        f"--trainer.max_steps={max_steps}",
        "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={logger_dir}",
        "--trainer.logger.name=csv",
    ]
