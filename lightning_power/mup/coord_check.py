"""Coordinate check: does every activation keep its size as the model widens, during the first steps of training?

Under muP the mean absolute value of each module's output stays the same order at every width, during training as at
init (Tensor Programs V, arXiv:2203.03466, Sec. 5 and the ``mup`` README). The check trains each width for a few Adam
(or SGD) steps at a deliberately large LR from several seeds, records mean ``|output|`` of every module in float32, and
fits the log-log slope of that size against width, per module and step. A slope near 0 is flat; under the standard
parametrization (SP) slopes are clearly positive (activations blow up with width).

Pass rule: every slope within ``+-tolerance``, and no mean ``|output|`` infinite, NaN, or 0 at some widths but not
others (0 at every width does not depend on width: a zero-initialised layer). A width-scaling bug moves slopes by at
least 0.5 (a factor ``sqrt(width)``): SP's hidden activations start at +0.5 and reach +1 to +2 within 5 steps, and
dropping muP's init rescale, readout multiplier or hidden-LR scaling each gives +0.5 or more. Correct muP is flat only
up to finite-width effects; on the demo GPT at widths 32-256, Adam at LR 2^-6 and 3 seeds we measured slopes within
+-0.36 by step 5 (narrow models with 2-4 heads run hotter). Hence the default tolerance of 0.4.

Modules a forward skips (stochastic depth, routing; an empty output counts as a skip): a module's value at a width and
step is the mean over the seeds whose forward called it. Where no seed called it at some width, that step cannot be
checked: its value there is NaN, and the result lists it in ``not_called()`` instead of failing it.

Known exception: the model's output, each readout's output, and the output of any module that returns a readout's
output tensor itself (a container such as ``self.gpt`` whose forward ends in the readout) shrink like ``width^-1/2`` at
step 1 (the forward before the first update) under muP's ``1/width`` readout multiplier with a non-zero readout init,
and keep part of that shrinkage over the next steps, until the updates dominate the initial weights. Their slopes may
lie anywhere in ``[-0.5 - tolerance, tolerance]``: they may shrink, never grow. (Zero-initialising the readout
removes it.)

Python::

    from lightning_power.demo import GPT
    from lightning_power.mup.coord_check import coord_check

    result = coord_check(GPT, [32, 64, 128, 256], batches, model_args={"depth": 2, "head_dim": 16,
                         "attention_scale": "1/d_head", "context_length": 64}, mup=True, readout="head")
    print(result.table()); result.save("out/coord_check_mup")  # .json and .png

Command line::

    lightning-power coord-check --config examples/configs/gpt_mup.yaml --widths 32 64 128 256 --out coord_check
"""

from __future__ import annotations

import argparse
import importlib
import io
import itertools
import json
import math
import numbers
import os
import platform
import re
import sys
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast, get_args

import torch
import yaml
from torch import nn

from lightning_power.distributed import logical_param_name
from lightning_power.files import write_atomically
from lightning_power.mup.plan import (
    ModelInit,
    MuPPlan,
    OptimizerFamily,
    UnknownOptimizerFamily,
    detect_optimizer_family,
)

DEFAULT_LR = 2.0**-6  # large for Adam on the demo task (mup_cpu_baseline.md), as a coordinate check wants
DEFAULT_TOLERANCE = 0.4  # see the module docstring
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
ROOT = "<output>"  # name under which the model's own output is recorded


