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
from functools import cached_property
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
    """A masks file opened for reading: its metadata and lazy access to each parameter's packed bytes.

    Opening checks the metadata (each parameter's ``name``, ``shape`` and ``changed``); reading a member checks it
    against them (``uint8``, ``ceil(numel / 8)`` bytes, zero padding bits, ``changed`` set bits). A file that
    contradicts itself raises a ``ValueError`` that names the file, the parameter and what was expected.
    """

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
        problems = _metadata_problems(metadata)
        if problems:
            raise ValueError(f"{str(path)!r} is damaged: its metadata is not valid:\n  " + "\n  ".join(problems))
        missing = [p["name"] for p in metadata["parameters"] if p["name"] not in archive.files]
        if missing:
            raise ValueError(f"{str(path)!r} is damaged: its metadata lists parameters it does not hold: {missing[:5]}")
        return cls(path, metadata, archive)

    @property
    def parameters(self) -> list[dict[str, Any]]:
        return self.metadata["parameters"]

    @cached_property
    def _entries(self) -> dict[str, dict[str, Any]]:
        return {entry["name"]: entry for entry in self.parameters}

    def entry(self, name: str) -> dict[str, Any]:
        """The metadata of parameter ``name`` (``name``, ``shape``, ``changed``)."""
        if name not in self._entries:
            raise KeyError(f"{str(self.path)!r} has no parameter {name!r}")
        return self._entries[name]

    def packed(self, name: str) -> np.ndarray:
        """The packed mask of parameter ``name``, checked against its metadata."""
        return self.read(name)[0]

    def read(self, name: str) -> tuple[np.ndarray, int]:
        """The packed mask of parameter ``name`` and its number of set bits, checked against the metadata."""
        entry = self.entry(name)
        try:
            packed = self.archive[name]
        except (OSError, ValueError, zipfile.BadZipFile) as error:  # a damaged entry (bad CRC, truncated data)
            raise ValueError(f"{str(self.path)!r} is damaged: cannot read {name!r}: {error}") from error
        numel = math.prod(entry["shape"])
        expected = f"a {entry['shape']} mask packs into a 1-D uint8 array of {math.ceil(numel / 8)} bytes"
        if packed.dtype != np.uint8 or packed.shape != (math.ceil(numel / 8),):
            raise ValueError(
                f"{str(self.path)!r} is damaged: member {name!r} is a {packed.dtype} array of shape {packed.shape}; "
                f"{expected}"
            )
        padding = (8 - numel % 8) % 8
        if padding and int(packed[-1]) & ((1 << padding) - 1):
            raise ValueError(
                f"{str(self.path)!r} is damaged: member {name!r} sets padding bits after its {numel} elements; "
                "they must be 0"
            )
        changed = popcount(packed)
        if changed != entry["changed"]:
            raise ValueError(
                f"{str(self.path)!r} is damaged: member {name!r} has {changed} changed elements (set bits), its "
                f"metadata says {entry['changed']}"
            )
        return packed, changed

    def unpacked(self, name: str) -> np.ndarray:
        """The boolean mask of parameter ``name`` in its shape."""
        shape = self.entry(name)["shape"]
        return np.unpackbits(self.packed(name), count=math.prod(shape), bitorder="big").astype(bool).reshape(shape)


def _metadata_problems(metadata: dict[str, Any], limit: int = 20) -> list[str]:
    """What the metadata lacks or gets wrong for reading the masks; empty when it is valid."""
    if metadata.get("bit_order") != "big":
        return [f"bit_order is {metadata.get('bit_order')!r}, expected 'big'"]
    parameters = metadata.get("parameters")
    if not isinstance(parameters, list):
        return [f"parameters is {type(parameters).__name__}, expected a list of {{name, shape, changed}} objects"]
    problems, seen = [], set()
    for index, entry in enumerate(parameters):
        where = f"parameters[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} is {type(entry).__name__}, expected an object with name, shape and changed")
            continue
        lacks = [key for key in ("name", "shape", "changed") if key not in entry]
        if lacks:
            problems.append(f"{where} ({entry.get('name', '?')!r}) lacks {lacks}")
            continue
        name, shape, changed = entry["name"], entry["shape"], entry["changed"]
        if not isinstance(name, str) or name in seen or name == METADATA:
            problems.append(f"{where}: name {name!r} is not a string unique to one parameter")
        else:
            seen.add(name)
        if not isinstance(shape, list) or not all(_is_count(size) for size in shape):
            problems.append(f"{where} ({name!r}): shape {shape!r} is not a list of integers >= 0")
        elif not _is_count(changed) or changed > math.prod(shape):
            problems.append(f"{where} ({name!r}): changed {changed!r} is not an integer in [0, {math.prod(shape)}]")
    return problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
