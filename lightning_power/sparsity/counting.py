"""Exact counts of changed elements on bit patterns: the reference implementation of a sparsity check.

Two values are *unchanged* when their bit patterns are equal (``atol == 0``), or, in tolerance mode, when their bit
patterns are equal or ``|current - snapshot| <= atol``. Comparing integer views makes NaN and the sign of zero exact:
``+0`` and ``-0`` differ, a NaN equals only the same NaN pattern, a value that became NaN has changed. A parameter
is compared in its *representation*: its own dtype (``compare_as=None``) or its bfloat16 cast
(``compare_as="bfloat16"``, the representation Mukherjee et al., arXiv 2505.11711 §2.2, compare). Every NaN casts
to the one bfloat16 pattern ``0x7FC0``, so the cast is the same function on every device.

The torch path here walks each parameter in fixed-size chunks, so its temporaries stay small whatever the model
size. It runs on CPU models and is the reference that the fused CUDA kernel (``fused.py``) is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

CompareAs = Literal["bfloat16"] | None
COMPARE_AS_CHOICES: tuple[CompareAs, ...] = (None, "bfloat16")

# Columns of a counts tensor, one row per parameter.
CHANGED, CHANGED_EXACT, CHANGED_SINCE_LAST, NAN = range(4)
N_COLUMNS = 4
BF16_CANONICAL_NAN = 0x7FC0
CHUNK_ELEMENTS = 1 << 22  # torch path: 4 Mi elements per step, a few tens of MB of temporaries at most

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def snapshot_dtype(dtype: torch.dtype, compare_as: CompareAs) -> torch.dtype:
    """The float dtype in which a parameter of ``dtype`` is compared and snapshotted."""
    if not dtype.is_floating_point:
        raise TypeError(f"only floating-point parameters can be compared, got {dtype}")
    return torch.bfloat16 if compare_as == "bfloat16" else dtype


def bits_dtype(dtype: torch.dtype) -> torch.dtype:
    """The signed integer dtype of the same width as ``dtype``: the view that exposes its bit patterns."""
    return _BITS[dtype.itemsize]


def representation_bits(values: torch.Tensor, compare_as: CompareAs) -> torch.Tensor:
    """Bit patterns of ``values`` in the compared representation (an integer tensor; a view when no cast is needed)."""
    target = snapshot_dtype(values.dtype, compare_as)
    if target == values.dtype:
        return values.view(bits_dtype(target))
    bits = values.to(target).view(bits_dtype(target))
    return bits.masked_fill_(values.isnan(), BF16_CANONICAL_NAN)


def bits_as_float(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values of bit patterns ``bits`` of float ``dtype``, widened to float32 (float64 stays float64)."""
    return bits.view(dtype).to(torch.float64 if dtype == torch.float64 else torch.float32)


def tolerance_value(atol: float, dtype: torch.dtype) -> float:
    """``atol`` rounded to the precision in which differences of ``dtype`` values are taken, as in the kernels."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.tensor(atol, dtype=compute).item()


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, start + length)`` of flat parameter ``param``, at ``snapshot_start`` in a flat snapshot."""

    param: int
    start: int
    snapshot_start: int
    length: int


def count_pieces(
    current: Sequence[torch.Tensor],
    pieces: Sequence[Piece],
    reference: torch.Tensor,
    last: torch.Tensor | None,
    counts: torch.Tensor,
    *,
    compare_as: CompareAs,
    atol: float,
) -> None:
    """Add each piece's counts to ``counts[piece.param]`` and, with ``last``, refresh it to the current bits.

    ``current`` are flat parameters of one dtype; ``reference`` and ``last`` flat integer snapshots of the compared
    representation. Columns: changed vs the reference (tolerance rule), changed vs the reference (bit-exact),
    changed since ``last`` (tolerance rule), NaN elements.
    """
    if not pieces:
        return
    dtype = snapshot_dtype(current[pieces[0].param].dtype, compare_as)
    tol = tolerance_value(atol, dtype) if atol > 0 else 0.0
    for piece in pieces:
        values = current[piece.param]
        for offset in range(0, piece.length, CHUNK_ELEMENTS):
            n = min(CHUNK_ELEMENTS, piece.length - offset)
            x = values[piece.start + offset : piece.start + offset + n]
            s = piece.snapshot_start + offset
            bits = representation_bits(x, compare_as)
            row = counts[piece.param]
            differs = bits != reference[s : s + n]
            row[CHANGED_EXACT] += differs.sum()
            row[CHANGED] += _beyond_tolerance(bits, reference[s : s + n], differs, dtype, tol).sum()
            row[NAN] += x.isnan().sum()
            if last is not None:
                window = last[s : s + n]
                differs = bits != window
                row[CHANGED_SINCE_LAST] += _beyond_tolerance(bits, window, differs, dtype, tol).sum()
                window.copy_(bits)


def _beyond_tolerance(
    bits: torch.Tensor, snapshot: torch.Tensor, differs: torch.Tensor, dtype: torch.dtype, tol: float
) -> torch.Tensor:
    if tol == 0:
        return differs
    close = (bits_as_float(bits, dtype) - bits_as_float(snapshot, dtype)).abs() <= tol  # NaN: never close
    return differs & ~close


def changed_mask(current: torch.Tensor, snapshot: torch.Tensor, *, compare_as: CompareAs, atol: float) -> torch.Tensor:
    """Boolean "changed" per element of flat ``current`` against flat integer ``snapshot`` (the tolerance rule)."""
    dtype = snapshot_dtype(current.dtype, compare_as)
    bits = representation_bits(current, compare_as)
    differs = bits != snapshot
    return _beyond_tolerance(bits, snapshot, differs, dtype, tolerance_value(atol, dtype) if atol > 0 else 0.0)
