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
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.cli import (
    LightningCLI,
    LRSchedulerTypeTuple,
    LRSchedulerTypeUnion,
    ReduceLROnPlateau,
    instantiate_class,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer

from lightning_power.strategies import use_atomic_checkpoint_io

# Commands that are not Trainer entry points: name -> "module:function" taking argv and returning an exit code.
TOOLS: dict[str, str] = {
    "coord-check": "lightning_power.mup.coord_check:main",
    "sparsity-overlap": "lightning_power.sparsity.overlap:main",
    "recommend": "lightning_power.recommend:main",
    "calibrate": "lightning_power.calibrate:main",
}


class LightningPowerCLI(LightningCLI):
    """LightningCLI whose YAML optimizer is built lazily and whose YAML scheduler steps per optimizer step.

    Everything else about the YAML optimizer follows LightningCLI: the 'AUTOMATIC' argument groups, the warning when
    it replaces the model's own ``configure_optimizers``, and the overridable static ``configure_optimizers``.

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
        """LightningCLI's own rules (the one 'AUTOMATIC' optimizer and scheduler, the override warning, the
        ``configure_optimizers`` hook), except that the optimizer and scheduler are built inside the model's
        ``configure_optimizers``, over the parameters the strategy left."""
        if not self.auto_configure_optimizers:
            return
        parser = self._parser(subcommand)
        optimizers = _automatic_keys(Optimizer, parser._optimizers)
        lr_schedulers = _automatic_keys(LRSchedulerTypeTuple, parser._lr_schedulers)
        if not optimizers:
            return
        if len(optimizers) > 1 or len(lr_schedulers) > 1:
            raise MisconfigurationException(
                f"`{self.__class__.__name__}.add_configure_optimizers_method_to_model` expects at most one optimizer "
                f"and one lr_scheduler to be 'AUTOMATIC', but found {optimizers + lr_schedulers}. In this case the "
                "user is expected to link the argument groups and implement `configure_optimizers`, see "
                "https://lightning.ai/docs/pytorch/stable/common/lightning_cli.html"
                "#optimizers-and-learning-rate-schedulers"
            )
        optimizer_class = parser._optimizers[optimizers[0]][0]
        optimizer_init = _with_class_path(optimizer_class, self._get(self.config_init, optimizers[0]))
        lr_scheduler_init = None
        if lr_schedulers:
            lr_scheduler_class = parser._lr_schedulers[lr_schedulers[0]][0]
            lr_scheduler_init = _with_class_path(lr_scheduler_class, self._get(self.config_init, lr_schedulers[0]))
        if not optimizer_init:  # registered automatically, but the config names no optimizer
            if lr_scheduler_init:  # LightningCLI would drop it without a word, leaving the model's own schedule
                raise ValueError(
                    f"{lr_schedulers[0]}: is set but {optimizers[0]}: is not; the scheduler is built on the config's "
                    f"optimizer, so add an {optimizers[0]}: section (e.g. class_path: torch.optim.AdamW with its lr)"
                )
            return
        if is_overridden("configure_optimizers", self.model):
            rank_zero_warn(
                f"`{self.model.__class__.__name__}.configure_optimizers` will be overridden by "
                f"`{self.__class__.__name__}.configure_optimizers`."
            )
        hook = self.configure_optimizers

        def configure_optimizers(lightning_module: pl.LightningModule) -> Any:
            optimizer = instantiate_class(lightning_module.parameters(), optimizer_init)
            lr_scheduler = instantiate_class(optimizer, lr_scheduler_init) if lr_scheduler_init else None
            return hook(lightning_module, optimizer, lr_scheduler)

        self.model.configure_optimizers = MethodType(configure_optimizers, self.model)

    @staticmethod
    def configure_optimizers(
        lightning_module: pl.LightningModule, optimizer: Optimizer, lr_scheduler: LRSchedulerTypeUnion | None = None
    ) -> Any:
        """The model's ``configure_optimizers`` return: the scheduler steps per optimizer step; a plateau one, which
        needs its metric, at each training epoch's end as in LightningCLI. Override it to return something else."""
        if lr_scheduler is None:
            return {"optimizer": optimizer}
        if isinstance(lr_scheduler, ReduceLROnPlateau):
            plateau = {"scheduler": lr_scheduler, "monitor": lr_scheduler.monitor}
            return {"optimizer": optimizer, "lr_scheduler": plateau}
        if isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError(
                "lr_scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau has no `monitor` argument to name the metric "
                "it steps on; use lightning.pytorch.cli.ReduceLROnPlateau with init_args.monitor (e.g. val/loss)"
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer.strategy)
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning, undeclared
        has_monitor = any(isinstance(cb, LearningRateMonitor) for cb in callbacks)
        if trainer.loggers and not has_monitor:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        return trainer


def _automatic_keys(
    class_type: type | tuple[type, ...], register: dict[str, tuple[type | tuple[type, ...], str]]
) -> list[str]:
    """The argument groups registered for ``class_type`` that the CLI itself wires to the model ('AUTOMATIC')."""
    automatic = []
    for key, (registered, link_to) in register.items():
        classes = registered if isinstance(registered, tuple) else (registered,)
        if link_to == "AUTOMATIC" and any(issubclass(c, class_type) for c in classes):
            automatic.append(key)
    return automatic


def _with_class_path(registered: type | tuple[type, ...], init: Any) -> Any:
    """A single-class registration (``add_optimizer_args(torch.optim.SGD)``) parses to the bare init arguments:
    give them their class path, as LightningCLI does. A registration of several classes parses to a class path."""
    if isinstance(registered, tuple):
        return init
    init_args = init.as_dict() if isinstance(init, Namespace) else init
    return {"class_path": f"{registered.__module__}.{registered.__name__}", "init_args": init_args or {}}


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
