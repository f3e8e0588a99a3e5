"""Drop-in subclasses of Lightning's sharded strategies whose sharded checkpoints are written atomically.

Lightning writes a sharded (distributed) checkpoint straight into its final folder, so a job killed during the save
of ``last.ckpt`` leaves new shards beside old metadata: a checkpoint that may load and be wrong. These subclasses
write into ``<path>.partial`` and swap it into place only once every rank has finished.

A single-file checkpoint goes through Lightning's fsspec transaction: a temporary file in the system's temp folder,
then ``shutil.move``. When that folder lies on another filesystem than the checkpoints (a local ``/tmp``, checkpoints
on NFS or Lustre) the move is a copy, and a job killed during it leaves a truncated ``last.ckpt`` where the old one
was. :class:`AtomicCheckpointIO` writes the temporary file beside the checkpoint and renames it; the
``lightning-power`` CLI installs it in place of Lightning's default ``TorchCheckpointIO``.

``FSDPStrategy`` here also runs on CPU (gloo), which Lightning 2.6 refuses (it passes ``device_id=None`` to FSDP).

YAML::

    trainer:
      strategy:
        class_path: lightning_power.strategies.ModelParallelStrategy
        init_args: {data_parallel_size: auto, tensor_parallel_size: 1}
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch import strategies
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_power.files import atomic_write

# The first torch releases whose CPU (gloo) sharding is right; the strategies refuse older ones on CPU.
CPU_FSDP2_TORCH = (2, 9)  # FSDP2 over gloo averages the processes' gradients (2.7 and 2.8 sum them)
CPU_FSDP1_FULL_CHECKPOINT_TORCH = (2, 14)  # FSDP1 on CPU saves a full state dict without a segfault


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose local checkpoint files are written atomically, on any filesystem.

    The checkpoint is written to a temporary file in its own folder, synced, then renamed over the old one, so a job
    killed at any moment leaves the complete old checkpoint or the complete new one. Remote paths (``s3://`` ...) and
    ``storage_options`` go to ``TorchCheckpointIO`` unchanged. Outside the CLI:
    ``pl.Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        filesystem, local_path = url_to_fs(str(path))  # "file:///x" -> "/x"
        if storage_options is not None or not isinstance(filesystem, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(local_path, lambda file: torch.save(checkpoint, file))


def use_atomic_checkpoint_io(strategy: strategies.Strategy) -> None:
    """Give ``strategy`` an :class:`AtomicCheckpointIO` where it has Lightning's default ``TorchCheckpointIO``: as its
    checkpoint IO, or inside a wrapper such as ``AsyncCheckpointIO``. A user's own checkpoint IO is left alone."""
    io = strategy._checkpoint_io  # the property would put a default TorchCheckpointIO in place in a wrapper
    if io is None:
        io = strategy.checkpoint_io  # the strategy's own default: TorchCheckpointIO, or XLA's for XLA strategies
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    elif isinstance(io, _WrappingCheckpointIO) and (
        io.checkpoint_io is None or type(io.checkpoint_io) is TorchCheckpointIO
    ):
        io._checkpoint_io = AtomicCheckpointIO()  # its setter keeps a base already set, even Lightning's default
        io._base_checkpoint_io_configured = True


if TYPE_CHECKING:  # the strategies that the mixin goes with, for the methods it calls; a plain mixin at runtime
    _StrategyBase = strategies.ParallelStrategy
else:
    _StrategyBase = object


