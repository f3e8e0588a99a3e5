"""The fused sparsity check on CUDA: one Triton launch per parameter dtype for the whole model.

Each program of the kernel takes one tile (up to ``TILE`` elements) of one parameter. It finds the parameter at an
element offset from one base parameter, so hundreds of parameters of any size go in one launch. In one pass over the
tile it reads the current values, the reference and the since-last snapshot, counts the four columns of
``counting.py`` into one int32 partial per program, and writes the current bits back to the since-last snapshot where
they differ. Nothing full-size is allocated; a tile is processed ``BLOCK`` elements at a time in registers. The counts
are identical to the torch path in ``counting.py`` (same bit rules, the same bfloat16 rounding and NaN pattern), which
the tests check, on CPU through ``TRITON_INTERPRET=1``.

Tiles whose offsets and length are multiples of ``ALIGN_ELEMENTS`` (all of them for ordinary parameters and FSDP2
shards; snapshot offsets are padded to it) run in a launch that tells Triton so, which lets it use 16-byte vector
loads. The rest (the last few elements of each parameter, FSDP1 views at odd offsets) run in a second, scalar launch.

Why Triton rather than ``torch.compile``: a compiled function specialises on each tensor's size, so a whole model would
be hundreds of kernels (and recompilations); a table of offsets keeps it to one launch per dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_power.sparsity.counting import N_COLUMNS, CompareAs, Piece, snapshot_dtype, tolerance_value
from lightning_power.sparsity.snapshot import ALIGN_ELEMENTS

try:  # CUDA builds of torch ship Triton; TRITON_INTERPRET=1 (set before import) runs the kernel on CPU
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch path in counting.py serves instead
    triton = None

BLOCK = 2048  # elements per vector step of a program
TILE = 16 * BLOCK  # elements per program: thousands of programs for a 100M model, so the last wave is a small share
NUM_WARPS = 8
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supported(dtype: torch.dtype) -> bool:
    """Whether parameters of ``dtype`` go through the fused kernel (others use the torch path)."""
    return dtype in FUSED_DTYPES and triton is not None


@dataclass(frozen=True)
class Plan:
    """The launches of one group of pieces: tile tables relative to the data of ``base``.

    A table is an int64 ``(4, n)`` tensor of rows ``(param, offset from base, snapshot offset, length)``, in elements.
    """

    base: torch.Tensor
    aligned: torch.Tensor
    unaligned: torch.Tensor
    params: torch.Tensor  # the parameter of every program, aligned ones first

    @classmethod
    def build(
        cls, tensors: Sequence[torch.Tensor], pieces: Sequence[Piece], device: torch.device, tile: int = TILE
    ) -> Plan:
        """Tile ``pieces`` of the flat ``tensors`` (one dtype); valid while the tensors' data pointers stay put."""
        used = [tensors[p.param] for p in pieces] or [torch.empty(0, device=device)]
        aligned_bases = [t for t in used if t.data_ptr() % 16 == 0]  # offsets may be negative; the base is aligned
        base = min(aligned_bases or used, key=lambda t: t.data_ptr())
        itemsize = base.element_size()
        rows: tuple[list, list] = ([], [])
        for piece in pieces:
            distance = tensors[piece.param].data_ptr() - base.data_ptr()
            if distance % itemsize:
                raise ValueError(f"parameter {piece.param} is not aligned to its dtype ({distance} bytes from base)")
            start = distance // itemsize + piece.start
            body = piece.length - piece.length % ALIGN_ELEMENTS
            piece_aligned = start % ALIGN_ELEMENTS == 0 and piece.snapshot_start % ALIGN_ELEMENTS == 0
            for offset in range(0, piece.length, tile):
                length = min(tile, (body if piece_aligned else piece.length) - offset)
                if length > 0:
                    row = (piece.param, start + offset, piece.snapshot_start + offset, length)
                    rows[0 if piece_aligned else 1].append(row)
            if piece_aligned and body < piece.length:  # the last few elements
                rows[1].append((piece.param, start + body, piece.snapshot_start + body, piece.length - body))
        aligned, unaligned = (torch.tensor(r, dtype=torch.int64).reshape(-1, 4).T.contiguous().to(device) for r in rows)
        return cls(base, aligned, unaligned, torch.cat([aligned[0], unaligned[0]]))

    @property
    def programs(self) -> int:
        return self.params.numel()


