"""Snapshots of parameters' bit patterns: the reference and the since-last copy.

A snapshot keeps one flat integer buffer per parameter dtype, with each parameter's local elements at a fixed offset
(padded to 16 elements), in the compared representation (see ``counting.py``). It therefore costs the parameters' own
bytes (plus at most 15 elements per parameter), and half of them for float32 parameters compared as bfloat16. It
lives on the parameters' device, or in (pinned) CPU memory.

Each rank snapshots only its local part. A snapshot file (``torch.save`` of plain types and tensors) holds one rank's
buffers plus the names, dtypes, numels and offsets that identify that rank's layout; loading it into a different
layout raises a ``ValueError`` that lists the differences.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_power.files import atomic_write
from lightning_power.sparsity.counting import CHUNK_ELEMENTS, CompareAs, bits_dtype, representation_bits, snapshot_dtype

FILE_FORMAT = "lightning-power/update-sparsity-snapshot"
FILE_VERSION = 1
ALIGN_ELEMENTS = 16  # each parameter starts at a multiple of 16 elements: 16-byte vector loads in the fused kernel


@dataclass(frozen=True)
class Group:
    """Parameters of one dtype, laid out back to back in one flat snapshot buffer."""

    dtype: torch.dtype  # the parameters' dtype
    snapshot_dtype: torch.dtype  # the compared representation
    params: tuple[int, ...]  # indices into the parameter list
    offsets: tuple[int, ...]  # where each of them starts in the flat buffer
    numel: int


@dataclass(frozen=True)
class Layout:
    """Which buffer and offset hold each local parameter; fixed for a run."""

    names: tuple[str, ...]
    numels: tuple[int, ...]
    starts: tuple[int, ...]  # offset of each local part in its flattened whole parameter
    groups: tuple[Group, ...]
    compare_as: CompareAs

    @classmethod
    def build(
        cls, names: Sequence[str], tensors: Sequence[torch.Tensor], starts: Sequence[int], compare_as: CompareAs
    ) -> Layout:
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index, tensor in enumerate(tensors):
            by_dtype.setdefault(tensor.dtype, []).append(index)
        groups = []
        for dtype, params in by_dtype.items():
            offsets, total = [], 0
            for index in params:
                offsets.append(total)
                total += -(-tensors[index].numel() // ALIGN_ELEMENTS) * ALIGN_ELEMENTS
            groups.append(Group(dtype, snapshot_dtype(dtype, compare_as), tuple(params), tuple(offsets), total))
        return cls(tuple(names), tuple(t.numel() for t in tensors), tuple(starts), tuple(groups), compare_as)

    def describe(self) -> dict[str, Any]:
        """Plain-type identity of this layout, stored in snapshot files and compared on load."""
        dtypes = [""] * len(self.names)
        for group in self.groups:
            for index in group.params:
                dtypes[index] = str(group.dtype)
        return {
            "names": list(self.names),
            "numels": list(self.numels),
            "starts": list(self.starts),
            "dtypes": dtypes,
            "compare_as": self.compare_as,
        }


class Snapshot:
    """Bit patterns of every local parameter at one moment, in flat per-dtype buffers."""

    def __init__(self, layout: Layout, device: torch.device) -> None:
        self.layout = layout
        pin = device.type == "cpu" and torch.cuda.is_available()
        self.buffers = [
            torch.zeros(g.numel, dtype=bits_dtype(g.snapshot_dtype), device=device, pin_memory=pin)
            for g in layout.groups
        ]

    @property
    def device(self) -> torch.device:
        return self.buffers[0].device if self.buffers else torch.device("cpu")

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def view(self, index: int) -> torch.Tensor:
        """Flat integer bits of local parameter ``index``."""
        for group, buffer in zip(self.layout.groups, self.buffers):
            if index in group.params:
                offset = group.offsets[group.params.index(index)]
                return buffer[offset : offset + self.layout.numels[index]]
        raise IndexError(index)

    def capture(self, tensors: Iterable[torch.Tensor]) -> None:
        """Store the current bits of ``tensors`` (flat local parameters, in layout order), a chunk at a time.

        ``tensors`` may be a generator, so that a caller converting them holds one converted parameter at a time.
        """
        where = {
            index: (buffer, offset)
            for group, buffer in zip(self.layout.groups, self.buffers)
            for index, offset in zip(group.params, group.offsets)
        }
        devices = {self.device}
        for index, values in enumerate(tensors):
            buffer, offset = where[index]
            for start in range(0, values.numel(), CHUNK_ELEMENTS):
                chunk = values[start : start + CHUNK_ELEMENTS]
                target = buffer[offset + start : offset + start + chunk.numel()]
                target.copy_(representation_bits(chunk, self.layout.compare_as), non_blocking=True)
            devices.add(values.device)
        _synchronize(*devices)

    def save(self, path: str | os.PathLike, identity: dict[str, Any]) -> None:
        """Write this snapshot atomically, with ``identity`` (run id, rank, step ...) and the layout."""
        _synchronize(self.device)
        payload = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            **identity,
            "layout": self.layout.describe(),
            "buffers": [b.cpu() for b in self.buffers],
        }
        atomic_write(path, lambda f: torch.save(payload, f))

    def load(self, path: str | os.PathLike, identity: dict[str, Any]) -> None:
        """Fill this snapshot from a file written by :meth:`save`; raise ``ValueError`` if it is not the same run."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"update-sparsity snapshot {os.fspath(path)!r} is missing; it is needed to resume")
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if payload.get("format") != FILE_FORMAT or payload.get("version") != FILE_VERSION:
            raise ValueError(f"{os.fspath(path)!r} is not an update-sparsity snapshot (format {FILE_VERSION})")
        problems = [
            f"{key}: file has {payload.get(key)!r}, expected {value!r}"
            for key, value in identity.items()
            if payload.get(key) != value
        ]
        problems += layout_differences(payload["layout"], self.layout.describe())
        if problems:
            raise ValueError(f"snapshot {os.fspath(path)!r} does not match this run:\n  " + "\n  ".join(problems))
        for mine, theirs in zip(self.buffers, payload["buffers"]):
            mine.copy_(theirs)


def layout_differences(found: dict[str, Any], expected: dict[str, Any], limit: int = 20) -> list[str]:
    """Human-readable differences between two ``Layout.describe()`` dicts, listing parameters by name."""
    if found["compare_as"] != expected["compare_as"]:
        return [f"compare_as: file has {found['compare_as']!r}, expected {expected['compare_as']!r}"]
    rows_found = {n: (d, k, s) for n, d, k, s in zip(found["names"], found["dtypes"], found["numels"], found["starts"])}
    rows_expected = {
        n: (d, k, s)
        for n, d, k, s in zip(expected["names"], expected["dtypes"], expected["numels"], expected["starts"])
    }
    problems = [f"missing parameter {n!r}" for n in rows_expected if n not in rows_found]
    problems += [f"unexpected parameter {n!r}" for n in rows_found if n not in rows_expected]
    problems += [
        f"parameter {n!r}: file has (dtype, local numel, offset) {rows_found[n]}, expected {row}"
        for n, row in rows_expected.items()
        if n in rows_found and rows_found[n] != row
    ]
    if not problems and found["names"] != expected["names"]:
        problems.append("parameters are in a different order")
    return problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])


def _synchronize(*devices: torch.device) -> None:
    if any(d.type == "cuda" for d in devices):
        torch.cuda.synchronize()
