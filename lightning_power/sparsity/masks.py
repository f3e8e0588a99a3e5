"""Bit-packed "changed vs reference" masks: the file format, and writing it from a (sharded) model.

File format (version 1): a NumPy ``.npz`` archive (an uncompressed ZIP of ``.npy`` arrays) that ``numpy.load`` reads
without this package and without pickle:

- one member per parameter, keyed by its logical name (``blocks.0.attn.qkv.weight``): a 1-D ``uint8`` array of
  ``ceil(numel / 8)`` bytes, the parameter's flattened (C-order) mask packed by ``numpy.packbits`` with
  ``bitorder="big"`` (element ``i`` is bit ``7 - i % 8`` of byte ``i // 8``; 1 = changed); the padding bits are 0.
  Unpack with ``numpy.unpackbits(a, count=numel).reshape(shape)``;
- member ``__metadata__``: a 1-D ``uint8`` array holding UTF-8 JSON::

      {"format": "lightning-power/update-masks", "version": 1, "bit_order": "big",
       "compare_as": null | "bfloat16", "atol": 0.0, "reference": "fit_start" | "<checkpoint path>",
       "reference_step": 0, "step": 1000,
       "parameters": [{"name": "...", "shape": [m, n], "changed": 123}, ...]}

Under sharding every rank packs its local range at its global bit offset into a zeroed buffer of the whole
parameter's bytes; the ranges are disjoint, so one sum-reduce per parameter onto the first rank is the bitwise OR, and
that rank writes whole-parameter masks. Memory: one parameter's packed bytes at a time.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from lightning_power.distributed import reduce_sum_to_first_rank
from lightning_power.files import atomic_write
from lightning_power.sparsity.checker import UpdateChecker

FORMAT = "lightning-power/update-masks"
VERSION = 1
METADATA = "__metadata__"
PACK_CHUNK = 1 << 24  # elements packed per step (a multiple of 8)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a flat boolean tensor whose length is a multiple of 8 into bytes, like ``numpy.packbits`` (big)."""
    weights = _BIT_WEIGHTS.to(bits.device)
    return (bits.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)


def popcount(packed: np.ndarray, other: np.ndarray | None = None) -> int:
    """Number of set bits in a ``uint8`` array (in ``packed & other`` when ``other`` is given), chunk by chunk."""
    total = 0
    for i in range(0, packed.size, PACK_CHUNK):
        chunk = packed[i : i + PACK_CHUNK]
        if other is not None:
            chunk = np.bitwise_and(chunk, other[i : i + PACK_CHUNK])
        total += int(_POPCOUNT[chunk].sum(dtype=np.int64))
    return total


def write_masks(path: str | os.PathLike, checker: UpdateChecker, metadata: dict[str, Any], writer: bool) -> Path | None:
    """Write the masks of ``checker``'s parameters to ``path`` (on the rank where ``writer``), atomically.

    Collective over the sharding group: every rank calls it. ``metadata`` adds to the file's metadata (compare_as,
    atol, reference, steps). If the writer cannot write, it still takes part in every collective, leaves no file
    behind, and raises ``OSError`` at the end, so the other ranks never hang.
    """
    if not writer and checker.group is None:  # nothing sharded: the writer has every mask already
        return None
    masks = _whole_masks(checker)
    if not writer:
        for _ in masks:
            pass
        return None
    try:
        return atomic_write(path, lambda f: _write_archive(f, masks, metadata))
    except OSError:
        for _ in masks:  # finish the collectives the other ranks are in
            pass
        raise


def _whole_masks(checker: UpdateChecker) -> Iterator[tuple[str, torch.Size, torch.Tensor]]:
    """Per parameter: name, shape and the whole packed mask (complete on the group's first rank only)."""
    for index, part in enumerate(checker.parts):
        numel = math.prod(part.shape)
        packed = torch.zeros(math.ceil(numel / 8), dtype=torch.uint8, device=checker.device)
        lead, local = part.start % 8, checker.layout.numels[index]
        first_byte = part.start // 8
        for aligned in range(0, lead + local if local else 0, PACK_CHUNK):  # positions counted from first_byte * 8
            end = min(aligned + PACK_CHUNK, lead + local)
            bits = torch.zeros(math.ceil((end - aligned) / 8) * 8, dtype=torch.bool, device=checker.device)
            lo, hi = max(aligned - lead, 0), end - lead
            bits[lo + lead - aligned : hi + lead - aligned] = checker.changed_mask(index, lo, hi).to(checker.device)
            start = first_byte + aligned // 8
            packed[start : start + bits.numel() // 8] = pack_bits(bits)
        yield part.name, part.shape, reduce_sum_to_first_rank(packed, checker.group)


def _write_archive(file: BinaryIO, masks: Iterator[tuple[str, torch.Size, torch.Tensor]], metadata: dict) -> None:
    parameters = []
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, shape, packed in masks:
            array = packed.cpu().numpy()
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
            parameters.append({"name": name, "shape": list(shape), "changed": popcount(array)})
        header = {"format": FORMAT, "version": VERSION, "bit_order": "big", **metadata, "parameters": parameters}
        with archive.open(f"{METADATA}.npy", "w") as member:
            np.lib.format.write_array(member, np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))


@dataclass(frozen=True)
class MaskFile:
    """A masks file opened for reading: its metadata and lazy access to each parameter's packed bytes."""

    path: Path
    metadata: dict[str, Any]
    archive: Any  # numpy NpzFile

    @classmethod
    def open(cls, path: str | os.PathLike) -> MaskFile:
        path = Path(path)
        if path.is_file() and not zipfile.is_zipfile(path):
            raise ValueError(f"{str(path)!r} is not an update-masks file: not an .npz (zip) archive")
        try:
            archive = np.load(path, allow_pickle=False)
            metadata = json.loads(bytes(archive[METADATA]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            raise ValueError(f"{str(path)!r} is not an update-masks file: {error}") from error
        if not isinstance(metadata, dict):
            raise ValueError(f"{str(path)!r} is not an update-masks file: its metadata is not a JSON object")
        if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
            found = f"format {metadata.get('format')!r} version {metadata.get('version')!r}"
            raise ValueError(f"{str(path)!r} has {found}; expected {FORMAT!r} version {VERSION}")
        missing = [p["name"] for p in metadata.get("parameters", []) if p["name"] not in archive.files]
        if missing:
            raise ValueError(f"{str(path)!r} is damaged: its metadata lists parameters it does not hold: {missing[:5]}")
        return cls(path, metadata, archive)

    @property
    def parameters(self) -> list[dict[str, Any]]:
        return self.metadata["parameters"]

    def packed(self, name: str) -> np.ndarray:
        try:
            return self.archive[name]
        except (OSError, ValueError, zipfile.BadZipFile) as error:  # a damaged entry (bad CRC, truncated data)
            raise ValueError(f"{str(self.path)!r} is damaged: cannot read {name!r}: {error}") from error

    def unpacked(self, name: str) -> np.ndarray:
        """The boolean mask of parameter ``name`` in its shape."""
        entry = next(p for p in self.parameters if p["name"] == name)
        numel = math.prod(entry["shape"])
        return np.unpackbits(self.packed(name), count=numel, bitorder="big").astype(bool).reshape(entry["shape"])
