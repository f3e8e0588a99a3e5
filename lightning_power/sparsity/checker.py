"""One update-sparsity check of a whole (possibly sharded) model: snapshots, counting, and the values it needs.

:class:`UpdateChecker` owns the reference and since-last snapshots of this rank's local parameter parts and counts, per
parameter, the elements changed since each, in one pass per dtype (the fused kernel on CUDA, the chunked torch path
elsewhere), followed by one ``all_reduce`` over the sharding group. It also serves the rarer whole-parameter needs:
change masks, update matrices for the rank, and a reference taken from a checkpoint.

With snapshots in (pinned) CPU memory and parameters on a GPU, a check streams the snapshots through two device chunk
buffers: chunk ``i + 1`` is copied in on one stream while chunk ``i`` is counted, and the refreshed since-last chunk
goes back on another.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_power.distributed import LocalPart, ShardLayout, all_reduce_sum, assemble_flat, logical_param_name
from lightning_power.sparsity import counting, fused
from lightning_power.sparsity.counting import CompareAs, Piece
from lightning_power.sparsity.snapshot import Layout, Snapshot

CHUNK_BYTES = 32 << 20  # streamed snapshots: bytes per snapshot per chunk buffer


@dataclass(frozen=True)
class _Segment:
    """The pieces of one dtype group that lie in a window ``[start, start + length)`` of its snapshot buffers."""

    group: int
    start: int
    length: int
    pieces: tuple[Piece, ...]


class UpdateChecker:
    """Counts changed elements of this rank's parameter parts against a reference and the previous check.

    Args:
        layout: this rank's parameter parts and sharding group (``lightning_power.distributed.shard_layout``).
        compare_as: ``None`` (each parameter's dtype) or ``"bfloat16"``.
        atol: 0 for bit-exact; else also equal when ``|delta| <= atol``.
        since_last: keep a second snapshot, refreshed at every check.
        snapshot_device: where the snapshots live; a CPU device with CUDA parameters means streamed checks.
        chunk_bytes: streamed checks: bytes of each snapshot per chunk buffer.
        fused_kernel: use the Triton kernel; default: on CUDA parameters when Triton is available.
        streamed: stage the snapshots through chunk buffers; default: snapshots on CPU, parameters on CUDA. (On CPU
            the same code runs without streams, which tests the chunking.)
    """

    def __init__(
        self,
        layout: ShardLayout,
        *,
        compare_as: CompareAs,
        atol: float,
        since_last: bool,
        snapshot_device: torch.device,
        chunk_bytes: int = CHUNK_BYTES,
        fused_kernel: bool | None = None,
        streamed: bool | None = None,
    ) -> None:
        self.parts: list[LocalPart] = layout.parts
        self.group = layout.group
        self.whole_numels = [math.prod(part.shape) for part in self.parts]  # elements of each whole parameter
        self.compare_as, self.atol = compare_as, atol
        tensors = self.local_tensors()
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise ValueError(f"parameters are on several devices {sorted(map(str, devices))}; expected one")
        self.device = devices.pop() if devices else torch.device("cpu")
        self.layout = Layout.build([p.name for p in self.parts], tensors, [p.start for p in self.parts], compare_as)
        self.reference = Snapshot(self.layout, snapshot_device)
        self.last = Snapshot(self.layout, snapshot_device) if since_last else None
        self.streamed = snapshot_device.type != self.device.type if streamed is None else streamed
        if fused_kernel is None:
            fused_kernel = self.device.type == "cuda"
        self._fused = [fused_kernel and fused.supported(g.dtype) for g in self.layout.groups]
        self._segments = list(self._plan_segments(chunk_bytes))
        self._pointers: tuple[int, ...] = ()
        self._plans: list[fused.Plan | None] = []  # per segment, for the data pointers in self._pointers
        if self.streamed:
            self._staging = [torch.empty(2, chunk_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        if self.streamed and self.device.type == "cuda":
            self._copy_in, self._copy_out = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)

    def local_tensors(self) -> list[torch.Tensor]:
        """This rank's part of every parameter, flat, sharing the parameters' memory."""
        return [part.local() for part in self.parts]

    def count(self) -> torch.Tensor:
        """Global per-parameter counts ``(n_params, 4)`` (columns in ``counting.py``); refreshes the since-last
        snapshot.

        The result stays on the compute device; nothing waits for it here. All ranks of the group must call this.
        """
        tensors = self.local_tensors()
        counts = torch.zeros(len(self.parts), counting.N_COLUMNS, dtype=torch.int64, device=self.device)
        if any(self._fused):
            self._refresh_plans(tensors)
        if self.streamed:
            self._count_streamed(tensors, counts)
        else:
            for i, segment in enumerate(self._segments):
                last = None if self.last is None else self.last.buffers[segment.group]
                self._count_segment(tensors, i, self.reference.buffers[segment.group], last, counts)
        return all_reduce_sum(counts, self.group)

    def _count_segment(
        self,
        tensors: list[torch.Tensor],
        index: int,
        reference: torch.Tensor,
        last: torch.Tensor | None,
        counts: torch.Tensor,
    ) -> None:
        plan = self._plans[index] if self._plans else None
        if plan is not None:
            fused.count(plan, reference, last, counts, compare_as=self.compare_as, atol=self.atol)
        else:
            counting.count_pieces(
                tensors,
                self._segments[index].pieces,
                reference,
                last,
                counts,
                compare_as=self.compare_as,
                atol=self.atol,
            )

    def _count_streamed(self, tensors: list[torch.Tensor], counts: torch.Tensor) -> None:
        """Count segment ``i`` in chunk buffer ``i % 2`` while segment ``i + 1`` is copied into the other."""
        cuda = self.device.type == "cuda"
        compute = torch.cuda.current_stream(self.device) if cuda else None
        if compute is not None:
            self._copy_in.wait_stream(compute)
        free: list[torch.cuda.Event | None] = [None, None]  # when each buffer may be overwritten
        for i, segment in enumerate(self._segments):
            bits = counting.bits_dtype(self.layout.groups[segment.group].snapshot_dtype)
            window = slice(segment.start, segment.start + segment.length)
            staged = self._staging[i % 2][:, : segment.length * bits.itemsize].view(bits)
            ref, last = staged[0], (None if self.last is None else staged[1])
            with _on_stream(self._copy_in if cuda else None):
                if (event := free[i % 2]) is not None:
                    self._copy_in.wait_event(event)
                ref.copy_(self.reference.buffers[segment.group][window], non_blocking=True)
                if last is not None and self.last is not None:  # both or neither
                    last.copy_(self.last.buffers[segment.group][window], non_blocking=True)
            if compute is not None:
                compute.wait_stream(self._copy_in)
            self._count_segment(tensors, i, ref, last, counts)
            if last is None or self.last is None:
                free[i % 2] = compute.record_event() if compute is not None else None
                continue
            if compute is not None:
                self._copy_out.wait_stream(compute)
            with _on_stream(self._copy_out if cuda else None):
                self.last.buffers[segment.group][window].copy_(last, non_blocking=True)
                free[i % 2] = self._copy_out.record_event() if cuda else None
        if compute is not None:
            compute.wait_stream(self._copy_out)

    def _plan_segments(self, chunk_bytes: int) -> Iterator[_Segment]:
        for index, group in enumerate(self.layout.groups):
            window = max(1, group.numel)  # a rank may hold no element of a dtype (an empty FSDP2 shard)
            if self.streamed:
                window = max(1, chunk_bytes // group.snapshot_dtype.itemsize)
            for start in range(0, group.numel, window):
                end = min(start + window, group.numel)
                pieces = tuple(
                    Piece(
                        param,
                        max(start, offset) - offset,
                        max(start, offset) - start,
                        min(end, offset + numel) - max(start, offset),
                    )
                    for param, offset in zip(group.params, group.offsets)
                    if (numel := self.layout.numels[param]) and offset < end and offset + numel > start
                )
                yield _Segment(index, start, end - start, pieces)

    def _refresh_plans(self, tensors: list[torch.Tensor]) -> None:
        """(Re)build the fused plans when a parameter's storage moved (a strategy may re-create views)."""
        pointers = tuple(t.data_ptr() for t in tensors)
        if pointers != self._pointers:
            self._pointers = pointers
            self._plans = [
                fused.Plan.build(tensors, s.pieces, self.device) if self._fused[s.group] else None
                for s in self._segments
            ]

    def changed_mask(self, index: int, start: int, stop: int) -> torch.Tensor:
        """Booleans "changed vs the reference" of local elements ``[start, stop)`` of parameter ``index``."""
        current = self.parts[index].local()[start:stop]
        reference = self.reference.view(index)[start:stop].to(current.device, non_blocking=True)
        return counting.changed_mask(current, reference, compare_as=self.compare_as, atol=self.atol)

    def update_matrix(self, index: int) -> torch.Tensor | None:
        """The whole update ``W - W_ref`` of parameter ``index`` as a float32 matrix (``None`` below 2-D).

        Collective over the sharding group (all ranks, same order); one parameter's memory at a time.
        """
        part = self.parts[index]
        if len(part.shape) < 2:
            return None
        dtype = self.layout.groups[self._group_of(index)].snapshot_dtype
        current = counting.representation_bits(part.local(), self.compare_as)
        reference = self.reference.view(index).to(current.device)
        delta = counting.bits_as_float(current, dtype) - counting.bits_as_float(reference, dtype)
        full = assemble_flat(delta.float(), part.start, self.whole_numels[index], self.group)
        return full.view(part.shape[0], -1)

    def load_reference(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Take the reference from whole tensors (a checkpoint's ``state_dict``), slicing out this rank's parts.

        Raises ``ValueError`` listing every missing parameter and every shape mismatch.
        """
        tensors = {logical_param_name(name): tensor for name, tensor in state_dict.items()}
        problems = [f"missing parameter {p.name!r}" for p in self.parts if p.name not in tensors]
        problems += [
            f"parameter {p.name!r}: checkpoint has shape {tuple(tensors[p.name].shape)}, model has {tuple(p.shape)}"
            for p in self.parts
            if p.name in tensors and tensors[p.name].shape != p.shape
        ]
        if problems:
            raise ValueError("the reference checkpoint does not match the model:\n  " + "\n  ".join(problems))

        def local_parts() -> Iterator[torch.Tensor]:  # one converted parameter at a time: no second copy of the model
            for part in self.parts:
                mine = part.local()
                whole = tensors[part.name].reshape(-1)[part.start : part.start + mine.numel()]
                yield whole.to(device=mine.device, dtype=mine.dtype)

        self.reference.capture(local_parts())

    def _group_of(self, index: int) -> int:
        return next(i for i, g in enumerate(self.layout.groups) if index in g.params)


def _on_stream(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.cuda.stream(stream)``, or no context without a stream (on CPU)."""
    if stream is None:
        return contextlib.nullcontext()
    return torch.cuda.stream(stream)