@dataclass
class CoordCheckResult:
    """Mean ``|output|`` per module, step and width (averaged over seeds), and the log-log slopes vs width.

    ``l1[module][t - 1][i]`` is the value at step ``t`` (1 = the forward before the first update) and width
    ``widths[i]``, averaged over the ``calls[module][t - 1][i]`` seeds whose forward called the module (NaN when none
    did); ``slopes[module][t - 1]`` its least-squares slope of ``log2 l1`` on ``log2 width`` (NaN when a value is 0,
    infinite or NaN). ``readout_outputs`` are the modules allowed to shrink (the readouts, the modules that return a
    readout's output tensor, and the model output ``<output>``); ``failures`` lists every slope out of range and every
    value that is infinite, NaN, or 0 at some widths but not all (0 at every width: a zero-initialised layer). A step at
    which a module was not called at some width is not checked; :meth:`not_called` lists those.
    """

    parametrization: Literal["mup", "sp"]
    widths: list[int]
    steps: int
    seeds: int
    lr: float
    optimizer: str
    tolerance: float
    l1: dict[str, list[list[float]]]
    calls: dict[str, list[list[int]]]
    slopes: dict[str, list[float]]
    readout_outputs: list[str]
    failures: list[str] = field(default_factory=list)
    machine: str = field(default_factory=lambda: _machine())

    @property
    def passed(self) -> bool:
        return not self.failures

    def not_called(self) -> list[str]:
        """The module steps left unchecked because no seed's forward called the module at some width."""
        return [
            f"{name} t={t}: not called at width {', '.join(str(w) for w, c in zip(self.widths, calls) if not c)}"
            for name, per_step in self.calls.items()
            for t, calls in enumerate(per_step, start=1)
            if not all(calls)
        ]

    def max_abs_slope(self) -> float:
        """The largest |slope| of any module but the readout outputs (their init shrinkage is allowed)."""
        return max(
            (
                abs(s)
                for name, slopes in self.slopes.items()
                if name not in self.readout_outputs
                for s in slopes
                if math.isfinite(s)
            ),
            default=0.0,
        )

    def table(self) -> str:
        """Slopes per module (rows) and step (columns); ``!`` marks a slope beyond the tolerance."""
        name_width = max(len(name) for name in self.slopes)
        header = f"{'module':<{name_width}} " + " ".join(f"{f't={t}':>7}" for t in range(1, self.steps + 1))
        title = (
            f"{self.parametrization} coordinate check ({self.optimizer}, lr {self.lr:g}, widths {self.widths}, "
            f"{self.seeds} seeds): log2-log2 slope of mean |output| vs width"
        )
        lines = [title, header]
        for name, slopes in self.slopes.items():
            cells = []
            for t, slope in enumerate(slopes, start=1):
                values, calls = self.l1[name][t - 1], self.calls[name][t - 1]
                failure = _failure(name, t, values, calls, slope, name in self.readout_outputs, self.tolerance)
                if math.isfinite(slope):
                    text = f"{slope:+6.2f}"
                else:
                    text = "-" if all(map(math.isfinite, values)) else "n/c" if not failure else "nan"
                cells.append(f"{text:>6}{'!' if failure else ' '}")
            lines.append(f"{name:<{name_width}} " + " ".join(cells))
        lines.extend(f"not checked: {line}" for line in self.not_called())
        verdict = "PASS" if self.passed else f"FAIL ({len(self.failures)} slopes out of range or values not finite)"
        lines.append(
            f"{self.parametrization}: {verdict}; largest |slope| outside the readout outputs "
            f"{self.max_abs_slope():.2f} (tolerance {self.tolerance:g})"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "not_called": self.not_called()}

    def figure(self) -> Any:
        """One panel per step: mean |output| vs width on log-log axes (a matplotlib Figure).

        Modules of one kind (the name without layer indices, e.g. ``blocks.attn.qkv``) share a colour and a legend
        entry, so deep models stay readable.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kinds = list(dict.fromkeys(_kind(name) for name in self.l1))
        colors: Sequence[Any] = getattr(plt.get_cmap("tab20"), "colors")  # a ListedColormap's; typed as any Colormap
        fig, axes = plt.subplots(1, self.steps, figsize=(2.6 * self.steps + 1, 3.4), sharey=True, squeeze=False)
        for t, ax in enumerate(axes[0], start=1):
            labelled = set()
            for name, values in self.l1.items():
                k = kinds.index(_kind(name))
                ax.plot(
                    self.widths,
                    values[t - 1],
                    marker="o",
                    markersize=2.5,
                    linewidth=1,
                    color=colors[k % 20],
                    linestyle="-" if k < 20 else "--",
                    label=None if k in labelled else kinds[k],
                )
                labelled.add(k)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"t={t}", fontsize=9)
            ax.set_xlabel("width", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0][0].set_ylabel("mean |output|", fontsize=8)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=7, frameon=False)
        verdict = "pass" if self.passed else "fail"
        fig.suptitle(
            f"{'muP' if self.parametrization == 'mup' else 'SP'} coordinate check ({verdict}, max |slope| "
            f"{self.max_abs_slope():.2f}): {self.optimizer}, lr {self.lr:g}, {self.seeds} seeds   "
            f"[{self.machine}]",
            fontsize=9,
        )
        rows = math.ceil(len(labels) / 6)
        fig.tight_layout(rect=(0, 0.04 + 0.045 * rows, 1, 1))
        return fig

    def save(self, stem: str | os.PathLike, tensorboard_dir: str | os.PathLike | None = None) -> None:
        """Write ``<stem>.json`` and ``<stem>.png`` atomically; also log the figure to TensorBoard if asked."""
        import matplotlib.pyplot as plt

        stem = os.fspath(stem)
        write_atomically(stem + ".json", json.dumps(self.to_dict(), indent=1, allow_nan=True))
        fig = self.figure()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
        write_atomically(stem + ".png", png.getvalue())
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(os.fspath(tensorboard_dir)) as writer:
                writer.add_figure(f"coord_check/{self.parametrization}", fig)
        plt.close(fig)


def coord_check(
    model: type[nn.Module] | Callable[[int], nn.Module],
    widths: Sequence[int],
    batches: Sequence[Any],
    *,
    model_args: Mapping[str, Any] | None = None,
    width_arg: str = "width",
    mup: bool = True,
    steps: int = 5,
    seeds: int = 3,
    lr: float = DEFAULT_LR,
    optimizer: str | type[torch.optim.Optimizer] = "adamw",
    optimizer_args: Mapping[str, Any] | None = None,
    optimizer_family: OptimizerFamily | None = None,
    readout: str | Sequence[str] | None = None,
    model_init: ModelInit | None = "fixed_std",
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> CoordCheckResult:
    """Train every width for ``steps`` steps from ``seeds`` seeds and fit the slope of mean ``|output|`` vs width.

    Args:
        model: a module class built as ``model(**model_args, width=w)``, or a factory ``width -> module``.
        widths: at least 4 integer widths on a x2 grid (e.g. 32, 64, 128, 256); the first is muP's base width and the
            second its delta.
        batches: the fixed batches of steps 1, 2, ... (cycled); the same for every width and seed.
        model_args: init arguments of ``model`` when it is a class.
        width_arg: the init argument that sets the width.
        mup: apply muP (plan, init, readout multiplier, LR groups); ``False`` runs the standard parametrization.
        steps: training steps recorded (step 1 is the forward before the first update).
        seeds: seeds per width (at least 3), averaged.
        lr: the base learning rate; make it large, a coordinate check wants to provoke blow-ups.
        optimizer: ``"adamw"``, ``"adam"``, ``"sgd"`` or a torch optimizer class.
        optimizer_args: further optimizer arguments (betas, momentum, ...).
        optimizer_family: ``"adam"`` or ``"sgd"`` muP LR rules; ``None`` detects them from the optimizer class.
        readout: the readout module name(s) for muP (see :class:`~lightning_power.mup.MuPPlan`).
        model_init: how the model initialises itself (see :class:`~lightning_power.mup.MuP`).
        loss_fn: ``(module, batch) -> loss``; by default the module's ``training_step(batch, 0)``.
        tolerance: the largest |slope| that passes.
    """
    _check_arguments(widths, steps, seeds, lr, tolerance)
    widths = [int(w) for w in widths]
    if not batches:
        raise ValueError("batches must hold at least one batch")
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {sorted(OPTIMIZERS)} or a torch optimizer class, got {optimizer!r}"
            )
        optimizer_cls = OPTIMIZERS[optimizer]
    else:
        optimizer_cls = optimizer
    if optimizer_family is not None and optimizer_family not in get_args(OptimizerFamily):
        raise ValueError(
            f"optimizer_family must be one of {get_args(OptimizerFamily)} or None, got {optimizer_family!r}"
        )
    family = optimizer_family or detect_optimizer_family(optimizer_cls)
    factory = _factory(model, model_args or {}, width_arg)

    try:
        with torch.device("meta"):
            base, delta = factory(widths[0]), factory(widths[1])
    except TypeError as error:
        raise ValueError(
            f"cannot build the model at width {widths[0]} from model_args and width_arg: {error}"
        ) from error
    if loss_fn is None and not callable(getattr(base, "training_step", None)):
        raise ValueError(f"{type(base).__name__} has no training_step; pass loss_fn=(module, batch) -> loss")
    sums: dict[str, list[list[float]]] = {}
    calls: dict[str, list[list[int]]] = {}
    readout_outputs: set[str] = set()
    for width_index, width in enumerate(widths):
        for seed in range(seeds):
            torch.manual_seed(seed)
            net = factory(width).float().train()
            plan = MuPPlan.from_models(net, base, delta, readout)
            make_optimizer: Callable[..., torch.optim.Optimizer] = optimizer_cls  # a subclass: it takes lr
            try:
                opt = make_optimizer(net.parameters(), lr=lr, **(optimizer_args or {}))
            except TypeError as error:  # a misspelt optimizer argument
                arguments = dict(optimizer_args or {})
                raise ValueError(
                    f"cannot build {optimizer_cls.__qualname__}(params, lr={lr}, **{arguments}): {error}"
                ) from error
            if mup:
                if model_init is not None:
                    plan.apply_init(net, model_init)
                plan.attach_readouts(net)
                plan.regroup(opt, net, family)
            recorder = _Recorder(plan.readouts)
            for t, sizes in enumerate(recorder.train(net, opt, batches, steps, loss_fn)):
                for name, size in sizes.items():
                    sums.setdefault(name, [[0.0] * len(widths) for _ in range(steps)])[t][width_index] += size
                    calls.setdefault(name, [[0] * len(widths) for _ in range(steps)])[t][width_index] += 1
            readout_outputs |= recorder.readout_outputs

    l1 = {
        name: [
            [total / count if count else math.nan for total, count in zip(step_sums, step_calls)]
            for step_sums, step_calls in zip(per_step, calls[name])
        ]
        for name, per_step in sums.items()
    }
    log_widths = [math.log2(w) for w in widths]
    slopes = {name: [_slope(log_widths, per_width) for per_width in per_step] for name, per_step in l1.items()}
    exceptions = sorted(name for name in l1 if name in readout_outputs or name.split("[")[0] == ROOT)
    failures = [
        failure
        for name, per_step in slopes.items()
        for t, slope in enumerate(per_step, start=1)
        if (failure := _failure(name, t, l1[name][t - 1], calls[name][t - 1], slope, name in exceptions, tolerance))
    ]
    return CoordCheckResult(
        parametrization="mup" if mup else "sp",
        widths=widths,
        steps=steps,
        seeds=seeds,
        lr=lr,
        optimizer=optimizer if isinstance(optimizer, str) else optimizer.__name__,
        tolerance=tolerance,
        l1=l1,
        calls=calls,
        slopes=slopes,
        readout_outputs=exceptions,
        failures=failures,
    )


def _check_arguments(widths: Sequence[int], steps: int, seeds: int, lr: float, tolerance: float) -> None:
    """Raise ``ValueError`` naming the first argument of :func:`coord_check` (or the CLI) that is out of range."""
    if not all(isinstance(w, numbers.Integral) for w in widths):
        raise ValueError(f"widths must be integers, got {list(widths)}")
    if len(widths) < 4 or any(b != 2 * a for a, b in itertools.pairwise(widths)) or widths[0] <= 0:
        raise ValueError(
            f"widths must be at least 4 positive widths on a x2 grid (e.g. 32 64 128 256), got {list(widths)}"
        )
    if seeds < 3:
        raise ValueError(f"seeds must be >= 3 (slopes from one seed are noise), got {seeds}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")


def _failure(
    name: str,
    t: int,
    values: Sequence[float],
    calls: Sequence[int],
    slope: float,
    is_readout_output: bool,
    tolerance: float,
) -> str | None:
    """Why module ``name`` fails at step ``t`` (its mean |output| and number of calls per width, their slope), or
    ``None``.

    An infinite or NaN value fails: the model blew up. So does 0 at some widths but not others. 0 at every width where
    the module was called passes: it does not depend on width (a zero-initialised layer, e.g. ``zero_init_readout``,
    and a zero-initialised layer below it, which gets no gradient until the readout has moved). The slope is not checked
    when the module was not called at some width (its value there is NaN): :meth:`CoordCheckResult.not_called` reports
    that.
    """
    called = [v for v, count in zip(values, calls) if count]
    shown = ", ".join(f"{v:g}" if count else "not called" for v, count in zip(values, calls))
    if not all(map(math.isfinite, called)):
        return f"{name} t={t}: mean |output| is not finite ({shown} by width)"
    if any(v == 0 for v in called):
        return None if not any(called) else f"{name} t={t}: mean |output| is 0 ({shown} by width)"
    if len(called) < len(values):
        return None
    low = -0.5 - tolerance if is_readout_output else -tolerance
    return None if low <= slope <= tolerance else f"{name} t={t}: slope {slope:+.3f}"


def _slope(x: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``log2(values)`` on ``x``; NaN unless every value is positive and finite."""
    if any(not 0 < v < math.inf for v in values):
        return math.nan
    y = [math.log2(v) for v in values]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def _factory(
    model: type[nn.Module] | Callable[[int], nn.Module], model_args: Mapping[str, Any], width_arg: str
) -> Callable[[int], nn.Module]:
    if isinstance(model, type):
        return lambda width: model(**{**model_args, width_arg: width})
    if model_args:
        raise ValueError("model_args is only for a model class; a factory takes the width alone")
    return model


