"""The muP plan: per parameter name, which dimensions are widths, the parameter's class, and its multipliers.

The plan is plain data keyed by the parameter's *logical* name (wrapper prefixes removed), computed once from shapes
before any strategy wraps the model. It never lives on the tensors, so deepcopy, FSDP flat parameters, DTensors,
meta-device init and state-dict round trips cannot lose it (``mup``'s ``p.infshape`` is lost by all of them).

Width dimensions are inferred with the ``mup`` package's rule: a dimension is a width where the base and delta models
differ (or, without a delta, where the base and the model differ). The multipliers are those of Tensor Programs V
(Yang et al. 2022, arXiv:2203.03466), Table 8, the form the ``mup`` package implements:

===================  =======================  ==================  =====================
class                input weights & biases   output (readout)    hidden (width x width)
===================  =======================  ==================  =====================
init variance        unchanged                unchanged           / m_in
forward multiplier   1                        1 / m_in            1
Adam LR              x 1                      x 1                 / m_in
SGD LR               x m                      x m_in              x m_out / m_in
===================  =======================  ==================  =====================

Example::

    >>> import torch
    >>> from lightning_power.demo import GPT
    >>> from lightning_power.mup import MuPPlan
    >>> model = GPT(width=128, depth=1, head_dim=32, context_length=16)
    >>> with torch.device("meta"):
    ...     base, delta = GPT(width=32, depth=1, head_dim=32, context_length=16), GPT(width=64, depth=1, head_dim=32,
    ...                                                                                 context_length=16)
    >>> plan = MuPPlan.from_models(model, base, delta, readout="head")
    >>> plan["blocks.0.mlp.fc.weight"].role, plan["blocks.0.mlp.fc.weight"].width_mult
    ('hidden', 4.0)
    >>> optimizer = torch.optim.AdamW(plan.param_groups(model, lr=1e-2, weight_decay=0.1))
    >>> sorted({group["lr"] for group in optimizer.param_groups})
    [0.0025, 0.01]
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import torch
import yaml
from torch import nn

from lightning_power.distributed import local_tensor, logical_param_name, named_logical_parameters
from lightning_power.mup.readout import attach_readout_multiplier

Role = Literal["vector_like", "hidden", "readout"]
OptimizerFamily = Literal["adam", "sgd"]
ModelInit = Literal["fixed_std", "torch_default"]

PLAN_FORMAT_VERSION = 1
_INIT_DONE_ATTR = "_lightning_power_mup_init_done"
_MAX_LISTED = 5  # mismatches shown in an error message

# Entrywise-normalised updates (Adam-like) vs updates proportional to the gradient (SGD-like); mup.optim docstring.
# Not Adafactor: it also scales each step by RMS(param), so lr / m would shrink hidden updates like m^-3/2.
_ADAM_LIKE = tuple(
    getattr(torch.optim, name)
    for name in (
        "Adam",
        "AdamW",
        "Adamax",
        "NAdam",
        "RAdam",
        "Adagrad",
        "Adadelta",
        "RMSprop",
        "Rprop",
        "SparseAdam",
    )
    if hasattr(torch.optim, name)
)
_SGD_LIKE = (torch.optim.SGD, torch.optim.ASGD)

# LR scheduler attributes that hold one entry per param group; the first set holds learning rates.
_SCHEDULER_LR_LISTS = ("base_lrs", "_last_lr", "min_lrs", "max_lrs")
_SCHEDULER_GROUP_LISTS = ("lr_lambdas", "base_momentums", "max_momentums")
# Param-group keys that hold learning rates (torch schedulers write initial_lr; OneCycleLR max_lr / min_lr).
_GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter's shape, its base shape (``None`` marks a finite, non-width dimension) and its class."""

    shape: tuple[int, ...]
    base_shape: tuple[int | None, ...]
    role: Role

    def dim_mult(self, dim: int) -> float:
        """Width multiplier of dimension ``dim``: ``shape / base_shape`` for a width, 1 for a finite dimension."""
        base = self.base_shape[dim]
        return 1.0 if base is None else self.shape[dim] / base

    @property
    def n_inf(self) -> int:
        """Number of width dimensions."""
        return sum(base is not None for base in self.base_shape)

    @property
    def fan_out_mult(self) -> float:
        """Multiplier of dimension 0 (fan-out of an ``(out, in)`` weight; a bias's only dimension)."""
        return self.dim_mult(0) if self.shape else 1.0

    @property
    def fan_in_mult(self) -> float:
        """Multiplier of dimension 1 (fan-in of an ``(out, in)`` weight); 1 for vectors, whose fan-in is 1."""
        return self.dim_mult(1) if len(self.shape) >= 2 else 1.0

    @property
    def width_mult(self) -> float:
        """``mup``'s ``InfShape.width_mult``: the multiplier of the last width dimension (fan-in of a hidden weight)."""
        widths = [i for i, base in enumerate(self.base_shape) if base is not None]
        return self.dim_mult(widths[-1]) if widths else 1.0

    def lr_wd_factors(self, family: OptimizerFamily) -> tuple[float, float]:
        """LR and weight-decay factors, Tensor Programs V Table 8, exactly as ``mup.MuAdam`` / ``mup.MuSGD``.

        Adam: hidden weights get ``lr / m`` and ``wd * m`` (so ``lr * wd`` is width-independent); others are unchanged.
        SGD: one-width tensors get ``lr * m`` and ``wd / m``; hidden weights ``lr / r`` and ``wd * r`` with
        ``r = m_in / m_out``; tensors without a width are unchanged.
        """
        if family == "adam":
            if self.n_inf == 2:
                return 1.0 / self.width_mult, self.width_mult
            return 1.0, 1.0
        if self.n_inf == 1:
            return self.width_mult, 1.0 / self.width_mult
        if self.n_inf == 2:
            ratio = self.fan_in_mult / self.fan_out_mult
            return 1.0 / ratio, ratio
        return 1.0, 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "base_shape": list(self.base_shape), "role": self.role}