def count(
    plan: Plan,
    reference: torch.Tensor,
    last: torch.Tensor | None,
    counts: torch.Tensor,
    *,
    compare_as: CompareAs,
    atol: float,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
) -> None:
    """Add the counts of ``plan``'s tiles to ``counts`` (and refresh ``last``): two launches at most.

    ``reference`` and ``last`` are flat integer snapshots indexed by the tables' snapshot offsets. Same columns and
    rules as ``counting.count_pieces``. ``block`` and ``num_warps`` are launch settings (the benchmark compares a few).
    """
    if plan.programs == 0:
        return
    dtype = plan.base.dtype
    target = snapshot_dtype(dtype, compare_as)
    partial = torch.empty(plan.programs, N_COLUMNS, dtype=torch.int32, device=counts.device)
    tl_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
    bits = {2: tl.int16, 4: tl.int32}
    first = 0
    for table, is_aligned in ((plan.aligned, True), (plan.unaligned, False)):
        n_programs = table.shape[1]
        if n_programs == 0:
            continue
        _count_kernel[(n_programs,)](
            plan.base,
            table,
            n_programs,
            reference,
            reference if last is None else last,
            partial[first:],
            tolerance_value(atol, target) if atol > 0 else 0.0,
            CUR=tl_dtype[dtype],
            SNAP=tl_dtype[target],
            SNAP_BITS=bits[target.itemsize],
            CAST=target != dtype,
            HAS_LAST=last is not None,
            HAS_TOL=atol > 0,
            ALIGNED=is_aligned,
            ALIGN=ALIGN_ELEMENTS,
            BLOCK=block,
            num_warps=num_warps,
        )
        first += n_programs
    counts.index_add_(0, plan.params, partial.to(torch.int64))


if triton is not None:

    @triton.jit
    def _representation_bits(x, CUR: tl.constexpr, SNAP_BITS: tl.constexpr, CAST: tl.constexpr):
        if CAST:  # round to nearest even bfloat16 on the float32 bits; every NaN becomes 0x7FC0 (counting.py)
            wide = x.to(tl.float32)
            u = wide.to(tl.uint32, bitcast=True)
            rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            bits = tl.where(wide != wide, 0x7FC0, rounded).to(tl.int16)
        else:
            bits = x.to(SNAP_BITS, bitcast=True)
        return bits

    @triton.jit
    def _beyond_tolerance(bits, snap, differs, tol, SNAP: tl.constexpr, HAS_TOL: tl.constexpr):
        if HAS_TOL:
            delta = bits.to(SNAP, bitcast=True).to(tl.float32) - snap.to(SNAP, bitcast=True).to(tl.float32)
            beyond = differs & ~(tl.abs(delta) <= tol)  # a NaN difference is never within the tolerance
        else:
            beyond = differs
        return beyond

    @triton.jit
    def _count_kernel(
        base,
        table,
        n_programs,
        reference,
        last,
        partial,
        tol,
        CUR: tl.constexpr,
        SNAP: tl.constexpr,
        SNAP_BITS: tl.constexpr,
        CAST: tl.constexpr,
        HAS_LAST: tl.constexpr,
        HAS_TOL: tl.constexpr,
        ALIGNED: tl.constexpr,
        ALIGN: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        start = tl.load(table + n_programs + pid)
        snapshot_start = tl.load(table + 2 * n_programs + pid)
        length = tl.load(table + 3 * n_programs + pid).to(tl.int32)  # <= TILE
        if ALIGNED:  # lets Triton use vector loads: offsets and length are multiples of ALIGN elements
            start = tl.multiple_of(start, ALIGN)
            snapshot_start = tl.multiple_of(snapshot_start, ALIGN)
            length = tl.multiple_of(length, ALIGN)
        current = base + start
        reference += snapshot_start
        last += snapshot_start
        changed = tl.zeros([BLOCK], dtype=tl.int32)
        changed_exact = tl.zeros([BLOCK], dtype=tl.int32)
        changed_since = tl.zeros([BLOCK], dtype=tl.int32)
        nans = tl.zeros([BLOCK], dtype=tl.int32)
        for offset in range(0, length, BLOCK):
            index = offset + tl.arange(0, BLOCK)
            inside = index < length
            x = tl.load(current + index, mask=inside, other=0.0)
            bits = _representation_bits(x, CUR, SNAP_BITS, CAST)
            ref = tl.load(reference + index, mask=inside, other=0)
            differs = (bits != ref) & inside
            changed_exact += differs.to(tl.int32)
            changed += _beyond_tolerance(bits, ref, differs, tol, SNAP, HAS_TOL).to(tl.int32)
            wide = x.to(tl.float32)  # NaN test in float32: bfloat16 has no native compare everywhere
            nans += ((wide != wide) & inside).to(tl.int32)
            if HAS_LAST:
                previous = tl.load(last + index, mask=inside, other=0)
                moved = (bits != previous) & inside
                changed_since += _beyond_tolerance(bits, previous, moved, tol, SNAP, HAS_TOL).to(tl.int32)
                tl.store(last + index, bits, mask=moved)  # refresh in the same pass, only where the bits moved
        out = partial + pid * 4
        tl.store(out, tl.sum(changed, axis=0))
        tl.store(out + 1, tl.sum(changed_exact, axis=0))
        tl.store(out + 2, tl.sum(changed_since, axis=0))
        tl.store(out + 3, tl.sum(nans, axis=0))