class _Recorder:
    """Forward hooks recording every module's mean |output| per forward, and which outputs are a readout's output.

    ``readouts`` are the readout modules' logical names (wrapper prefixes such as ``module.`` or ``_orig_mod.``
    removed, as in :class:`~lightning_power.mup.MuPPlan`). A module whose output is the very tensor a readout returned
    in the same forward (a container passing the logits through) joins ``readout_outputs`` with the readouts.
    """

    def __init__(self, readouts: Collection[str]) -> None:
        self.readouts = set(readouts)
        self.records: dict[str, list[float]] = {}  # output name -> [sum of mean |output|, calls] in this forward
        self.readout_tensors: list[torch.Tensor] = []  # the readouts' outputs in this forward
        self.readout_outputs: set[str] = set()

    def train(
        self,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Sequence[Any],
        steps: int,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
    ) -> list[dict[str, float]]:
        """Mean |output| of every module at each step's forward, then an optimizer step."""
        handles = [
            module.register_forward_hook(self.hook(name or ROOT, logical_param_name(name) in self.readouts))
            for name, module in net.named_modules()
        ]
        sizes = []
        try:
            for t in range(steps):
                self.records.clear()
                self.readout_tensors.clear()
                optimizer.zero_grad(set_to_none=True)
                loss = _loss(net, batches[t % len(batches)], loss_fn)
                loss.backward()
                optimizer.step()
                sizes.append({name: total / count for name, (total, count) in self.records.items()})
        finally:
            self.readout_tensors.clear()
            for handle in handles:
                handle.remove()
        return sizes

    def hook(self, name: str, is_readout: bool) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            for key, tensor in _output_tensors(name, output):
                if is_readout:
                    self.readout_tensors.append(tensor)
                if is_readout or any(tensor is readout for readout in self.readout_tensors):
                    self.readout_outputs.add(key)
                total_count = self.records.setdefault(key, [0.0, 0])
                total_count[0] += mean_abs(tensor)
                total_count[1] += 1  # a module called several times per forward records its mean over calls

        return record