class MuPPlan:
    """Name-keyed muP plan: a :class:`ParamSpec` per parameter, and each readout module with its weight's name.

    Build it with :meth:`from_models` or :meth:`from_base_shapes` on the bare model, before any wrapping. It then
    gives optimizer groups (:meth:`param_groups`, :meth:`regroup`), rescales the init (:meth:`apply_init`) and
    attaches the readout multiplier (:meth:`attach_readouts`), each by logical parameter name.
    """

    def __init__(self, params: Mapping[str, ParamSpec], readouts: Mapping[str, str]) -> None:
        for name, spec in params.items():
            if len(spec.shape) != len(spec.base_shape):
                raise ValueError(
                    f"params[{name!r}]: shape {spec.shape} and base_shape {spec.base_shape} differ in rank"
                )
            if spec.role not in get_args(Role):
                raise ValueError(f"params[{name!r}].role must be one of {get_args(Role)}, got {spec.role!r}")
        for module, weight in readouts.items():
            if weight not in params or params[weight].role != "readout":
                raise ValueError(f"readouts[{module!r}] = {weight!r} is not a parameter of class 'readout'")
        self.params: dict[str, ParamSpec] = dict(params)
        self.readouts: dict[str, str] = dict(readouts)  # readout module name -> its weight's parameter name

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_models(
        cls,
        model: nn.Module,
        base_model: nn.Module,
        delta_model: nn.Module | None = None,
        readout: str | Sequence[str] | None = None,
    ) -> MuPPlan:
        """Infer width dimensions from ``base_model`` (and ``delta_model``), the same class at other widths.

        A dimension is a width where ``base_model`` and ``delta_model`` differ, or without a delta, where
        ``base_model`` and ``model`` differ (``mup.set_base_shapes``). Build base and delta under
        ``torch.device("meta")``: only their shapes are read.

        Args:
            model: the model to train, before any strategy wraps it.
            base_model: the narrow proxy whose hyper-parameters are tuned; no dimension may exceed the model's.
            delta_model: the proxy at another width; recommended, it keeps widths recognised when ``model`` has
                the base width itself.
            readout: module name(s) of the output layer(s) (width -> fixed size), e.g. ``"head"``. ``None`` takes
                every ``nn.Linear`` with a width fan-in and a fixed fan-out.
        """
        shapes = _shapes(model)
        base = _align(shapes, _shapes(base_model), "base_model")
        if delta_model is None:
            base_shape = {name: _widths_by_difference(base[name], shape) for name, shape in shapes.items()}
        else:
            delta = _align(shapes, _shapes(delta_model), "delta_model")
            base_shape = {name: _widths_by_difference(base[name], delta[name]) for name in shapes}
            _warn_unvaried_dims(shapes, base, base_shape)
        return cls._build(model, shapes, base_shape, readout, source="base_model")

    @classmethod
    def from_base_shapes(
        cls, model: nn.Module, path: str | os.PathLike, readout: str | Sequence[str] | None = None
    ) -> MuPPlan:
        """Read widths from a ``mup`` base-shapes file (``mup.make_base_shapes(base, delta, "x.bsh")``).

        The file maps each parameter name to its base dimensions, ``null`` marking a finite one.
        """
        with open(path) as file:
            loaded = yaml.safe_load(file)
        if not isinstance(loaded, dict) or not all(isinstance(dims, list) for dims in loaded.values()):
            raise ValueError(f"base_shapes file {os.fspath(path)!r} is not a mup .bsh file (name -> list of dims)")
        shapes = _shapes(model)
        bsh = _align(shapes, {logical_param_name(name): tuple(dims) for name, dims in loaded.items()}, "base_shapes")
        return cls._build(model, shapes, bsh, readout, source="base_shapes")

    @classmethod
    def _build(
        cls,
        model: nn.Module,
        shapes: dict[str, tuple[int, ...]],
        base_shape: dict[str, tuple[int | None, ...]],
        readout: str | Sequence[str] | None,
        source: str,
    ) -> MuPPlan:
        too_wide = [
            f"{name} dim {i}: base {b} > model {d}"
            for name, shape in shapes.items()
            for i, (b, d) in enumerate(zip(base_shape[name], shape))
            if b is not None and b > d
        ]
        if too_wide:
            raise ValueError(
                f"{source} is wider than the model ({_first(too_wide)}); the base must be the narrow proxy"
            )
        many = [f"{name} {shapes[name]}" for name, dims in base_shape.items() if sum(b is not None for b in dims) > 2]
        if many:
            raise ValueError(f"parameters with more than 2 width dimensions are not supported by muP: {_first(many)}")
        has_widths = any(b is not None for dims in base_shape.values() for b in dims)
        if not has_widths:
            warnings.warn(
                f"{source} has the same shapes as the model, so no dimension is a width and muP reduces to the "
                "standard parametrization; give a narrower base (and a delta_model at another width)",
                UserWarning,
                stacklevel=3,
            )
        readouts = _find_readouts(model, shapes, base_shape, readout, required=has_widths)
        readout_weights = set(readouts.values())
        params = {}
        for name, shape in shapes.items():
            dims = base_shape[name]
            n_inf = sum(b is not None for b in dims)
            role: Role = "readout" if name in readout_weights else "hidden" if n_inf == 2 else "vector_like"
            params[name] = ParamSpec(shape, dims, role)
        return cls(params, readouts)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, strings and numbers only, so the plan loads from a checkpoint with ``weights_only=True``."""
        return {
            "version": PLAN_FORMAT_VERSION,
            "readouts": dict(self.readouts),
            "params": {name: spec.to_dict() for name, spec in self.params.items()},
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> MuPPlan:
        """Inverse of :meth:`to_dict`."""
        if state.get("version") != PLAN_FORMAT_VERSION:
            raise ValueError(f"muP plan version must be {PLAN_FORMAT_VERSION}, got {state.get('version')!r}")
        params = {
            name: ParamSpec(tuple(spec["shape"]), tuple(spec["base_shape"]), spec["role"])
            for name, spec in state["params"].items()
        }
        return cls(params, state["readouts"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MuPPlan) and self.params == other.params and self.readouts == other.readouts

    def __getitem__(self, name: str) -> ParamSpec:
        return self.params[name]

    def __contains__(self, name: object) -> bool:
        return name in self.params

    def __repr__(self) -> str:
        counts = ", ".join(f"{role}={count}" for role, count in self.role_counts().items())
        return f"MuPPlan({counts}, readouts={list(self.readouts)})"

    def differences(self, other: MuPPlan) -> list[str]:
        """Human-readable differences to ``other`` (this plan first), for error messages."""
        diffs = [f"readouts {self.readouts} vs {other.readouts}"] if self.readouts != other.readouts else []
        for name in sorted(self.params.keys() | other.params.keys()):
            mine, theirs = self.params.get(name), other.params.get(name)
            if mine != theirs:
                describe = lambda s: "absent" if s is None else f"{list(s.shape)} base {list(s.base_shape)} {s.role}"
                diffs.append(f"{name}: {describe(mine)} vs {describe(theirs)}")
        return diffs

    def role_counts(self) -> dict[str, int]:
        """Number of parameter tensors per class."""
        return {role: sum(spec.role == role for spec in self.params.values()) for role in get_args(Role)}

    @property
    def max_width_mult(self) -> float:
        """The largest width multiplier of any parameter (model width / base width)."""
        return max((spec.dim_mult(i) for spec in self.params.values() for i in range(len(spec.shape))), default=1.0)

    # ----------------------------------------------------------------------------------------------- lookups
    def spec_for(self, name: str) -> ParamSpec:
        """The spec of a (possibly wrapper-prefixed) parameter name; a clear error when it is not in the plan."""
        logical = logical_param_name(name)
        if logical not in self.params:
            raise ValueError(
                f"parameter {name!r} (logical name {logical!r}) is not in the muP plan; the plan holds the parameters "
                "the model had when it was computed (before wrapping). Parameters created later, or FSDP flat "
                "parameters (use FSDPStrategy(use_orig_params=True)), cannot be scaled"
            )
        return self.params[logical]

    # ----------------------------------------------------------------------------------------------- optimizer
    def param_groups(
        self, model: nn.Module, lr: float, weight_decay: float = 0.0, optimizer: OptimizerFamily = "adam"
    ) -> list[dict[str, Any]]:
        """Optimizer param groups of ``model``'s trainable parameters with muP ``lr`` and ``weight_decay``.

        Works for any torch optimizer of the family: ``torch.optim.AdamW(plan.param_groups(model, lr=1e-2))``.
        Each group also records ``mup_lr_factor``, ``mup_wd_factor`` and ``mup_family``, so a
        :class:`~lightning_power.mup.MuP` callback does not scale it again, and refuses it for an optimizer of the
        other family. Groups are named after their parameters' classes (``hidden``, ``vector_like-readout``).
        """
        _check_family(optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        group = {"params": params, "lr": lr, "weight_decay": weight_decay}
        return _unique_group_names(self._split(group, _names_by_id(model), optimizer, prefix=None))

    def regroup(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        family: OptimizerFamily | None = None,
        schedulers: Iterable[Any] = (),
    ) -> bool:
        """Split ``optimizer``'s param groups by the plan, in place, and rebase its LR ``schedulers``.

        Every new group keeps all hyper-parameters of the group it came from, with ``lr`` (and the LR-valued keys
        ``initial_lr``, ``max_lr``, ``min_lr``) times the muP LR factor and ``weight_decay`` times the WD factor.
        Each scheduler's per-group lists (``base_lrs``, ``_last_lr``, ``lr_lambdas``, ...) are expanded to the new
        groups, and its LR lists scaled the same way, so closed-form schedulers keep muP's ratios. ``family`` is
        detected from the optimizer class when ``None``. Groups that already carry ``mup_lr_factor`` (built by
        :meth:`param_groups`) are kept as they are, provided they were built for ``family``; returns ``False`` when
        that is every group. New groups are named ``[<group name or pgN>/]<classes>`` (``decay/hidden``), unique per
        optimizer, for ``LearningRateMonitor``'s tags.
        """
        recorded = {group.get("mup_family") for group in optimizer.param_groups}
        family = resolve_optimizer_family(optimizer, family, recorded)
        other = sorted({group.get("mup_family", family) for group in optimizer.param_groups} - {family})
        if other:
            raise ValueError(
                f"param groups built by MuPPlan.param_groups(..., optimizer={other[0]!r}) were given to "
                f"{type(optimizer).__qualname__}, which follows the {family!r} muP rules; build them with "
                f"optimizer={family!r}"
            )
        schedulers = list(schedulers)
        for scheduler in schedulers:
            _refuse_absolute_lr_floor(scheduler, optimizer)
        if all("mup_lr_factor" in group for group in optimizer.param_groups):
            return False
        if _has_stepped(optimizer):
            raise RuntimeError("muP must regroup an optimizer before its first step; this one has taken steps")
        names = _names_by_id(model)
        new_groups: list[dict[str, Any]] = []
        origin: list[int] = []
        for index, group in enumerate(optimizer.param_groups):
            prefix = group.get("name", f"pg{index + 1}" if len(optimizer.param_groups) > 1 else None)
            split = [group] if "mup_lr_factor" in group else self._split(group, names, family, prefix)
            new_groups.extend(split)
            origin.extend([index] * len(split))
        optimizer.param_groups.clear()
        for group in _unique_group_names(new_groups):
            optimizer.add_param_group(group)
        factors = [group["mup_lr_factor"] for group in new_groups]
        for scheduler in schedulers:
            _rebase_scheduler(scheduler, optimizer, origin, factors)
        return True

    def _split(
        self, group: Mapping[str, Any], names: Mapping[int, str], family: OptimizerFamily, prefix: Any
    ) -> list[dict]:
        """One group per distinct (LR factor, WD factor), in order of first appearance, params in their order.

        Each is named after the classes of its parameters (``hidden``, ``vector_like-readout``), after ``prefix/``
        when given, which ``LearningRateMonitor`` uses for its tags (``lr-AdamW/hidden``); a group the user named that
        muP leaves whole keeps its name. ``param_names`` (an optimizer built from ``named_parameters()``) are split
        with their parameters.
        """
        buckets: dict[tuple[float, float], list[torch.Tensor]] = {}
        bucket_names: dict[tuple[float, float], list[Any]] = {}
        roles: dict[tuple[float, float], set[Role]] = {}
        param_names = group.get("param_names")
        for position, param in enumerate(group["params"]):
            if id(param) not in names:
                raise ValueError(
                    f"an optimizer parameter of shape {tuple(param.shape)} is not a parameter of the model"
                )
            spec = self.spec_for(names[id(param)])
            factors = spec.lr_wd_factors(family)
            buckets.setdefault(factors, []).append(param)
            if param_names is not None:
                bucket_names.setdefault(factors, []).append(param_names[position])
            roles.setdefault(factors, set()).add(spec.role)
        hyper = {key: value for key, value in group.items() if key != "params"}
        split = []
        for (lr_factor, wd_factor), params in buckets.items():
            new = dict(hyper, params=params, mup_lr_factor=lr_factor, mup_wd_factor=wd_factor, mup_family=family)
            if param_names is not None:
                new["param_names"] = bucket_names[lr_factor, wd_factor]
            for key in _GROUP_LR_KEYS:
                if key in new:
                    new[key] = new[key] * lr_factor
            if "weight_decay" in new:
                new["weight_decay"] = new["weight_decay"] * wd_factor
            label = "-".join(role for role in get_args(Role) if role in roles[lr_factor, wd_factor])
            new["name"] = label if prefix is None else f"{prefix}/{label}"
            split.append(new)
        if len(split) == 1 and "name" in group:
            split[0]["name"] = group["name"]
        return split

    # ----------------------------------------------------------------------------------------------- init & readout
    def init_factor(self, name: str, model_init: ModelInit, aliases: Mapping[str, str] | None = None) -> float:
        """The factor :meth:`apply_init` multiplies parameter ``name`` by (Table 8 init column).

        ``"fixed_std"``: the module draws with width-independent stds (``normal_(std=0.02)``, GPT-2, the demo GPT);
        hidden weights get ``1/sqrt(m_in)``, as ``mup.init.normal_``. ``"torch_default"``: PyTorch's
        ``reset_parameters`` (std ~ ``1/sqrt(fan_in)``) already suits hidden weights, but readout weights and the
        biases of matrix layers get ``sqrt(m_in)``, as ``mup.set_base_shapes(rescale_params=True)`` does for
        ``nn.Linear`` and convolutions. The rule goes by shape, so it also covers other modules whose default bias
        shrinks with fan-in (``nn.Bilinear``), which ``mup`` leaves out; a custom module that draws its bias at a fixed
        std wants ``"fixed_std"`` (:meth:`apply_init` refuses ``"torch_default"`` for a tied readout).

        ``aliases`` maps the other names of a shared parameter to the one the plan keeps (``_shared_names(model)``), so
        that a layer whose weight is another layer's still finds it for its own bias.
        """
        spec = self.spec_for(name)
        if model_init == "fixed_std":
            return spec.width_mult**-0.5 if spec.role == "hidden" else 1.0
        if spec.role == "readout":
            return spec.width_mult**0.5
        owner, _, leaf = name.rpartition(".")
        weight_name = f"{owner}.weight" if owner else "weight"
        weight = self.params.get((aliases or {}).get(weight_name, weight_name))
        if leaf == "bias" and weight is not None and len(weight.shape) >= 2:
            return weight.fan_in_mult**0.5
        return 1.0

    def apply_init(self, model: nn.Module, model_init: ModelInit = "fixed_std") -> bool:
        """Rescale ``model``'s existing init to muP in place, once: a second call (e.g. from ``configure_model``) is a
        no-op and returns ``False``. Scaling draws no random numbers, so later RNG use is unchanged."""
        if model_init not in get_args(ModelInit):
            raise ValueError(f"model_init must be one of {get_args(ModelInit)}, got {model_init!r}")
        if getattr(model, _INIT_DONE_ATTR, False):
            return False
        if model_init == "torch_default":
            self._refuse_tied_readout(model)
        aliases = _shared_names(model)
        with torch.no_grad():
            for name, param in _unique_named_parameters(model):
                factor = self.init_factor(name, model_init, aliases)
                if factor != 1.0:
                    local_tensor(param).mul_(factor)
        setattr(model, _INIT_DONE_ATTR, True)
        return True

    def _refuse_tied_readout(self, model: nn.Module) -> None:
        """Refuse ``torch_default`` for a readout weight tied to another parameter, e.g. the input embedding.

        Table 8 gives input and output weights a width-independent init, so a tied weight keeps its init. Under
        ``torch_default`` it holds whichever layer's init ran last: ``nn.Embedding``'s N(0, 1), which must stay, or
        ``nn.Linear``'s ``1/sqrt(fan_in)``, which needs ``sqrt(m_in)``. ``mup`` always multiplies (its issue #55).
        """
        names: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(logical_param_name(name))
        for shared in names.values():
            spec = self.params.get(shared[0])
            if len(shared) > 1 and spec is not None and spec.role == "readout":
                raise ValueError(
                    f"model_init='torch_default' cannot rescale the readout weight tied as {' and '.join(shared)}: "
                    "its init is whichever layer's ran last, width-independent (nn.Embedding) or 1/sqrt(width) "
                    "(nn.Linear), and muP keeps a tied weight's init width-independent (Tensor Programs V, Table 8). "
                    "Initialise it with a fixed std (e.g. normal_(std=0.02)) and pass model_init='fixed_std', or "
                    "apply the init yourself and pass model_init=None"
                )

    def attach_readouts(self, model: nn.Module) -> None:
        """Divide each readout's input by its width multiplier (``mup.MuReadout`` without swapping the layer).

        The multiplier is a forward pre-hook object holding a float, so it is deep-copied and pickled with the module
        and traced by ``torch.compile``; attaching again updates it instead of stacking a second one.
        """
        modules = {logical_param_name(name): module for name, module in model.named_modules()}
        for readout, weight in self.readouts.items():
            if readout not in modules:
                raise ValueError(f"readout module {readout!r} is not in the model")
            attach_readout_multiplier(modules[readout], self.params[weight].width_mult)

    # ----------------------------------------------------------------------------------------------- audit
    def table(
        self,
        applied: Mapping[str, tuple[OptimizerFamily, float, float]],
        model_init: ModelInit | None,
        aliases: Mapping[str, str] | None = None,
    ) -> list[dict]:
        """One row per parameter: class, shapes, multipliers, LR / WD / init factors (the audit CSV).

        ``applied`` maps a parameter name to the optimizer family and the LR and WD factors of its param group;
        ``aliases`` are the model's ``_shared_names(model)``.
        """
        rows = []
        for name, spec in self.params.items():
            fam, lr_factor, wd_factor = applied.get(name, ("", math.nan, math.nan))
            rows.append(
                {
                    "name": name,
                    "class": spec.role,
                    "shape": "x".join(map(str, spec.shape)),
                    "base_shape": "x".join("-" if b is None else str(b) for b in spec.base_shape),
                    "fan_in_mult": spec.fan_in_mult,
                    "fan_out_mult": spec.fan_out_mult,
                    "forward_multiplier": 1.0 / spec.width_mult if spec.role == "readout" else 1.0,
                    "optimizer_family": fam,
                    "lr_factor": lr_factor,
                    "wd_factor": wd_factor,
                    "init_factor": self.init_factor(name, model_init, aliases) if model_init else 1.0,
                }
            )
        return rows


class UnknownOptimizerFamily(TypeError):
    """An optimizer class whose muP rules :func:`detect_optimizer_family` cannot tell."""


def detect_optimizer_family(optimizer: torch.optim.Optimizer | type[torch.optim.Optimizer]) -> OptimizerFamily:
    """``"adam"`` for entrywise-normalised optimizers (Adam, AdamW, RMSprop, Adagrad, ...), ``"sgd"`` for SGD, ASGD.

    Takes an optimizer or its class.
    """
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    if issubclass(cls, _ADAM_LIKE):
        return "adam"
    if issubclass(cls, _SGD_LIKE):
        return "sgd"
    adafactor = getattr(torch.optim, "Adafactor", None)
    if adafactor is not None and issubclass(cls, adafactor):
        raise TypeError(
            f"{cls.__qualname__} scales each update by RMS(param), so neither muP family's LR rule fits it: 'adam' "
            "would shrink hidden-layer updates like m^-3/2 instead of 1/m. Use an Adam-like or SGD-like optimizer"
        )
    raise UnknownOptimizerFamily(
        f"cannot tell whether {cls.__qualname__} is Adam-like or SGD-like for muP; pass "
        "optimizer_family='adam' (entrywise-normalised updates) or 'sgd' (updates proportional to the gradient)"
    )


def _unique_group_names(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rename, in place, every param group whose name an earlier group has (``hidden`` again: ``hidden_2``), because
    ``LearningRateMonitor`` refuses an optimizer with two groups of one name. Returns ``groups``."""
    taken = [group["name"] for group in groups if "name" in group]
    seen: set[Any] = set()
    for group in groups:
        name = group.get("name")
        if name is None:
            continue
        if name in seen:
            name = next(f"{name}_{n}" for n in itertools.count(2) if f"{name}_{n}" not in taken)
            group["name"] = name
            taken.append(name)
        seen.add(name)
    return groups


