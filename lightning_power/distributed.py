"""Shard-local views of parameters and one-collective reductions.

Under DDP every rank holds whole parameters. Under ``FSDPStrategy`` (FSDP1, ``use_orig_params=True``) each
original parameter is a 1-D view of this rank's slice of a flat parameter, possibly empty. Under
``ModelParallelStrategy`` (FSDP2) parameters are ``DTensor`` s whose ``to_local()`` is this rank's shard.
Statistics are computed on the local part and combined with a single ``all_reduce``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch import nn

# Attributes that wrappers insert into parameter names wherever they wrap: Lightning's and Fabric's strategy wrappers,
# torch.compile, FSDP1, activation checkpointing and CPU offload (torch's ActivationWrapper).
WRAPPER_ATTRIBUTES = frozenset(
    {"_forward_module", "_original_module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
)
# DistributedDataParallel's (and DataParallel's) attribute: a wrapper only at the root of a name, where DDP sits. Deeper
# in the path it is a user's own submodule called ``module``, which stays.
ROOT_WRAPPER_ATTRIBUTES = frozenset({"module"})
_LEADING_WRAPPER_ATTRIBUTES = WRAPPER_ATTRIBUTES | ROOT_WRAPPER_ATTRIBUTES


def logical_param_name(name: str) -> str:
    """Return ``name`` without the components that wrappers insert: every :data:`WRAPPER_ATTRIBUTES` component,
    and the leading run of wrapper components, where DDP's ``module`` also counts.

    >>> logical_param_name("module._forward_module._orig_mod.blocks.0._fsdp_wrapped_module.attn.qkv.weight")
    'blocks.0.attn.qkv.weight'
    >>> logical_param_name("block.module.weight")  # a user's submodule named ``module``
    'block.module.weight'
    """
    parts = name.split(".")
    start = 0
    while start < len(parts) - 1 and parts[start] in _LEADING_WRAPPER_ATTRIBUTES:
        start += 1
    return ".".join(part for part in parts[start:] if part not in WRAPPER_ATTRIBUTES)


def logical_names(names: Iterable[str]) -> list[str]:
    """The logical names of distinct ``names`` (one per parameter), in order; a ``ValueError`` naming both raw names
    when two of them have the same logical name, which would merge two parameters into one."""
    logical: list[str] = []
    first: dict[str, str] = {}
    for name in names:
        short = logical_param_name(name)
        if short in first:
            raise ValueError(
                f"parameters {first[short]!r} and {name!r} both have the logical name {short!r} once the wrapper "
                f"attributes ({', '.join(sorted(_LEADING_WRAPPER_ATTRIBUTES))}) are removed, so they "
                "cannot be told apart; rename one of the attributes"
            )
        first[short] = name
        logical.append(short)
    return logical


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: the local shard of a ``DTensor``, else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` with at least one ``Shard`` placement."""
    placements = getattr(tensor, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def named_logical_parameters(module: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """``(logical name, raw name, parameter)`` for every distinct parameter of ``module``, in registration order;
    a ``ValueError`` when two have one logical name (see :func:`logical_names`)."""
    named = list(module.named_parameters())
    return [(name, raw, param) for name, (raw, param) in zip(logical_names(raw for raw, _ in named), named)]


def named_local_parameters(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(logical name, local shard)`` for every parameter of ``module``, in registration order."""
    for name, _, param in named_logical_parameters(module):
        yield name, local_tensor(param.detach())


@dataclass(frozen=True)
class LocalPart:
    """This rank's part of one parameter: elements ``[start, start + numel)`` of the flattened (C-order) parameter.

    Under DDP and on one device the part is the whole parameter. Under FSDP1 it is the rank's flat view, under FSDP2
    the ``DTensor``'s local rows; both are contiguous ranges of the flattened parameter, possibly empty. A parameter
    that a sharded model keeps replicated is owned by the first rank of the sharding group only, so that a sum over
    the group counts each element once.
    """

    name: str
    param: nn.Parameter
    shape: torch.Size
    start: int
    owned: bool

    def local(self) -> torch.Tensor:
        """The local elements as a flat tensor sharing the parameter's memory (empty when not owned)."""
        data = local_tensor(self.param.detach())
        return data.view(-1) if self.owned else data.view(-1)[:0]


@dataclass(frozen=True)
class ShardLayout:
    """Every parameter's local part, and the group over which a sum of local counts gives global counts."""

    parts: list[LocalPart]
    group: dist.ProcessGroup | None  # None: no parameter is sharded (one device or DDP), so nothing to reduce

    def group_rank(self) -> int:
        return dist.get_rank(self.group) if self.group is not None else 0


def shard_layout(module: nn.Module, root: nn.Module | None = None) -> ShardLayout:
    """Describe where this rank's part of each parameter of ``module`` sits in the whole parameter.

    ``root`` is the strategy-wrapped model (``trainer.model``), needed under FSDP1 where the root wrapper sits outside
    ``module``. Raises ``ValueError`` for layouts whose local part is not one contiguous range (tensor parallelism,
    sharding along a dimension other than 0, non-contiguous parameters, FSDP1 without ``use_orig_params``).
    """
    fsdp1_views, groups = _fsdp1_flat_views(root if root is not None else module)
    found: list[tuple[str, nn.Parameter, torch.Size, int, bool]] = []  # name, param, shape, start, sharded
    for name, raw_name, param in named_logical_parameters(module):
        if name.endswith("_flat_param"):
            raise ValueError(
                f"parameter {raw_name!r} is an FSDP1 flat parameter; use FSDPStrategy(use_orig_params=True) so that "
                "parameters keep their names"
            )
        if id(param) in fsdp1_views:
            shape, start = fsdp1_views[id(param)]
            found.append((name, param, shape, start, True))
        elif is_sharded(param):
            start, mesh_group = _dtensor_row_range(name, param)
            groups.append(mesh_group)
            found.append((name, param, param.shape, start, True))
        else:
            found.append((name, param, param.shape, 0, False))
        if not local_tensor(param.detach()).is_contiguous():
            raise ValueError(f"parameter {name!r} is not contiguous; make it contiguous (`.contiguous()`) first")
    group = _single_group(groups)
    first_of_group = group is None or dist.get_rank(group) == 0
    parts = [
        LocalPart(name, param, torch.Size(shape), start, owned=sharded or first_of_group)
        for name, param, shape, start, sharded in found
    ]
    return ShardLayout(parts, group)


def _fsdp1_flat_views(root: nn.Module) -> tuple[dict[int, tuple[torch.Size, int]], list[dist.ProcessGroup]]:
    """For FSDP1 (``use_orig_params=True``): ``id(param) -> (full shape, offset of its view)``, and the shard groups.

    It reads FSDP1's ``FlatParameter`` metadata (``_params``, ``_shapes``, ``_shard_param_infos``), which torch keeps
    private; ``tests/test_sparsity_distributed.py`` pins it.
    """
    if not dist.is_available():
        return {}, []
    from torch.distributed.fsdp import FullyShardedDataParallel

    views: dict[int, tuple[torch.Size, int]] = {}
    groups: list[dist.ProcessGroup] = []
    for fsdp_module in FullyShardedDataParallel.fsdp_modules(root):
        handle = fsdp_module._handle
        if handle is None or handle.flat_param._params is None or not handle.uses_sharded_strategy:
            continue  # no parameters, use_orig_params=False (refused later), or NO_SHARD (whole replicas, like DDP)
        groups.append(cast("dist.ProcessGroup", fsdp_module.process_group))  # None only before FSDP's init
        flat, params = handle.flat_param, handle.flat_param._params
        for param, shape, info in zip(params, flat._shapes, flat._shard_param_infos):
            start = cast(int, info.intra_param_start_idx) if info.in_shard else 0  # None only when not in_shard
            views[id(param)] = (torch.Size(shape), start)
    return views, groups


def _dtensor_row_range(name: str, param: torch.Tensor) -> tuple[int, dist.ProcessGroup]:
    """Flat offset of a dim-0-sharded ``DTensor``'s local rows, and the group of its one sharded mesh dimension."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    dtensor = cast(DTensor, param)  # is_sharded(param): a DTensor
    placements, mesh = dtensor.placements, dtensor.device_mesh
    sharded_dims = [i for i, p in enumerate(placements) if p.is_shard()]
    shard = placements[sharded_dims[0]] if len(sharded_dims) == 1 else None
    if type(shard) is not Shard or shard.dim:
        raise ValueError(
            f"parameter {name!r} has placements {placements}; only Shard(0) on one mesh dimension (FSDP2, HSDP) is "
            "supported"
        )
    _, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
    return offset[0] * math.prod(param.shape[1:]), mesh.get_group(sharded_dims[0])


def _single_group(groups: list[dist.ProcessGroup]) -> dist.ProcessGroup | None:
    if not groups:
        return None
    ranks = {tuple(dist.get_process_group_ranks(g)) for g in groups}
    if len(ranks) > 1:
        raise ValueError(f"parameters are sharded over different process groups (ranks {sorted(ranks)})")
    return groups[0]


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum ``tensor`` in place over ``group`` with one collective; a no-op when ``group`` is None."""
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def reduce_sum_to_first_rank(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum ``tensor`` in place onto the first rank of ``group`` (one collective); a no-op when ``group`` is None."""
    if group is not None:
        dist.reduce(tensor, dst=dist.get_global_rank(group, 0), op=dist.ReduceOp.SUM, group=group)
    return tensor


def assemble_flat(part: torch.Tensor, start: int, numel: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The whole flattened tensor on every rank, from each rank's disjoint range ``[start, start + len(part))``.

    One ``all_reduce`` of a zero-filled buffer: the ranges are disjoint, so the sum places every element exactly.
    """
    if group is None:
        return part
    full = torch.zeros(numel, dtype=part.dtype, device=part.device)
    full[start : start + part.numel()] = part
    return all_reduce_sum(full, group)