def _loss(net: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(net, batch)
    with warnings.catch_warnings():  # LightningModule.log without a Trainer
        warnings.filterwarnings("ignore", message=".*self.log.*")
        out = cast("Callable[[Any, int], Any]", net.training_step)(batch, 0)  # nn.Module types it Tensor | Module
    return out["loss"] if isinstance(out, Mapping) else out


def _output_tensors(name: str, output: Any) -> list[tuple[str, torch.Tensor]]:
    """Non-empty floating-point tensors of a module output: a tensor, or the entries of a tuple / list / dict.

    ``None`` and empty tensors (an expert routed no tokens) are skipped: an empty output counts as no call.
    """
    if isinstance(output, torch.Tensor):
        return [(name, output)] if output.is_floating_point() and output.numel() else []
    if isinstance(output, (tuple, list)):
        items: Any = enumerate(output)
    elif isinstance(output, Mapping):
        items = output.items()
    else:
        return []
    return [
        (f"{name}[{key}]", value)
        for key, value in items
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel()
    ]


def mean_abs(tensor: torch.Tensor) -> float:
    """Mean absolute value in float32. A DTensor is reduced over its shards (a collective), not gathered.

    The shards' sums are reduced, then divided by the global count: a sum reduces on every backend, while the
    average a DTensor ``mean()`` asks for is not available on gloo before torch 2.8.
    """
    total = tensor.detach().float().abs().sum()
    full_tensor = getattr(total, "full_tensor", None)
    return float(full_tensor() if callable(full_tensor) else total) / tensor.numel()


def _kind(name: str) -> str:
    """``blocks.3.attn.qkv`` -> ``blocks.attn.qkv``: the module's name without layer indices."""
    return ".".join(part for part in name.split(".") if not part.isdigit())


def _machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.machine()}"
    return f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__.split('+')[0]}"