def resolve_optimizer_family(
    optimizer: torch.optim.Optimizer, family: str | None, recorded: set[Any]
) -> OptimizerFamily:
    """The muP rules ``optimizer`` follows: ``family`` when given, else its class's (:func:`detect_optimizer_family`),
    else, for a class muP does not know, the one family its groups ``recorded`` (``mup_family``; ``None`` for a group
    without one)."""
    if family is not None:
        return _check_family(family)
    if len(recorded) == 1 and None not in recorded:  # every group built by param_groups for one family
        with contextlib.suppress(UnknownOptimizerFamily):  # a class muP does not know: trust the groups
            return detect_optimizer_family(optimizer)
        return cast(OptimizerFamily, next(iter(recorded)))
    return detect_optimizer_family(optimizer)


def _check_family(family: str) -> OptimizerFamily:
    if family not in get_args(OptimizerFamily):
        raise ValueError(f"optimizer family must be one of {get_args(OptimizerFamily)}, got {family!r}")
    return family  # type: ignore[return-value]


def _has_stepped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` has state from a step. Adagrad fills its state at construction (``step`` 0, ``sum``); a
    state without ``step`` (SGD's momentum buffer) comes from a step."""
    return any(float(state.get("step", 1)) != 0 for state in optimizer.state.values())


def _refuse_absolute_lr_floor(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """An LR floor shared by every group (``CosineAnnealingLR``'s ``eta_min``) would undo muP's per-group ratios."""
    for child in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _refuse_absolute_lr_floor(child, optimizer)
    eta_min = getattr(scheduler, "eta_min", 0)
    if getattr(scheduler, "optimizer", None) is optimizer and eta_min != 0:
        raise ValueError(
            f"{type(scheduler).__qualname__}(eta_min={eta_min!r}) decays every param group towards one absolute LR, "
            "so muP's smaller hidden-layer LRs would rise towards it and the per-group LR ratios break. Use "
            "eta_min=0, or a floor relative to each group's LR: lightning_power.WSDScheduler(min_lr_ratio=...) or a "
            "LambdaLR"
        )


def _rebase_scheduler(
    scheduler: Any, optimizer: torch.optim.Optimizer, origin: list[int], factors: list[float]
) -> None:
    """Expand a scheduler's per-group lists from the original groups to the new ones; scale its LR lists."""
    for child in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _rebase_scheduler(child, optimizer, origin, factors)
    if getattr(scheduler, "optimizer", None) is not optimizer:
        return
    n_before = max(origin) + 1
    for attr in _SCHEDULER_LR_LISTS + _SCHEDULER_GROUP_LISTS:
        values = getattr(scheduler, attr, None)
        if not isinstance(values, list):
            continue
        if len(values) != n_before:
            raise RuntimeError(
                f"{type(scheduler).__qualname__}.{attr} has {len(values)} entries for {n_before} param groups"
            )
        expanded = [values[i] for i in origin]
        if attr in _SCHEDULER_LR_LISTS:
            expanded = [value * factor for value, factor in zip(expanded, factors)]
        setattr(scheduler, attr, expanded)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(param.shape) for name, param in _unique_named_parameters(model)}


def _unique_named_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(logical name, parameter)`` pairs, tied parameters once (under their first name).

    Two distinct parameters with one logical name (``module.weight`` next to ``weight``) are a ``ValueError``: the plan
    would give both one class, init and LR.
    """
    return [(name, param) for name, _, param in named_logical_parameters(model)]


def _names_by_id(model: nn.Module) -> dict[int, str]:
    return {id(param): name for name, param in _unique_named_parameters(model)}


def _shared_names(model: nn.Module) -> dict[str, str]:
    """Every other logical name of a shared parameter (``b.weight`` after ``b.weight = a.weight``) -> the name the
    plan keeps it under, its first (``a.weight``)."""
    kept = _names_by_id(model)
    return {
        logical: kept[id(param)]
        for logical, param in (
            (logical_param_name(name), param) for name, param in model.named_parameters(remove_duplicate=False)
        )
        if kept[id(param)] != logical
    }


def _align(shapes: Mapping[str, tuple[int, ...]], other: Mapping[str, tuple], what: str) -> dict[str, tuple]:
    """``other``'s entries keyed by the model's names; errors list the first mismatched names and ranks.

    Names may differ by one leading attribute on either side, e.g. a LightningModule's ``self.model`` against a
    base-shapes file made from the bare network.
    """
    other = {logical_param_name(name): value for name, value in other.items()}
    if set(other) != set(shapes):
        aligned = _match_without_leading_attribute(shapes, other)
        if aligned is None:
            only_model = sorted(set(shapes) - set(other))
            only_other = sorted(set(other) - set(shapes))
            raise ValueError(
                f"parameter names of the model and {what} do not match: only in the model: {_first(only_model)}; "
                f"only in {what}: {_first(only_other)}. Build {what} from the same class with only widths changed"
            )
        other = aligned
    rank = [
        f"{name}: model {shapes[name]} vs {what} {tuple(other[name])}"
        for name in shapes
        if len(shapes[name]) != len(other[name])
    ]
    if rank:
        raise ValueError(f"parameter ranks of the model and {what} do not match: {_first(rank)}")
    return {name: tuple(other[name]) for name in shapes}


def _match_without_leading_attribute(shapes: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any] | None:
    stripped_model = _strip_leading_attribute(shapes)
    if stripped_model is not None and set(stripped_model.values()) == set(other):
        return {name: other[short] for name, short in stripped_model.items()}
    stripped_other = _strip_leading_attribute(other)
    if stripped_other is not None and set(stripped_other.values()) == set(shapes):
        return {short: other[name] for name, short in stripped_other.items()}
    return None


def _strip_leading_attribute(names: Iterable[str]) -> dict[str, str] | None:
    """Map each name to itself without the first component, if all names share it; else ``None``."""
    names = list(names)
    if not names or not all("." in name for name in names) or len({n.split(".", 1)[0] for n in names}) != 1:
        return None
    return {name: name.split(".", 1)[1] for name in names}


def _widths_by_difference(base: tuple, other: tuple) -> tuple[int | None, ...]:
    """``mup``'s rule: a dimension is a width (keeps its base size) where ``base`` and ``other`` differ."""
    return tuple(None if b == o else b for b, o in zip(base, other))


def _warn_unvaried_dims(
    shapes: Mapping[str, tuple[int, ...]], base: Mapping[str, tuple], base_shape: Mapping[str, tuple]
) -> None:
    """Warn when the model differs from the base in a dimension the delta did not vary (then treated as fixed)."""
    unvaried = [
        f"{name} dim {i}: base {b} model {d}"
        for name, shape in shapes.items()
        for i, (b, d, w) in enumerate(zip(base[name], shape, base_shape[name]))
        if w is None and b != d
    ]
    if unvaried:
        warnings.warn(
            "the model differs from base_model in dimensions that delta_model does not vary, so muP treats them as "
            f"fixed sizes: {_first(unvaried)}. Vary every width (e.g. the MLP hidden size) in delta_model",
            UserWarning,
            stacklevel=4,
        )


def _find_readouts(
    model: nn.Module,
    shapes: Mapping[str, tuple[int, ...]],
    base_shape: Mapping[str, tuple[int | None, ...]],
    readout: str | Sequence[str] | None,
    required: bool,
) -> dict[str, str]:
    """Readout module -> weight name: the named modules (validated), or every ``nn.Linear`` mapping a width to a
    fixed size (the layers ``mup`` requires to be ``MuReadout``)."""

    def maps_width_to_fixed(weight_name: str) -> bool:
        dims = base_shape[weight_name]
        return len(dims) == 2 and dims[0] is None and dims[1] is not None

    modules = {logical_param_name(name): module for name, module in model.named_modules()}
    names = _names_by_id(model)
    if readout is None:
        found = {
            name: names[id(module.weight)]
            for name, module in modules.items()
            if isinstance(module, nn.Linear) and maps_width_to_fixed(names[id(module.weight)])
        }
        if not found and required:
            raise ValueError(
                "no readout found: no nn.Linear maps a width to a fixed size. Name the output layer's module, e.g. "
                "MuP(readout='head') or MuPPlan.from_models(..., readout='head')"
            )
        return found
    found = {}
    for name in (readout,) if isinstance(readout, str) else readout:
        module = modules.get(logical_param_name(name))
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) not in names:
            raise ValueError(f"readout={name!r} names no module with a weight; modules include {_first(list(modules))}")
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            raise ValueError(
                f"readout={name!r} is an {type(module).__name__}: the readout multiplier divides the module's input, "
                "here token ids. Logits computed with F.linear(x, embedding.weight) are outside any module, so the "
                "multiplier cannot reach them: compute them with an nn.Linear output layer tied to the embedding "
                "(head.weight = embedding.weight) and name that layer, e.g. readout='head'"
            )
        weight_name = names[id(weight)]
        if required and not maps_width_to_fixed(weight_name):
            raise ValueError(
                f"readout={name!r} has weight shape {shapes[weight_name]} with base shape {base_shape[weight_name]} "
                "(None = fixed size); a readout maps a width (fan-in, dim 1) to a fixed size (fan-out, dim 0)"
            )
        found[logical_param_name(name)] = weight_name
    unnamed = [
        name
        for name, module in modules.items()
        if isinstance(module, nn.Linear) and name not in found and maps_width_to_fixed(names[id(module.weight)])
    ]
    if unnamed:
        warnings.warn(
            f"these nn.Linear layers map a width to a fixed size but are not readouts, so their outputs grow with "
            f"width: {_first(unnamed)}; add them to readout=[...] unless that is intended",
            UserWarning,
            stacklevel=4,
        )
    return found


def _first(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "") if items else "none"
