"""The muP forward multipliers that live in the model: the readout's ``1 / m_in`` and the attention scale.

Both are plain Python floats held by the module (a forward pre-hook object, or the attention's own scale), never read
from the tensors at forward time, so deepcopy, pickling, FSDP, DTensors and ``torch.compile`` keep them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class ReadoutMultiplier:
    """Forward pre-hook that divides a readout layer's input by ``width_mult``: ``mup.MuReadout`` on any layer.

    Tensor Programs V (arXiv:2203.03466) Table 8 gives the output layer a ``1 / fan_in`` multiplier relative to the
    base model, i.e. ``1 / width_mult``. ``MuReadout`` applies it to the layer's input, ``W (x / m) + b``, so the
    bias is not scaled; so does this hook.

    Example::

        >>> import torch
        >>> head = torch.nn.Linear(8, 3)
        >>> hook = attach_readout_multiplier(head, width_mult=4.0)
        >>> x = torch.randn(2, 8)
        >>> torch.equal(head(x), torch.nn.functional.linear(x / 4.0, head.weight, head.bias))
        True
    """

    def __init__(self, width_mult: float) -> None:
        if not width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        self.width_mult = float(width_mult)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if not args:
            raise TypeError(
                f"the muP readout {type(module).__name__} was called without a positional input; its multiplier "
                "divides the first positional argument, so call it as head(x), not head(input=x)"
            )
        return (args[0] / self.width_mult, *args[1:])

    def __repr__(self) -> str:
        return f"ReadoutMultiplier(width_mult={self.width_mult:g})"


def attach_readout_multiplier(module: nn.Module, width_mult: float) -> ReadoutMultiplier:
    """Register (or update, if already there) ``module``'s :class:`ReadoutMultiplier`; returns it.

    Registering a new one clears ``torch.compile``'s caches (``torch.compiler.reset()``), so that graphs traced
    without the multiplier are traced again; updating one needs no retrace.
    """
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, ReadoutMultiplier):
            hook.width_mult = ReadoutMultiplier(width_mult).width_mult
            return hook
    hook = ReadoutMultiplier(width_mult)
    module.register_forward_pre_hook(hook)
    # Dynamo does not guard on module hooks (torch._dynamo.config.skip_nnmodule_hook_guards), so a graph traced
    # before this hook existed, for this module or another instance of its class, would be reused without it.
    torch.compiler.reset()
    return hook


def readout_multiplier_of(module: nn.Module) -> ReadoutMultiplier | None:
    """The :class:`ReadoutMultiplier` attached to ``module``, if any."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, ReadoutMultiplier):
            return hook
    return None


def attention_scale(head_dim: int, base_head_dim: int | None = None) -> float:
    """muP attention-logit scale: ``1 / d_head`` instead of ``1 / sqrt(d_head)`` (Tensor Programs V, Def. 4.1).

    With ``base_head_dim`` it is ``sqrt(base_head_dim) / head_dim``, which equals the standard ``1 / sqrt(d_head)`` at
    the base width, so the tuned proxy is unchanged (Megatron-LM's form). When width grows by adding heads at a fixed
    ``head_dim``, the two scales differ only by a constant (``mup`` issue #17).

    Example::

        >>> attention_scale(64), attention_scale(128, base_head_dim=32)
        (0.015625, 0.04419417382415922)
        >>> scale = attention_scale(32)  # then: F.scaled_dot_product_attention(q, k, v, scale=scale)
    """
    if head_dim <= 0:
        raise ValueError(f"head_dim must be > 0, got {head_dim}")
    if base_head_dim is None:
        return 1.0 / head_dim
    if not 0 < base_head_dim <= head_dim:
        raise ValueError(f"base_head_dim must be in (0, head_dim={head_dim}], got {base_head_dim}")
    return math.sqrt(base_head_dim) / head_dim


__all__ = ["ReadoutMultiplier", "attach_readout_multiplier", "attention_scale", "readout_multiplier_of"]
