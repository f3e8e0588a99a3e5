"""The per-layer grouping of parameter names used by every update-sparsity report.

A layer is the name up to its first integer component (``blocks.3.attn.qkv.weight`` -> ``blocks.3``,
``model.layers.12.mlp.w1`` -> ``model.layers.12``); a parameter outside any numbered container belongs to its own module
(``final_norm.weight`` -> ``final_norm``, ``head.weight`` -> ``head``; a top-level ``weight`` -> ``weight``).
"""

from __future__ import annotations

from collections.abc import Sequence


def layer_of(name: str) -> str:
    """The layer that parameter ``name`` belongs to (see the module docstring)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def group_by_layer(names: Sequence[str]) -> dict[str, list[int]]:
    """Layer -> indices of its parameters, layers in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(layer_of(name), []).append(index)
    return groups
