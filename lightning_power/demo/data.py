"""A byte corpus: fixed-length windows of raw bytes from real text, with an exactly resumable train order.

By default the corpus is the Python standard library's own ``.py`` sources (``sysconfig.get_paths()["stdlib"]``,
without ``site-packages`` and ``dist-packages``): every machine with Python has it, it needs no download, and it is
real text. Any text file or folder can replace it.

Example::

    >>> from lightning_power.demo import ByteCorpus
    >>> corpus = ByteCorpus(context_length=64, batch_size=8, max_bytes=200_000)
    >>> corpus.setup("fit")
    >>> inputs, targets = next(iter(corpus.train_dataloader()))
    >>> inputs.shape, targets.shape
    (torch.Size([8, 64]), torch.Size([8, 64]))
"""

from __future__ import annotations

import os
import random
import sysconfig
import zlib
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

if TYPE_CHECKING:
    from lightning.pytorch.loops.progress import _ProcessedTracker
    from lightning.pytorch.utilities import AttributeDict

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_source_files() -> list[Path]:
    """The standard library's ``.py`` files in sorted order, without installed third-party packages."""
    return [p for p in text_files(Path(sysconfig.get_paths()["stdlib"])) if p.suffix == ".py"]


def text_files(path: Path) -> list[Path]:
    """All regular files under ``path`` (or ``path`` itself), sorted; links to files count, other links, FIFOs and
    sockets do not (reading a FIFO would block). Binary files are dropped later, by :func:`is_binary`."""
    if not path.is_dir():
        return [path] if path.is_file() else []
    found: list[Path] = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = [d for d in subfolders if d not in EXCLUDED_DIRS]  # prune, do not walk site-packages
        found.extend(file for file in (Path(folder, name) for name in names) if file.is_file())
    return sorted(found)


SNIFF_BYTES = 8192  # as git does: a NUL byte in a file's first 8 KiB marks it binary
WHOLE_FILE_BYTES = 64 << 20  # read_split reads smaller files whole, so a NUL anywhere in them marks them binary


def is_binary(file: Path) -> bool:
    """Whether ``file`` holds a NUL byte in its first ``SNIFF_BYTES``: binary data, or text in UTF-16 or UTF-32."""
    with file.open("rb") as stream:
        return b"\x00" in stream.read(SNIFF_BYTES)


def read_split(files: list[Path], budget: int, seed: int) -> bytes:
    """Concatenate text files, visited in a seeded order, until ``budget`` bytes are read.

    The seeded order spreads a small budget over the whole corpus instead of its alphabetically first files. Files
    that contain a NUL byte are taken as binary and skipped. A file is read whole up to ``WHOLE_FILE_BYTES``; of a
    larger one only what the budget needs (or that much), which is then checked for NUL bytes.
    """
    order = list(files)
    random.Random(seed).shuffle(order)
    chunks, total = [], 0
    for file in order:
        if total >= budget:
            break
        with file.open("rb") as stream:
            data = stream.read(max(budget - total, WHOLE_FILE_BYTES))
        if not data or b"\x00" in data:
            continue
        chunks.append(data[: budget - total])
        total += len(chunks[-1])
    return b"\n".join(chunks)