class _AtomicShardedSave(_StrategyBase):
    """Mixin: stage a sharded checkpoint in ``<path>.partial``, then swap it in on rank 0 after a barrier."""

    def _saves_sharded(self) -> bool:
        raise NotImplementedError

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._saves_sharded():
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        staging = path.with_name(path.name + ".partial")
        if self.global_rank == 0:
            _remove(staging)
        self.barrier("lightning_power.checkpoint.staging_clean")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("lightning_power.checkpoint.staged")
        self._swap_into_place(staging, path)

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Load ``checkpoint_path``, or, when it is missing, the previous checkpoint that a kill between a swap's two
        renames left at :func:`aside_path` (``ckpt_path="last"`` finds that one itself)."""
        path = Path(checkpoint_path)
        if not path.exists():
            for aside in (aside_path(path), path.with_name(path.name + ".old")):  # the second: earlier builds' name
                if aside.exists():
                    rank_zero_warn(
                        f"{str(path)!r} is missing: a save was stopped while swapping in its new version. Resuming "
                        f"from the previous checkpoint {str(aside)!r}"
                    )
                    checkpoint_path = aside
                    break
        return super().load_checkpoint(checkpoint_path, *args, **kwargs)

    def _swap_into_place(self, staging: Path, path: Path) -> None:
        """Every rank has written its shards to ``staging``; make it the checkpoint at ``path``."""
        if self.global_rank == 0:
            replace_path(staging, path)
        self.barrier("lightning_power.checkpoint.swapped")


def replace_path(new: Path, target: Path) -> None:
    """Put ``new`` (a file or folder) at ``target``; the old ``target`` is moved aside to :func:`aside_path` first
    and removed last.

    At every instant ``target`` holds the complete old or the complete new checkpoint, or, between the two renames,
    the aside path holds the old one. That name (``last.ckpt`` -> ``last.old.ckpt``) is still a ``last*.ckpt``, so
    ``ckpt_path="last"`` finds it, and ``load_checkpoint`` falls back to it when given ``target``. An aside left by
    a kill in that window, with no ``target``, is kept until ``new`` is in place. An aside is renamed out of that
    pattern before it is deleted, so a kill while deleting never leaves a partial checkpoint that "last" would pick.
    """
    old = aside_path(target)
    if target.exists() or target.is_symlink():
        _discard(old)
        target.rename(old)
    new.rename(target)
    _discard(old)
    _discard(target.with_name(target.name + ".old"))  # where earlier versions set the old checkpoint aside


def aside_path(target: Path) -> Path:
    """Where :func:`replace_path` keeps the old ``target`` while it swaps: ``last.ckpt`` -> ``last.old.ckpt``.

    The name keeps the suffix, so Lightning's ``ckpt_path="last"`` (``last*.ckpt`` in the checkpoint folder) finds it
    when a kill left only it, and it keeps the stem, so it sorts beside ``target``."""
    return target.with_name(f"{target.stem}.old{target.suffix}")


def _discard(path: Path) -> None:
    """Delete ``path``, first renamed to ``<name>.deleting`` (one rename), so that no partly deleted checkpoint ever
    carries a checkpoint's name; a ``.deleting`` left by an earlier kill goes too."""
    trash = path.with_name(path.name + ".deleting")
    _remove(trash)
    if path.exists() or path.is_symlink():
        path.rename(trash)
        _remove(trash)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():  # a link (ModelCheckpoint(save_last="link")) goes, not its target
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


class ModelParallelStrategy(_AtomicShardedSave, strategies.ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor parallel) with atomic sharded checkpoints.

    With ``data_parallel_size="auto"`` and an integer ``tensor_parallel_size``, data parallelism takes every
    remaining device (Lightning's ``"auto"`` means one data-parallel rank per node), so ``tensor_parallel_size: 1``
    is plain FSDP2 on all devices of all nodes.
    """

    def _saves_sharded(self) -> bool:
        return self._save_distributed_checkpoint

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto" and isinstance(self._tensor_parallel_size, int):
            self._data_parallel_size = self.num_nodes * self.num_processes // self._tensor_parallel_size
        data_parallel = self._data_parallel_size if isinstance(self._data_parallel_size, int) else self.num_nodes
        torch_version = cast(Any, torch.__version__)  # a TorchVersion compares with tuples; its stub says only str
        if self.root_device.type == "cpu" and data_parallel > 1 and torch_version < CPU_FSDP2_TORCH:
            # Measured with torch 2.7.1 and 2.8.0: FSDP2 over gloo returns the sum of the processes' gradients, not
            # their mean, without a warning (2.9.1 returns the mean). Adam hides it; clipping and SGD do not.
            raise ValueError(
                f"ModelParallelStrategy (FSDP2) over {data_parallel} data-parallel CPU processes needs torch >= 2.9 "
                f"(this is {torch.__version__}): older torch sums the gradients of the processes instead of averaging "
                "them. On CPU use DDP or lightning_power.strategies.FSDPStrategy, or upgrade torch."
            )
        super().setup_environment()


class FSDPStrategy(_AtomicShardedSave, strategies.FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1) with atomic sharded checkpoints, usable on CPU (gloo) as well."""

    def _saves_sharded(self) -> bool:
        return self._state_dict_type == "sharded"

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        on_cpu = self.root_device.type == "cpu"
        torch_version = cast(Any, torch.__version__)  # a TorchVersion compares with tuples; its stub says only str
        if on_cpu and self._state_dict_type == "full" and torch_version < CPU_FSDP1_FULL_CHECKPOINT_TORCH:
            # Lightning saves full state dicts with offload_to_cpu=True. Before torch 2.14, FSDP's offload frees the
            # unsharded parameters while it copies them when they already live on the CPU: a segfault, not an error.
            raise ValueError(
                f"FSDPStrategy on CPU with state_dict_type='full' needs torch >= 2.14 (this is {torch.__version__}): "
                "older torch crashes while saving the checkpoint. Pass state_dict_type='sharded', or upgrade torch."
            )
        if not on_cpu or any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
            return super()._setup_model(model)  # a model wrapped in configure_model is not wrapped again
        # Lightning passes device_id=root_device.index, which is None on CPU, and torch's FSDP then refuses to run.
        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _move_torchmetrics_to_device(wrapped, self.root_device)
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped
