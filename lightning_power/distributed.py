"""Shard-local views of parameters and one-collective reductions.

Under DDP every rank holds whole parameters. Under ``FSDPStrategy`` (FSDP1, ``use_orig_params=True``) each
original parameter is a 1-D view of this rank's slice of a flat parameter, possibly empty. Under
``ModelParallelStrategy`` (FSDP2) parameters are ``DTensor`` s whose ``to_local()`` is this rank's shard.
Statistics are computed on the local part and combined with a single ``all_reduce``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

# Prefixes that wrappers insert into parameter names: DDP, torch.compile, FSDP1, activation checkpointing.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def logical_param_name(name: str) -> str:
    """Return ``name`` with every wrapper prefix removed, wherever it appears in the dotted path.

    >>> logical_param_name("_forward_module._orig_mod.blocks.0._fsdp_wrapped_module.attn.qkv.weight")
    'blocks.0.attn.qkv.weight'
    """
    parts = [part for part in name.split(".") if f"{part}." not in WRAPPER_PREFIXES and part != "_forward_module"]
    return ".".join(parts)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: the local shard of a ``DTensor``, else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` with at least one ``Shard`` placement."""
    placements = getattr(tensor, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def named_local_parameters(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(logical name, local shard)`` for every parameter of ``module``, in registration order."""
    for name, param in module.named_parameters():
        yield logical_param_name(name), local_tensor(param.detach())