# ------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``lightning-power coord-check``: run muP (and SP for comparison); exit 1 when muP fails, 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="lightning-power coord-check",
        description="Coordinate check of a LightningModule under muP, with SP side by side. Model, data, optimizer "
        "and the MuP callback's readout / model_init / optimizer_family are read from a lightning-power fit config.",
    )
    parser.add_argument("--config", help="a `lightning-power fit` YAML (model, data, optimizer, MuP callback)")
    parser.add_argument("--model", help="model class path (default: the config's, else lightning_power.demo.GPT)")
    parser.add_argument("--model-args", nargs="*", default=[], metavar="KEY=VALUE", help="model init overrides")
    parser.add_argument(
        "--width-arg",
        help="the model init argument that sets the width (default: the one the MuP callback's base_overrides and "
        "delta_overrides set to different values, else width)",
    )
    parser.add_argument("--data-args", nargs="*", default=[], metavar="KEY=VALUE", help="data module overrides")
    parser.add_argument(
        "--widths",
        nargs="+",
        type=int,
        default=[32, 64, 128, 256],
        help=">= 4 widths on a x2 grid; the first is the base, the second the delta (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=5, help="training steps recorded (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per width, >= 3 (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="a deliberately large LR (default: 2^-6)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help="default: the config's optimizer, else adamw")
    parser.add_argument(
        "--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest |slope| that passes (default: %(default)s)"
    )
    parser.add_argument("--no-sp", action="store_true", help="skip the standard-parametrization control run")
    parser.add_argument("--out", default="coord_check", help="folder for coord_check_{mup,sp}.{json,png}")
    parser.add_argument("--tensorboard", help="also log the figures to this TensorBoard log dir")
    args = parser.parse_args(argv)
    try:  # bad input exits 2, like any usage error: exit 1 means muP failed
        _check_arguments(args.widths, args.steps, args.seeds, args.lr, args.tolerance)
        config = _load_config(args.config)
        model_cfg = config.get("model", {})
        model_cls = _import(args.model or model_cfg.get("class_path", "lightning_power.demo.GPT"))
        model_args = {**model_cfg.get("init_args", {}), **_key_values(args.model_args, "--model-args")}
        mup_args = _mup_callback_args(config)
        width_arg = args.width_arg or _width_arg(mup_args)
        optimizer_cfg = config.get("optimizer", {})
        if args.optimizer:
            optimizer, optimizer_args = args.optimizer, {}
        elif optimizer_cfg:
            optimizer = _import(optimizer_cfg["class_path"])
            optimizer_args = {k: v for k, v in optimizer_cfg.get("init_args", {}).items() if k != "lr"}
        else:
            optimizer, optimizer_args = "adamw", {}
        optimizer_family = None if args.optimizer else mup_args.get("optimizer_family")
        if optimizer_family is None:  # an optimizer muP has no rules for is bad input, found before any training
            optimizer_cls = OPTIMIZERS[optimizer] if isinstance(optimizer, str) else optimizer
            try:
                detect_optimizer_family(optimizer_cls)
            except TypeError as error:  # Adafactor, or a class muP does not know (UnknownOptimizerFamily)
                where = " (in the config's MuP callback init_args)" if isinstance(error, UnknownOptimizerFamily) else ""
                raise ValueError(
                    f"optimizer {getattr(optimizer_cls, '__qualname__', optimizer_cls)!r}: {error}{where}"
                ) from error
        batches = _batches(config.get("data", {}), _key_values(args.data_args, "--data-args"), model_args, args.steps)
    except (OSError, ValueError) as error:
        parser.error(str(error))

    results = []
    for mup in (True,) if args.no_sp else (True, False):
        try:
            result = coord_check(
                model_cls,
                args.widths,
                batches,
                model_args=model_args,
                width_arg=width_arg,
                mup=mup,
                steps=args.steps,
                seeds=args.seeds,
                lr=args.lr,
                optimizer=optimizer,
                optimizer_args=optimizer_args,
                optimizer_family=optimizer_family,
                readout=mup_args.get("readout"),
                model_init=mup_args.get("model_init", "fixed_std"),
                tolerance=args.tolerance,
            )
        except ValueError as error:  # the config's readout, optimizer_family, model_args, ...
            parser.error(str(error))
        print(result.table(), end="\n\n")
        result.save(os.path.join(args.out, f"coord_check_{result.parametrization}"), args.tensorboard)
        results.append(result)
    if len(results) == 2 and results[1].passed:
        print("warning: SP passed too, so this check cannot tell the parametrizations apart; raise --lr or widths")
    print(f"wrote {os.path.join(args.out, 'coord_check_mup.{json,png}')}" + ("" if args.no_sp else " and _sp"))
    return 0 if results[0].passed else 1


class _ConfigLoader(yaml.SafeLoader):
    """YAML as the ``lightning-power`` CLI (jsonargparse) reads it: ``1e-8`` and ``3.0e4`` are numbers, where
    PyYAML's YAML 1.1 rules make them strings (they need a dot and a signed exponent)."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_value(text: Any) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)


def _load_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    with open(path) as file:
        config = _yaml_value(file) or {}
    if not isinstance(config, dict):
        raise ValueError(f"--config {path!r} is not a YAML mapping")
    return config


def _mup_callback_args(config: Mapping[str, Any]) -> dict[str, Any]:
    for callback in config.get("trainer", {}).get("callbacks", None) or []:
        if isinstance(callback, Mapping) and str(callback.get("class_path", "")).rsplit(".", 1)[-1] == "MuP":
            return dict(callback.get("init_args", {}))
    return {}


def _width_arg(mup_args: Mapping[str, Any]) -> str:
    """The model argument that sets the width: the one key the MuP callback's ``base_overrides`` and
    ``delta_overrides`` set to different values (or ``base_overrides``' one key), else ``"width"``."""
    base, delta = mup_args.get("base_overrides") or {}, mup_args.get("delta_overrides")
    if not base:
        return "width"
    keys = [key for key in base if delta is None or (key in delta and base[key] != delta[key])]
    if len(keys) != 1:
        raise ValueError(
            f"cannot tell the width argument from the MuP callback's base_overrides {base} and delta_overrides "
            f"{delta}: {', '.join(keys) or 'none'} of their keys could be the width; pass --width-arg"
        )
    return keys[0]


def _batches(
    data_cfg: Mapping[str, Any], overrides: Mapping[str, Any], model_args: Mapping[str, Any], steps: int
) -> list[Any]:
    """The first ``steps`` training batches of the config's data module (default: the demo byte corpus)."""
    init_args = {**data_cfg.get("init_args", {}), **overrides}
    if "class_path" not in data_cfg:
        init_args.setdefault("context_length", model_args.get("context_length", 128))
        init_args.setdefault("batch_size", 16)
    data_cls = _import(data_cfg.get("class_path", "lightning_power.demo.ByteCorpus"))
    try:
        datamodule = data_cls(**init_args)
    except TypeError as error:  # a misspelt --data-args or data init_args key
        raise ValueError(
            f"cannot build the data module {getattr(data_cls, '__qualname__', data_cls)} from the config's data "
            f"init_args and --data-args {init_args}: {error}"
        ) from error
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch)
        if len(batches) == steps:
            break
    return batches


def _key_values(items: Sequence[str], flag: str) -> dict[str, Any]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE pairs, got {item!r}")
        pairs[key] = _yaml_value(value)
    return pairs


def _import(class_path: str) -> Any:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot import {class_path!r}: {error}") from error


if __name__ == "__main__":
    sys.exit(main())
