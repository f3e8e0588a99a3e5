"""The ``lightning-power`` command: a LightningCLI (fit / validate / test) plus the project's own tools.

Two LightningCLI traps are fixed here:

- a scheduler chosen under ``lr_scheduler:`` steps once per **optimizer step** (LightningCLI's default is per epoch);
- the optimizer chosen under ``optimizer:`` is built inside ``configure_optimizers``, i.e. **after** the strategy has
  wrapped and sharded the model. LightningCLI builds it at start-up, so under ``ModelParallelStrategy`` (FSDP2) it would
  hold stale, pre-sharding parameters and train nothing.

Usage::

    lightning-power fit --config examples/configs/gpt_demo.yaml
    lightning-power coord-check --help
    lightning-power sparsity-overlap --help
    lightning-power recommend --help
"""

from __future__ import annotations

import importlib
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from types import MethodType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.cli import LightningCLI, ReduceLROnPlateau, instantiate_class

from lightning_power.strategies import use_atomic_checkpoint_io

# Commands that are not Trainer entry points: name -> "module:function" taking argv and returning an exit code.
TOOLS: dict[str, str] = {
    "coord-check": "lightning_power.mup.coord_check:main",
    "sparsity-overlap": "lightning_power.sparsity.overlap:main",
    "recommend": "lightning_power.recommend:main",
    "calibrate": "lightning_power.calibrate:main",
}


def configure_optimizers_from_config(
    lightning_module: pl.LightningModule, optimizer_init: dict[str, Any], lr_scheduler_init: dict[str, Any] | None
) -> dict[str, Any]:
    """Build the configured optimizer over the module's *current* parameters, and step its scheduler per step."""
    optimizer = instantiate_class(lightning_module.parameters(), optimizer_init)
    if lr_scheduler_init is None:
        return {"optimizer": optimizer}
    scheduler = instantiate_class(optimizer, lr_scheduler_init)
    if isinstance(scheduler, ReduceLROnPlateau):  # it needs a metric, so it stays on the validation cadence
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": scheduler.monitor}}
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(
            "lr_scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau has no `monitor` argument to name the metric it "
            "steps on; use lightning.pytorch.cli.ReduceLROnPlateau with init_args.monitor (e.g. val/loss) instead"
        )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LightningPowerCLI(LightningCLI):
    """LightningCLI whose YAML optimizer is built lazily and whose YAML scheduler steps per optimizer step.

    It also adds a ``LearningRateMonitor`` (per step) whenever the trainer has a logger, writes checkpoint files
    atomically on any filesystem (:class:`~lightning_power.strategies.AtomicCheckpointIO` in place of Lightning's
    default ``TorchCheckpointIO``), and lets a rerun overwrite the saved ``config.yaml``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        self._refuse_changed_model_on_resume()
        super()._parse_ckpt_path()

    def _refuse_changed_model_on_resume(self) -> None:
        """A resume whose config changes the checkpoint's model (width, depth, ...) is an error, not a silent no-op.

        LightningCLI rebuilds the model from a checkpoint file's saved hyper-parameters and drops the config's without
        a word; a sharded checkpoint folder instead fails deep inside loading. Both hide the user's mistake. Only
        ``fit`` resumes: ``validate`` and ``test`` evaluate the checkpoint's own model, whatever the config says.
        """
        subcommand = self.config.get("subcommand")
        if subcommand != "fit":
            return
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        model = self.config[subcommand].get("model") if subcommand else None
        init_args = getattr(model, "init_args", None)
        if not isinstance(ckpt_path, str) or init_args is None:
            return
        saved = _saved_model_hparams(ckpt_path)
        changed = [
            f"{key}={value!r} (checkpoint: {saved[key]!r})"
            for key, value in vars(init_args).items()
            if key in saved and value != saved[key]
        ]
        if changed:
            self.parser.error(
                f"--ckpt_path {ckpt_path}: this config changes the checkpoint's model: {', '.join(changed)}. A resume "
                "continues the checkpoint's model; drop these changes, or start a new run without --ckpt_path"
            )

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        optimizer_init = self._get(self.config_init, "optimizer")
        if not self.auto_configure_optimizers or not optimizer_init:
            return
        lr_scheduler_init = self._get(self.config_init, "lr_scheduler")

        def configure_optimizers(lightning_module: pl.LightningModule) -> dict[str, Any]:
            return configure_optimizers_from_config(lightning_module, optimizer_init, lr_scheduler_init)

        self.model.configure_optimizers = MethodType(configure_optimizers, self.model)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer.strategy)
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning, undeclared
        has_monitor = any(isinstance(cb, LearningRateMonitor) for cb in callbacks)
        if trainer.loggers and not has_monitor:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        return trainer


def _load_tool(target: str) -> Callable[[list[str]], int]:
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def _saved_model_hparams(ckpt_path: str) -> dict[str, Any]:
    """The LightningModule hyper-parameters saved in a checkpoint file or a sharded checkpoint folder ({} if none)."""
    path = Path(ckpt_path)
    if path.is_dir():
        path = path / "meta.pt"  # Lightning's sharded checkpoints keep everything but the tensors here
    if not path.is_file():
        return {}
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError):  # not loadable safely: Lightning itself will say what is wrong
        return {}
    hparams = checkpoint.get("hyper_parameters") or {}
    return {key: value for key, value in hparams.items() if not key.startswith("_")}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lightning-power`` console script."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] in TOOLS:
        return _load_tool(TOOLS[words[0]])(words[1:])
    if words and words[0] in ("-h", "--help"):
        print(f"tools (each has --help): {', '.join(TOOLS)}\n")
    LightningPowerCLI(args=argv)  # None: LightningCLI reads sys.argv itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