class ByteWindows(Dataset):
    """Non-overlapping windows of ``context_length + 1`` bytes.

    Item ``i`` is ``(bytes[iT : iT+T], bytes[iT+1 : iT+T+1])``.
    """

    def __init__(self, data: bytes, context_length: int) -> None:
        self.data = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
        self.context_length = context_length

    def __len__(self) -> int:
        return max(0, (len(self.data) - 1) // self.context_length)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.context_length
        window = self.data[start : start + self.context_length + 1].long()
        return window[:-1], window[1:]


class ResumableShuffleSampler(DistributedSampler):
    """A seeded shuffle per epoch, split across ranks, that can start mid-epoch at an exact sample.

    Rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...`` of the epoch's permutation, so the union of one step's
    per-rank batches is the same global batch a single process would draw. ``skip`` samples (per rank) are left out
    at the start of the epoch given to :meth:`resume_at`; other epochs are whole.

    ``len()`` is always the whole epoch, also in the resumed one: Lightning reads the loader's length once, as the
    length of every epoch, and counts the resumed epoch's batches from the checkpoint's position, so a shortened
    length would cut that epoch (or every later one) short.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self._resume_epoch, self._skip = -1, 0

    def resume_at(self, epoch: int, skip: int) -> None:
        self._resume_epoch, self._skip = epoch, skip
        # Lightning sets the epoch only after it has created the train iterator, and DataLoader worker processes
        # read the sampler when the iterator is created: without this they would draw epoch 0's order.
        self.set_epoch(epoch)

    def _start(self) -> int:
        return self._skip if self.epoch == self._resume_epoch else 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        permutation = torch.randperm(len(cast(Sized, self.dataset)), generator=generator)[: self.total_size]
        return iter(permutation[self.rank :: self.num_replicas][self._start() :].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ByteCorpus(pl.LightningDataModule):
    """Fixed-length byte windows from real text, split by file into train and validation.

    Args:
        path: a text file or a folder of text files. ``None`` uses the Python standard library's ``.py`` sources.
        context_length: bytes per training sequence (the model's context); tokens per batch is
            ``batch_size * context_length`` per process.
        batch_size: sequences per batch on each process.
        max_bytes: training bytes to read at start-up (a few MB serve; the whole stdlib is ~30 MB).
        max_val_bytes: validation bytes to read.
        val_every: every ``val_every``-th text file (in sorted order) is held out for validation. A single text file
            is split by position instead: its last ``1/val_every`` is held out. Binary files (a NUL byte in their first
            8 KiB) are dropped first.
        seed: seeds the file order and the per-epoch shuffle.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        path: str | None = None,
        context_length: int = 128,
        batch_size: int = 32,
        max_bytes: int = 4_000_000,
        max_val_bytes: int = 262_144,
        val_every: int = 20,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (one input and one target byte), got {context_length}")
        for name, value in {"batch_size": batch_size, "max_bytes": max_bytes, "max_val_bytes": max_val_bytes}.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if val_every < 2:
            raise ValueError(f"val_every must be >= 2, got {val_every}")
        if path is not None and not Path(path).exists():
            raise ValueError(f"path {path!r} does not exist; give a text file, a folder of text files, or None")
        self.save_hyperparameters()
        self.path = None if path is None else Path(path)
        self.context_length, self.batch_size = context_length, batch_size
        self.train_set: ByteWindows | None = None
        self.val_set: ByteWindows | None = None
        self._resume: dict[str, int] = {}
        self._train_crc32 = 0

    @property
    def tokens_per_batch(self) -> int:
        """Tokens (bytes) in one batch on one process."""
        return self.batch_size * self.context_length

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        hp = cast("AttributeDict", self.hparams)  # save_hyperparameters made it one
        where = "the Python standard library" if self.path is None else str(self.path)
        found = stdlib_source_files() if self.path is None else text_files(self.path)
        files = [file for file in found if not is_binary(file)]
        if found and not files:
            raise ValueError(
                f"path: {where} holds no text: its {len(found)} file(s) all hold NUL bytes in their first "
                f"{SNIFF_BYTES} bytes, so they were skipped as binary (text in UTF-16 or UTF-32 looks so too); give "
                "text in UTF-8 or another ASCII-compatible encoding"
            )
        if len(files) == 1:
            data = read_split(files, hp.max_bytes + hp.max_val_bytes, hp.seed)
            cut = len(data) - min(hp.max_val_bytes, len(data) // hp.val_every)
            train, val = data[:cut][: hp.max_bytes], data[cut:]
        else:
            train = read_split([f for i, f in enumerate(files) if i % hp.val_every], hp.max_bytes, hp.seed)
            val = read_split(files[:: hp.val_every], hp.max_val_bytes, hp.seed)
        self.train_set, self.val_set = ByteWindows(train, self.context_length), ByteWindows(val, self.context_length)
        self._train_crc32 = zlib.crc32(train)
        if len(self.train_set) < self.batch_size or len(self.val_set) == 0:
            raise ValueError(
                f"path: {where} holds too little text ({len(train)} train and {len(val)} validation bytes) for "
                f"batch_size={self.batch_size} windows of context_length={self.context_length}; give a text file "
                "or folder with more text"
            )

    def train_dataloader(self) -> DataLoader:
        replicas, rank = self._data_parallel()
        train_set = cast(ByteWindows, self.train_set)  # made by setup(), which Lightning calls first
        sampler = ResumableShuffleSampler(train_set, replicas, rank, cast("AttributeDict", self.hparams).seed)
        if self._resume:
            self._check_same_order()
            epoch, batches = self._resume["epoch"], self._resume["batches"]
            # Checkpoints before "epoch_done" was saved: the epoch was done when its whole length was consumed.
            if self._resume.get("epoch_done", batches >= sampler.num_samples // self.batch_size):
                epoch, batches = epoch + 1, 0  # saved after the epoch's last batch: the next epoch starts afresh
            else:
                self._check_same_global_batch(replicas)
            sampler.resume_at(epoch, batches * self.batch_size)
        return self._loader(train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(cast(ByteWindows, self.val_set), None)  # made by setup(), which Lightning calls first

    def test_dataloader(self) -> DataLoader:
        return self._loader(cast(ByteWindows, self.val_set), None)

    def _loader(self, dataset: Dataset, sampler: DistributedSampler | None) -> DataLoader:
        workers = cast("AttributeDict", self.hparams).num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=sampler is not None,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def state_dict(self) -> dict[str, Any]:
        """Where the train order stands (the epoch, the batches this process has consumed in it, and whether that was
        all the trainer runs of an epoch), and what determines the order, so that a resume can refuse another one."""
        if self.trainer is None:
            return {}
        # Lightning's batch progress counts processed batches; it declares its tracker as the base class, without them
        progress = cast("_ProcessedTracker", self.trainer.fit_loop.epoch_loop.batch_progress.current)
        return {
            "epoch": self.trainer.current_epoch,
            "batches": progress.processed,
            "epoch_done": progress.processed >= self.trainer.num_training_batches,  # limit_train_batches included
            "batch_size": self.batch_size,
            "data_parallel_size": self._data_parallel()[0],
            **{key: value for key, (value, _, _) in self._order_settings().items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict)

    def _data_parallel(self) -> tuple[int, int]:
        """(replicas, rank) of data parallelism: the processes that read distinct batches, and this one's index among
        them. Tensor-parallel peers read the same batch, so under ModelParallelStrategy this is not the world."""
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer else None
        return (kwargs["num_replicas"], kwargs["rank"]) if kwargs else (1, 0)

    def _order_settings(self) -> dict[str, tuple[int, str, str]]:
        """What fixes the samples of the train order: saved key -> (value, its name, the settings that keep it)."""
        if self.train_set is None:
            return {}
        seed = cast("AttributeDict", self.hparams).seed
        text = "data.path, data.max_bytes, data.max_val_bytes, data.val_every and the files"
        return {
            "seed": (seed, "data.seed", "data.seed"),
            "context_length": (self.context_length, "data.context_length", "data.context_length"),
            "train_windows": (len(self.train_set), "number of training windows", f"data.context_length, {text}"),
            "train_crc32": (self._train_crc32, "CRC-32 of the training text", text),
        }

    def _check_same_order(self) -> None:
        """A checkpoint's data position means the same samples only with the same seed, windows and text."""
        for key, (value, name, keep) in self._order_settings().items():
            saved = self._resume.get(key)  # checkpoints from before these keys were saved have none
            if saved is not None and saved != value:
                raise ValueError(
                    f"ByteCorpus cannot resume with another train order: {name} {saved} in the checkpoint, {value} "
                    f"now. The checkpoint's position (epoch {self._resume['epoch']}, {self._resume['batches']} "
                    f"batches in) would map to other samples. Keep {keep} unchanged, or start a new run from the "
                    "checkpoint's weights"
                )

    def _check_same_global_batch(self, replicas: int) -> None:
        """A checkpoint's mid-epoch position maps to the same samples when the global batch is unchanged.

        Each step consumes the next ``batch_size * replicas`` samples of the epoch's order, whatever the split across
        data-parallel processes, so a job may resume on fewer processes with a larger per-process batch (or the
        reverse).
        """
        saved_batch = self._resume.get("batch_size")
        saved_replicas = self._resume.get("data_parallel_size", self._resume.get("world_size"))  # older: world_size
        if saved_batch is None or saved_replicas is None:
            return
        if saved_batch * saved_replicas != self.batch_size * replicas:
            raise ValueError(
                f"ByteCorpus cannot resume mid-epoch with a changed global batch (batch_size x processes): "
                f"{saved_batch} x {saved_replicas} -> {self.batch_size} x {replicas}, counting data-parallel "
                f"processes only. The checkpoint's position (epoch {self._resume['epoch']}, {self._resume['batches']} "
                "batches in) would map to other samples. Keep data.batch_size x trainer.devices x trainer.num_nodes "
                "(divided by a tensor_parallel_size), or start a new run from the checkpoint's weights"
            )
