"""``MuP``: the Lightning callback that puts any LightningModule in muP, from a few lines of YAML."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, LearningRateFinder, StochasticWeightAveraging
from torch import nn
from typing_extensions import override

from lightning_power.files import write_atomically
from lightning_power.mup.plan import (
    ModelInit,
    MuPPlan,
    OptimizerFamily,
    _shared_names,
    _unique_named_parameters,
    resolve_optimizer_family,
)

TABLE_FILENAME = "mup_params.csv"


class MuP(Callback):
    r"""Maximal Update Parametrization (Tensor Programs V, arXiv:2203.03466) for any LightningModule.

    In ``setup``, before any strategy wraps the model, it computes a :class:`~lightning_power.mup.MuPPlan` from the
    module and a narrow base (plus an optional delta) of the same class, rescales the init, and attaches the readout
    multiplier ``1 / width_mult`` to the output layer (no ``MuReadout`` swap). Whatever ``configure_optimizers``
    returns, from the module or from LightningCLI YAML, has its param groups split per the plan (muP LR and weight
    decay) and its LR schedulers rebased. The plan is saved in checkpoints and checked on resume. With a logger, the
    counts per class are logged once as ``mup/*`` and the per-parameter table is written to
    ``<log_dir>/mup_params.csv``.

    The attention scale is the module's own business: use ``1 / d_head``
    (:func:`~lightning_power.mup.attention_scale`; the demo GPT's ``attention_scale="1/d_head"``).

    Args:
        base_overrides: hyper-parameters that turn the module into the base model, e.g. ``{"width": 32}``. The base
            is the module's class built with its saved ``hparams`` updated by these, on the meta device (no memory).
            Needs ``self.save_hyperparameters()`` in the module's ``__init__``.
        delta_overrides: the same for the delta model, another width (e.g. ``{"width": 64}``); optional but
            recommended: dimensions that differ between base and delta are the widths.
        base_model: the base model itself (build it under ``torch.device("meta")``), instead of ``base_overrides``.
        delta_model: the delta model itself, instead of ``delta_overrides``.
        base_shapes: a ``mup`` base-shapes file (``.bsh``), instead of a base model.
        readout: module name(s) of the output layer(s), e.g. ``"head"``. ``None`` takes every ``nn.Linear`` that
            maps a width to a fixed size.
        model_init: how the module initialises itself, which decides how the init is rescaled:
            ``"fixed_std"`` (width-independent stds such as ``normal_(std=0.02)``; hidden weights get
            ``1/sqrt(m)``), ``"torch_default"`` (PyTorch's ``1/sqrt(fan_in)``; readout weights and biases get
            ``sqrt(m)``; refused for a readout tied to the embedding), or ``None`` to leave the weights alone (the
            module applies muP init itself, or starts from trained weights). Never applied twice to one module; a
            resumed run's weights come from the checkpoint.
        optimizer_family: ``"adam"`` or ``"sgd"`` muP LR rules; ``None`` detects them from each optimizer's class.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_power.demo import GPT
        >>> from lightning_power.mup import MuP
        >>> model = GPT(width=128, depth=2, n_heads=4, context_length=16, attention_scale="1/d_head")
        >>> mup = MuP(base_overrides={"width": 32}, delta_overrides={"width": 64}, readout="head")
        >>> trainer = pl.Trainer(callbacks=[mup], max_steps=1, logger=False)  # then trainer.fit(model, data)

    YAML (``lightning-power fit``)::

        trainer:
          callbacks:
            - class_path: lightning_power.mup.MuP
              init_args: {base_overrides: {width: 32}, delta_overrides: {width: 64}, readout: head}
    """

    def __init__(
        self,
        base_overrides: dict[str, Any] | None = None,
        delta_overrides: dict[str, Any] | None = None,
        base_model: nn.Module | None = None,
        delta_model: nn.Module | None = None,
        base_shapes: str | os.PathLike | None = None,
        readout: str | list[str] | None = None,
        model_init: ModelInit | None = "fixed_std",
        optimizer_family: OptimizerFamily | None = None,
    ) -> None:
        given = [
            name
            for name, value in [
                ("base_overrides", base_overrides),
                ("base_model", base_model),
                ("base_shapes", base_shapes),
            ]
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(f"give exactly one of base_overrides, base_model, base_shapes; got {given or 'none'}")
        if delta_overrides is not None and delta_model is not None:
            raise ValueError("give delta_overrides or delta_model, not both")
        if base_shapes is not None:
            if delta_overrides is not None or delta_model is not None:
                raise ValueError("base_shapes already says which dimensions are widths; drop delta_overrides/model")
            if not Path(base_shapes).is_file():
                raise ValueError(
                    f"base_shapes={os.fspath(base_shapes)!r} is not a file; make one with "
                    "mup.make_base_shapes(base, delta, 'base.bsh')"
                )
        for name, overrides in (("base_overrides", base_overrides), ("delta_overrides", delta_overrides)):
            if overrides is not None and (
                not isinstance(overrides, Mapping)
                or not overrides
                or not all(isinstance(key, str) for key in overrides)
            ):
                raise ValueError(
                    f"{name} must be a non-empty mapping of hyper-parameter names to values, got {overrides!r}"
                )
        readouts = [readout] if isinstance(readout, str) else readout
        if readouts is not None and (not readouts or not all(isinstance(r, str) and r for r in readouts)):
            raise ValueError(f"readout must be a module name, a non-empty list of them, or None; got {readout!r}")
        if model_init is not None and model_init not in get_args(ModelInit):
            raise ValueError(f"model_init must be one of {get_args(ModelInit)} or None, got {model_init!r}")
        if optimizer_family is not None and optimizer_family not in get_args(OptimizerFamily):
            raise ValueError(
                f"optimizer_family must be one of {get_args(OptimizerFamily)} or None, got {optimizer_family!r}"
            )
        self.base_overrides = dict(base_overrides) if base_overrides is not None else None
        self.delta_overrides = dict(delta_overrides) if delta_overrides is not None else None
        self.base_model, self.delta_model = base_model, delta_model
        self.base_shapes = base_shapes
        self.readout = readout
        self.model_init = model_init
        self.optimizer_family = optimizer_family
        self.plan: MuPPlan | None = None
        self._init_std: dict[str, float] = {}
        self._restored_plan: MuPPlan | None = None  # from the checkpoint, when resuming

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning, undeclared
        if sum(isinstance(cb, MuP) for cb in callbacks) > 1:
            raise ValueError("more than one MuP callback is configured; keep one")
        if not any(True for _ in pl_module.parameters()):
            raise ValueError(f"{type(pl_module).__name__} has no parameters in setup; MuP needs them built in __init__")
        self._restored_plan = None
        self.plan = self._compute_plan(pl_module)
        if stage == "fit":
            finder = any(isinstance(cb, LearningRateFinder) for cb in callbacks)
            if finder and self.plan.max_width_mult != 1.0:
                raise ValueError(
                    "Lightning's LR finder (Tuner.lr_find, LearningRateFinder) sets every param group to one LR, so "
                    f"it would search without muP's per-group ratios at width multiplier {self.plan.max_width_mult:g}. "
                    "Find the LR at the base width, where every ratio is 1, and transfer it: that is what muP is for"
                )
            swa = [cb for cb in callbacks if isinstance(cb, StochasticWeightAveraging)]
            swa_lrs = getattr(swa[0], "_swa_lrs", None) if swa else None  # Lightning keeps the argument private
            if isinstance(swa_lrs, float) and self.plan.max_width_mult != 1.0:
                raise ValueError(
                    f"StochasticWeightAveraging(swa_lrs={swa_lrs!r}) sets every param group to that one LR, so the "
                    "SWA phase would train without muP's per-group LR ratios at width multiplier "
                    f"{self.plan.max_width_mult:g}. Pass swa_lrs as a list, one LR per param group in muP's order: "
                    "the SWA LR times each group's mup_lr_factor. For an optimizer over all the module's parameters "
                    "in one group that is [g['lr'] for g in plan.param_groups(model, lr=swa_lr)] with plan = "
                    "MuPPlan.from_models(model, base, delta, readout) (docs/mup.md, Limits)"
                )
            if self.model_init is not None:
                if any(p.is_meta for p in pl_module.parameters()):
                    raise ValueError(
                        "the module's parameters are on the meta device in setup (deferred init), so there is no init "
                        "to rescale yet; initialise the weights in __init__, or pass model_init=None and apply muP "
                        "init yourself (MuPPlan.apply_init after materialising)"
                    )
                self.plan.apply_init(pl_module, self.model_init)
            self._init_std = _param_stds(pl_module)
            _install_regrouping(pl_module, self.plan, self.optimizer_family)
        self.plan.attach_readouts(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.loggers:
            return
        # a collective: every rank asks. A logger without a local folder (log_dir None) writes to the root dir
        log_dir = trainer.log_dir or trainer.default_root_dir
        assert self.plan is not None
        if trainer.is_global_zero:
            applied = getattr(pl_module.__dict__.get("configure_optimizers"), "applied", {})
            write_atomically(os.path.join(log_dir, TABLE_FILENAME), self._table_csv(applied, _shared_names(pl_module)))
        metrics = {f"mup/num_{role}": float(count) for role, count in self.plan.role_counts().items()}
        metrics["mup/width_mult"] = self.plan.max_width_mult
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # One key lookup per param group: a group added after configure_optimizers (BaseFinetuning's
        # unfreeze_and_add_param_group, a user's add_param_group) was never split by muP.
        for optimizer in trainer.optimizers:
            if not all("mup_lr_factor" in group for group in optimizer.param_groups):
                _vet_groups_added_later(optimizer, pl_module, self.plan, self.optimizer_family)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}):
            raise RuntimeError(
                f"the checkpoint {trainer.ckpt_path} holds no muP state: it was not trained with the MuP callback, so "
                "its weights and optimizer groups are not muP's. Start a new run, or drop the MuP callback"
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        wrapper = pl_module.__dict__.get("configure_optimizers")
        if isinstance(wrapper, _RegroupingConfigureOptimizers):
            if wrapper.inner is None:
                del pl_module.configure_optimizers
            else:
                setattr(pl_module, "configure_optimizers", wrapper.inner)  # an instance attribute shadows the method

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict()} if self.plan is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restored = MuPPlan.from_dict(state_dict["plan"])
        if self.plan is not None and restored != self.plan:
            diffs = restored.differences(self.plan)
            shown = "; ".join(diffs[:5]) + (f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else "")
            raise ValueError(
                f"the checkpoint's muP plan differs from this run's (checkpoint vs now): {shown}. Resume with the "
                "same model widths and the same base/delta"
            )
        self._restored_plan = restored

    def _compute_plan(self, pl_module: pl.LightningModule) -> MuPPlan:
        if self.base_shapes is not None:
            return MuPPlan.from_base_shapes(pl_module, self.base_shapes, self.readout)
        base = self.base_model or _build_variant(pl_module, self.base_overrides, "base_overrides")
        delta = self.delta_model
        if self.delta_overrides is not None:
            delta = _build_variant(pl_module, self.delta_overrides, "delta_overrides")
        return MuPPlan.from_models(pl_module, base, delta, self.readout)

    def _table_csv(
        self, applied: Mapping[str, tuple[OptimizerFamily, float, float]], aliases: Mapping[str, str]
    ) -> str:
        assert self.plan is not None
        rows = self.plan.table(applied, self.model_init, aliases)
        for row in rows:
            row["init_std"] = self._init_std.get(row["name"], math.nan)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()


class _RegroupingConfigureOptimizers:
    """Stands in for ``pl_module.configure_optimizers``: calls the original, then splits every returned optimizer's
    param groups by the muP plan and rebases the LR schedulers returned with it."""

    def __init__(self, module: pl.LightningModule, inner: Any, plan: MuPPlan, family: OptimizerFamily | None) -> None:
        self.module, self.inner, self.plan, self.family = module, inner, plan, family
        # parameter name -> the muP rules and the LR and WD factors of its param group
        self.applied: dict[str, tuple[OptimizerFamily, float, float]] = {}

    def __call__(self) -> Any:
        result = self.inner() if self.inner is not None else type(self.module).configure_optimizers(self.module)
        optimizers, schedulers = _optimizers_and_schedulers(result)
        names = {id(p): name for name, p in _unique_named_parameters(self.module)}
        for optimizer in optimizers:
            self.plan.regroup(optimizer, self.module, self.family, schedulers)
            for group in optimizer.param_groups:
                factors = (group["mup_family"], group["mup_lr_factor"], group["mup_wd_factor"])
                for param in group["params"]:
                    self.applied[names[id(param)]] = factors
        return result


def _install_regrouping(pl_module: pl.LightningModule, plan: MuPPlan, family: OptimizerFamily | None) -> None:
    """Wrap the module's current ``configure_optimizers`` (its own, or LightningCLI's) once; update it afterwards."""
    current = pl_module.__dict__.get("configure_optimizers")
    if isinstance(current, _RegroupingConfigureOptimizers):
        current.plan, current.family = plan, family
        return
    # An instance attribute shadows the method (setattr: mypy refuses an assignment to a method)
    setattr(pl_module, "configure_optimizers", _RegroupingConfigureOptimizers(pl_module, current, plan, family))


def _vet_groups_added_later(
    optimizer: torch.optim.Optimizer, module: nn.Module, plan: MuPPlan | None, family: OptimizerFamily | None
) -> None:
    """Refuse param groups added after muP's regrouping that hold parameters muP scales; mark the others as factor 1.

    Such a group has the LR and weight decay it was added with, for every parameter in it, so a hidden weight in it
    would train at the base LR instead of ``lr / m``.
    """
    assert plan is not None
    # The rules the regrouped groups follow: those groups recorded them (the new group has none to record)
    recorded = {group["mup_family"] for group in optimizer.param_groups if "mup_family" in group}
    rules = resolve_optimizer_family(optimizer, family, recorded)
    names = {id(p): name for name, p in _unique_named_parameters(module)}

    def unscaled(param: torch.Tensor) -> bool:
        name = names.get(id(param))
        return name is not None and name in plan and plan[name].lr_wd_factors(rules) == (1.0, 1.0)

    for group in optimizer.param_groups:
        if "mup_lr_factor" in group:
            continue
        scaled = [
            names.get(id(p), f"a tensor of shape {tuple(p.shape)} outside the module")
            for p in group["params"]
            if not unscaled(p)
        ]
        if scaled:
            raise ValueError(
                f"a param group added to {type(optimizer).__qualname__} after configure_optimizers holds "
                f"{', '.join(scaled[:5])}{f' (and {len(scaled) - 5} more)' if len(scaled) > 5 else ''}, whose muP LR "
                "and weight-decay factors are not 1 (or unknown to the plan); muP splits only the groups that "
                "configure_optimizers returns (MuPPlan.regroup and MuPPlan.param_groups, before the first step), so "
                "this group would train them at the base LR. Put every parameter in configure_optimizers from the "
                "start, frozen ones too (requires_grad=False: the optimizer skips them while they have no gradient), "
                "and unfreeze them with requires_grad_(True) (BaseFinetuning.make_trainable) instead of adding a "
                "group (BaseFinetuning.unfreeze_and_add_param_group)"
            )
        group.update(mup_lr_factor=1.0, mup_wd_factor=1.0, mup_family=rules)


def _optimizers_and_schedulers(result: Any) -> tuple[list[torch.optim.Optimizer], list[Any]]:
    """Every optimizer and scheduler in any of ``configure_optimizers``' return forms (nested lists, tuples, dicts)."""
    optimizers: list[torch.optim.Optimizer] = []
    schedulers: list[Any] = []
    stack = [result]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.optim.Optimizer):
            if not any(item is o for o in optimizers):
                optimizers.append(item)
        elif isinstance(getattr(item, "optimizer", None), torch.optim.Optimizer) and hasattr(item, "state_dict"):
            if not any(item is s for s in schedulers):
                schedulers.append(item)
        elif isinstance(item, Mapping):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    return optimizers, schedulers


def _build_variant(pl_module: pl.LightningModule, overrides: Mapping[str, Any] | None, argument: str) -> nn.Module:
    """The module's class on the meta device, with its saved hyper-parameters updated by ``overrides``."""
    assert overrides is not None
    cls = type(pl_module)
    hparams = {key: value for key, value in pl_module.hparams.items() if not key.startswith("_")}
    if not hparams:
        raise ValueError(
            f"{argument} needs {cls.__name__}'s init arguments: call self.save_hyperparameters() in "
            "its __init__, or pass base_model / delta_model"
        )
    unknown = sorted(set(overrides) - set(hparams))
    if unknown:
        raise ValueError(
            f"{argument} keys {unknown} are not hyper-parameters of {cls.__name__} (it has {sorted(hparams)})"
        )
    try:
        with torch.device("meta"):
            return cls(**{**hparams, **overrides})
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{argument}: {cls.__name__}(**hparams, **{dict(overrides)}) failed ({error}); the saved "
            "hparams must be the init arguments that rebuild the module"
        ) from error


def _param_stds(model: nn.Module) -> dict[str, float]:
    """Standard deviation of each (unsharded) parameter, for the audit table."""
    with torch.no_grad():
        return {
            name: float(p.float().std()) if p.numel() > 1 and not p.is_meta else math.nan
            for name, p in _unique_named_parameters(model)
        }
