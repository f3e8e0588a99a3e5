"""``UpdateSparsityMonitor``: log how much of the model an optimizer actually changed, exactly and shard-aware.

Update sparsity (Mukherjee et al., arXiv 2505.11711, §2.2) is ``1 - ||theta_t - theta_0||_0 / n``: the fraction of
parameter elements still equal to the reference. This callback is thin glue: ``checker.py`` counts, ``masks.py``
writes masks, ``rank.py`` measures update rank, ``heatmap.py`` draws.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_power.distributed import ShardLayout, shard_layout
from lightning_power.files import save_png
from lightning_power.sparsity import counting
from lightning_power.sparsity.checker import UpdateChecker
from lightning_power.sparsity.counting import COMPARE_AS_CHOICES, CompareAs
from lightning_power.sparsity.heatmap import heatmap
from lightning_power.sparsity.layers import group_by_layer
from lightning_power.sparsity.masks import write_masks
from lightning_power.sparsity.rank import update_rank

FIT_START = "fit_start"
SNAPSHOT_DEVICES = ("auto", "cpu", "same")
RESERVED_KEYS = ("total", "total_exact", "since_last", "frozen_fraction")
STATE_VERSION = 1


class UpdateSparsityMonitor(Callback):
    r"""Log the fraction of parameter elements left unchanged by training, per check, exactly.

    Every ``every_n_steps`` optimizer steps it compares this rank's part of every parameter with a reference snapshot
    (taken at the start of the fit, or read from a checkpoint) and with the previous check, combines the counts with
    one ``all_reduce`` and logs, to every logger:

    - ``update_sparsity/total``: fraction of elements unchanged vs the reference;
    - ``update_sparsity/total_exact``: the same, bit-exact (only when ``atol > 0``);
    - ``update_sparsity/since_last``: fraction unchanged since the previous check (with ``since_last``);
    - ``update_sparsity/frozen_fraction``: fraction of elements in parameters with ``requires_grad=False`` (they
      count as unchanged);
    - ``update_sparsity/<layer>``: per layer (with ``per_layer``; layers as in ``layers.py``, e.g. ``blocks.3``);
    - ``update_rank/<param>`` and ``update_stable_rank/<param>`` of each matrix's update ``W - W_ref`` (every
      ``rank_every_n_checks`` checks; NaN when the update holds a NaN or an infinity).

    Parameters that are not floating point (e.g. frozen int8 quantized weights) are left out of every count and
    denominator, with one warning that names them.

    The settings (``compare_as``, ``atol``, ``reference``) go to each logger's hyperparameters when the fit is set
    up (with ``TensorBoardLogger``: to ``hparams.yaml``, not to the HPARAMS tab, which shows the module's). At the end
    of the fit it writes a per-layer heatmap PNG (also to TensorBoard) and, with ``save_masks``, the bit-packed change
    masks that ``lightning-power sparsity-overlap`` compares, both under ``<log_dir>/update_sparsity/``.

    Args:
        every_n_steps: check whenever ``trainer.global_step`` reaches or passes a multiple of this (>= 1): every this
            many optimizer steps, even when one batch makes several (manual optimization with several optimizers).
        reference: ``"fit_start"``, or the path of a Lightning checkpoint whose ``state_dict`` is the reference.
        atol: 0 compares bit patterns; > 0 also counts ``|current - reference| <= atol`` as unchanged (the paper
            uses 1e-5 on bfloat16 values).
        compare_as: ``None`` compares each parameter in its own dtype; ``"bfloat16"`` compares bfloat16 casts, the
            representation of the paper (with float32 master weights, most of its sparsity is bfloat16 rounding).
        per_layer: log one value per layer.
        since_last: also compare with the previous check (a second snapshot, same size as the reference).
        rank_every_n_checks: log update rank every this many checks; 0 = never (it gathers one matrix at a time and
            runs an SVD: slow for large models).
        save_masks: write the "changed vs reference" masks at the end of the fit.
        snapshot_device: ``"same"`` (the parameters' device), ``"cpu"`` (pinned host memory, streamed to the GPU at
            each check) or ``"auto"`` (the GPU if the snapshots need at most half of its free memory, else CPU).

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_power.demo import GPT, ByteCorpus
        >>> from lightning_power.sparsity import UpdateSparsityMonitor
        >>> monitor = UpdateSparsityMonitor(every_n_steps=2, compare_as="bfloat16")
        >>> import tempfile
        >>> trainer = pl.Trainer(max_steps=4, callbacks=[monitor], accelerator="cpu", logger=False,
        ...                      default_root_dir=tempfile.mkdtemp(),  # the heatmap goes to <dir>/update_sparsity
        ...                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(GPT(width=32, depth=1, context_length=16),
        ...             ByteCorpus(context_length=16, batch_size=4, max_bytes=20_000, max_val_bytes=2_000))
        >>> [step for step, _ in monitor.history]
        [2, 4]
        >>> 0.0 <= monitor.history[-1][1]["update_sparsity/total"] <= 1.0
        True
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        reference: str = FIT_START,
        atol: float = 0.0,
        compare_as: Literal["bfloat16"] | None = None,
        per_layer: bool = True,
        since_last: bool = True,
        rank_every_n_checks: int = 0,
        save_masks: bool = False,
        snapshot_device: Literal["auto", "cpu", "same"] = "auto",
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not (math.isfinite(atol) and atol >= 0):
            raise ValueError(f"atol must be a finite number >= 0 (0 = bit-exact), got {atol!r}")
        if compare_as not in COMPARE_AS_CHOICES:
            raise ValueError(f"compare_as must be one of {COMPARE_AS_CHOICES}, got {compare_as!r}")
        if isinstance(rank_every_n_checks, bool) or not isinstance(rank_every_n_checks, int) or rank_every_n_checks < 0:
            raise ValueError(f"rank_every_n_checks must be an integer >= 0 (0 = off), got {rank_every_n_checks!r}")
        if snapshot_device not in SNAPSHOT_DEVICES:
            raise ValueError(f"snapshot_device must be one of {SNAPSHOT_DEVICES}, got {snapshot_device!r}")
        if not isinstance(reference, (str, os.PathLike)):
            raise TypeError(f"reference must be 'fit_start' or a checkpoint path, got {reference!r}")
        reference = os.fspath(reference)
        if reference != FIT_START and not os.path.isfile(reference):
            raise ValueError(f"reference must be 'fit_start' or an existing checkpoint file, got {reference!r}")
        self.every_n_steps = every_n_steps
        self.reference = reference
        self.atol = float(atol)
        self.compare_as: CompareAs = compare_as
        self.per_layer = per_layer
        self.since_last = since_last
        self.rank_every_n_checks = rank_every_n_checks
        self.save_masks = save_masks
        self.snapshot_device = snapshot_device
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, logged metrics) of every check, in order
        self._layer_history: list[list[float]] = []  # per check, per layer: the heatmap's rows, even without per_layer
        self._checker: UpdateChecker | None = None
        self._restored: dict[str, Any] | None = None
        self._pending: tuple[int, torch.Tensor, torch.cuda.Event | None, dict[str, float], pl.Trainer] | None = None
        self._run: dict[str, Any] = {}  # run identity and progress: what the checkpoint keeps
        self._fit_token = ""  # names this fit's since-last files; set on every rank at the start of each fit
        self._last_seen_step = -1
        self._reference_written = False
        self._nan_reported: set[str] = set()

    # ---------------------------------------------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Record the settings in the loggers' hyperparameters, before Lightning logs the module's and saves them."""
        if stage != "fit":
            return
        settings = {"compare_as": str(self.compare_as), "atol": self.atol, "reference": self.reference}
        params = {f"update_sparsity/{key}": value for key, value in settings.items()}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # Into the hparams that its first save() writes to hparams.yaml, without an hparams session in the
                # event file (no metrics, no session): the module's, which Lightning logs next, stays the only one.
                logger.log_hyperparams(params, metrics={})
            else:
                logger.log_hyperparams(params)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layout = self._floating_point_parts(shard_layout(pl_module, root=trainer.model))
        # Snapshot files are per rank under sharding; unsharded replicas (DDP) share rank 0's.
        self._file_rank = trainer.global_rank if layout.group is not None else 0
        self._writes_files = trainer.global_rank == self._file_rank
        log_dir = Path(trainer.log_dir or trainer.default_root_dir).absolute() / "update_sparsity"  # collective
        if self._writes_files:  # fail before training, not at the first checkpoint
            try:
                log_dir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise OSError(
                    f"UpdateSparsityMonitor needs a writable folder {str(log_dir)!r} for the snapshots that resuming "
                    f"needs and for masks and heatmaps: {error}"
                ) from error
        self._checker = UpdateChecker(
            layout,
            compare_as=self.compare_as,
            atol=self.atol,
            since_last=self.since_last,
            snapshot_device=self._resolve_snapshot_device(layout),
        )
        for group in self._checker.layout.groups:  # differences are taken in float32, or float64 for float64 values
            if self.atol and counting.tolerance_value(self.atol, group.snapshot_dtype) == 0:
                raise ValueError(
                    f"atol={self.atol!r} rounds to 0 where the differences of {group.snapshot_dtype} values are taken; "
                    "use 0 (bit-exact) or a larger atol"
                )
        names = [part.name for part in layout.parts]
        self._layers = group_by_layer(names)
        clashes = sorted(set(self._layers) & set(RESERVED_KEYS))
        if clashes and self.per_layer:
            raise ValueError(
                f"layer names {clashes} clash with the metrics update_sparsity/{RESERVED_KEYS}; use per_layer=False"
            )
        self._frozen = [i for i, part in enumerate(layout.parts) if not part.param.requires_grad]
        if self._frozen:
            rank_zero_info(
                f"UpdateSparsityMonitor: {len(self._frozen)} frozen parameters are counted as unchanged "
                f"(update_sparsity/frozen_fraction): {[names[i] for i in self._frozen][:10]}"
            )
        # This fit's own token, the same on every rank: runs branched from one checkpoint share its run id, so the
        # since-last files each fit writes carry it, and the checkpoint records the file it needs.
        self._fit_token = trainer.strategy.broadcast(uuid.uuid4().hex[:12])
        if self._restored is not None:
            self._resume(trainer, self._restored)
            self._restored = None
        else:
            self._start(trainer, log_dir)
        self._last_seen_step = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._flush()
        step = trainer.global_step
        previous, self._last_seen_step = self._last_seen_step, step
        # A multiple of every_n_steps reached or passed since the last batch (global_step may move by more than one,
        # e.g. with several optimizers under manual optimization; it does not move on accumulation micro-batches).
        if step // self.every_n_steps > previous // self.every_n_steps:
            self._check(trainer, step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush()
        if self._checker is None:
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "update_sparsity"  # collective (broadcast)
        tag: str = "native" if self.compare_as is None else self.compare_as
        tag += f"-atol{self.atol:g}" if self.atol else ""
        if self.save_masks:
            self._write_masks(trainer, out_dir / f"masks-{tag}-step{trainer.global_step}.npz")
        if trainer.is_global_zero and self.history:
            self._write_heatmap(trainer, out_dir / f"heatmap-{tag}.png")

    @override
    def state_dict(self) -> dict[str, Any]:
        self._flush()
        if not self._run:
            return {}
        return {
            **self._run,
            "version": STATE_VERSION,
            "settings": self._settings(),
            "history": [[step, dict(metrics)] for step, metrics in self.history],
            "layer_history": [list(values) for values in self._layer_history],
            "nan_reported": sorted(self._nan_reported),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Write this rank's snapshots that the checkpoint needs (only rank 0's callback state is saved)."""
        if self._checker is None or not self._run or not self._writes_files:
            return
        if self.reference == FIT_START and not self._reference_written:
            self._checker.reference.save(self._snapshot_path("reference"), self._identity(self._run["reference_step"]))
            self._reference_written = True
        last_step = self._run["last_check_step"]
        if self._checker.last is not None and last_step != trainer.global_step:
            fit = self._run.get("since_last_fit")
            path = self._snapshot_path("since_last", last_step, fit)
            if not path.exists():  # written by this fit (its token), or the very file this fit resumed from
                self._checker.last.save(path, self._identity(last_step, fit))

    # ---------------------------------------------------------------------------------------------- internals

    @property
    def _live_checker(self) -> UpdateChecker:
        """The checker of the fit: ``on_train_start`` makes it, before any of the internals below runs."""
        if self._checker is None:
            raise RuntimeError("UpdateSparsityMonitor has no checker: on_train_start has not run")
        return self._checker

    def _settings(self) -> dict[str, Any]:
        return {
            "compare_as": self.compare_as,
            "atol": self.atol,
            "reference": self.reference,
            "since_last": self.since_last,
        }

    @staticmethod
    def _floating_point_parts(layout: ShardLayout) -> ShardLayout:
        """``layout`` without the parameters that are not floating point (e.g. frozen int8 quantized weights)."""
        others = [part for part in layout.parts if not part.param.dtype.is_floating_point]
        if not others:
            return layout
        rank_zero_warn(
            f"UpdateSparsityMonitor: {len(others)} parameters are not floating point and are left out of every count "
            f"and denominator: {[f'{part.name} ({part.param.dtype})' for part in others][:10]}"
        )
        return ShardLayout([part for part in layout.parts if part.param.dtype.is_floating_point], layout.group)

    def _resolve_snapshot_device(self, layout: ShardLayout) -> torch.device:
        tensors = [part.local() for part in layout.parts]
        device = tensors[0].device if tensors else torch.device("cpu")
        if device.type != "cuda" or self.snapshot_device == "same":
            return device
        if self.snapshot_device == "cpu":
            return torch.device("cpu")
        needed = sum(t.numel() * counting.snapshot_dtype(t.dtype, self.compare_as).itemsize for t in tensors)
        free, _ = torch.cuda.mem_get_info(device)
        return device if needed * (1 + self.since_last) <= free // 2 else torch.device("cpu")

    def _start(self, trainer: pl.Trainer, log_dir: Path) -> None:
        checker = self._live_checker
        if self.reference == FIT_START:
            checker.reference.capture(checker.local_tensors())
            reference_step, fingerprint = trainer.global_step, None
            if trainer.global_step > 0:
                rank_zero_warn(
                    f"UpdateSparsityMonitor found no saved state in the checkpoint: its reference is the "
                    f"model at step {trainer.global_step}, not at the start of training."
                )
        else:
            fingerprint = self._load_reference_checkpoint()
            reference_step = fingerprint["global_step"]
        if checker.last is not None:
            checker.last.capture(checker.local_tensors())
        self._run = {
            "run_id": trainer.strategy.broadcast(uuid.uuid4().hex),
            "dir": str(log_dir.resolve()),
            "world_size": trainer.world_size,
            "sharded": checker.group is not None,
            "reference_step": reference_step,
            "reference_checkpoint": fingerprint,
            "last_check_step": trainer.global_step,
            "since_last_fit": self._fit_token,  # the fit whose since-last files hold the snapshot of last_check_step
            "n_checks": 0,
        }
        self._reference_written = False
        self.history, self._layer_history, self._nan_reported = [], [], set()

    def _resume(self, trainer: pl.Trainer, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"UpdateSparsityMonitor state version {state.get('version')!r} is not {STATE_VERSION}")
        if state["settings"] != self._settings():
            raise ValueError(
                f"UpdateSparsityMonitor settings changed on resume: the checkpoint has "
                f"{state['settings']}, this run has {self._settings()}; the numbers would not continue"
            )
        was_sharded = state.get("sharded", True)  # older states did not record it: assume shards, as they did
        if was_sharded and state["world_size"] != trainer.world_size:
            raise ValueError(
                f"UpdateSparsityMonitor cannot resume on {trainer.world_size} processes: its reference "
                f"snapshots are per-rank shards of a {state['world_size']}-process run"
            )
        if "sharded" in state and was_sharded != (self._live_checker.group is not None):
            kinds = ("unsharded (one device or DDP)", "sharded (FSDP or FSDP2)")
            raise ValueError(
                f"UpdateSparsityMonitor cannot resume a {kinds[was_sharded]} run {kinds[not was_sharded]}: its "
                f"reference snapshots are in the other layout; resume with the same kind of strategy"
            )
        kept = ("version", "settings", "history", "layer_history", "nan_reported")
        self._run = {k: v for k, v in state.items() if k not in kept}
        # Older states did not record it; their snapshots (loaded below) load only into the layout they came from.
        self._run.setdefault("sharded", self._live_checker.group is not None)
        self.history = [(step, metrics) for step, metrics in state["history"]]
        self._layer_history = state["layer_history"]
        self._nan_reported = set(state["nan_reported"])
        checker = self._live_checker
        if self.reference == FIT_START:
            checker.reference.load(self._snapshot_path("reference"), self._identity(self._run["reference_step"]))
            self._reference_written = True
        elif self._load_reference_checkpoint() != self._run["reference_checkpoint"]:
            raise ValueError(
                f"the reference checkpoint {self.reference!r} changed since the run started "
                f"(was {self._run['reference_checkpoint']})"
            )
        if checker.last is not None:
            last_step = self._run["last_check_step"]
            if last_step == trainer.global_step:
                checker.last.capture(checker.local_tensors())
                self._run["since_last_fit"] = self._fit_token
            else:  # the file the checkpoint was saved with; older states (no token) name it without one
                fit = self._run.get("since_last_fit")
                checker.last.load(self._snapshot_path("since_last", last_step, fit), self._identity(last_step, fit))

    def _load_reference_checkpoint(self) -> dict[str, Any]:
        path = Path(self.reference)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if "state_dict" not in checkpoint:
            raise ValueError(f"reference {self.reference!r} has no 'state_dict' (not a Lightning checkpoint)")
        self._live_checker.load_reference(checkpoint["state_dict"])
        return {"path": str(path.resolve()), "bytes": path.stat().st_size, "global_step": checkpoint.get("global_step")}

    def _snapshot_path(self, kind: str, step: int | None = None, fit: str | None = None) -> Path:
        """``<dir>/reference-<run id>-rank<r>-of-<W>.pt``,
        ``<dir>/since_last-<run id>-fit<token>-step<S>-rank<r>-of-<W>.pt`` (no ``-fit<token>`` in older runs)."""
        by_fit = "" if fit is None else f"-fit{fit}"
        at_step = "" if step is None else f"-step{step}"
        name = f"{kind}-{self._run['run_id']}{by_fit}{at_step}-rank{self._file_rank}-of-{self._run['world_size']}.pt"
        return Path(self._run["dir"]) / name

    def _identity(self, step: int, fit: str | None = None) -> dict[str, Any]:
        """What a snapshot file records and loading checks: run, rank, step and, for since-last files, the fit."""
        identity = {
            "run_id": self._run["run_id"],
            "rank": self._file_rank,
            "world_size": self._run["world_size"],
            "step": step,
        }
        return identity if fit is None else {**identity, "fit": fit}

    def _check(self, trainer: pl.Trainer, step: int) -> None:
        counts = self._live_checker.count()
        event = None
        if counts.is_cuda:  # read the counts back without waiting: they are logged at the next hook
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            counts = host
        self._run["last_check_step"] = step
        self._run["since_last_fit"] = self._fit_token  # the since-last snapshot is now this fit's
        self._run["n_checks"] += 1
        extra = {}
        if self.rank_every_n_checks and self._run["n_checks"] % self.rank_every_n_checks == 0:
            extra = self._rank_metrics()
        self._pending = (step, counts, event, extra, trainer)
        if event is None:
            self._flush()

    def _flush(self) -> None:
        if self._pending is None:
            return
        step, counts, event, extra, trainer = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        rows = counts.tolist()
        layers = [self._unchanged(rows, counting.CHANGED, indices) for indices in self._layers.values()]
        metrics = {**self._metrics(rows), **extra}
        if self.per_layer:
            metrics.update({f"update_sparsity/{layer}": value for layer, value in zip(self._layers, layers)})
        self.history.append((step, metrics))
        self._layer_history.append(layers)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _unchanged(self, rows: list[list[int]], column: int, indices: list[int] | range) -> float:
        """Fraction of the elements of parameters ``indices`` that ``rows[:, column]`` does not count as changed."""
        numels = self._live_checker.whole_numels
        n = sum(numels[i] for i in indices)
        return 1.0 - sum(rows[i][column] for i in indices) / n if n else 1.0

    def _metrics(self, rows: list[list[int]]) -> dict[str, float]:
        """The whole-model metrics of one check, from its reduced counts; warns about new NaN parameters."""
        numels = self._live_checker.whole_numels
        total = sum(numels)
        everything = range(len(rows))
        metrics = {"update_sparsity/total": self._unchanged(rows, counting.CHANGED, everything)}
        if self.atol:
            metrics["update_sparsity/total_exact"] = self._unchanged(rows, counting.CHANGED_EXACT, everything)
        if self.since_last:
            metrics["update_sparsity/since_last"] = self._unchanged(rows, counting.CHANGED_SINCE_LAST, everything)
        metrics["update_sparsity/frozen_fraction"] = sum(numels[i] for i in self._frozen) / total if total else 0.0
        names = [part.name for part in self._live_checker.parts]
        new_nans = [names[i] for i, row in enumerate(rows) if row[counting.NAN] and names[i] not in self._nan_reported]
        if new_nans:
            self._nan_reported.update(new_nans)
            rank_zero_warn(f"UpdateSparsityMonitor: parameters contain NaN (counted as changed): {new_nans}")
        return metrics

    def _rank_metrics(self) -> dict[str, float]:
        metrics = {}
        checker = self._live_checker
        for index, part in enumerate(checker.parts):
            delta = checker.update_matrix(index)  # collective: every rank, same order
            if delta is not None:
                fraction, stable = update_rank(delta)
                metrics[f"update_rank/{part.name}"] = fraction
                metrics[f"update_stable_rank/{part.name}"] = stable
        return metrics

    def _write_masks(self, trainer: pl.Trainer, path: Path) -> None:
        metadata = {
            "compare_as": self.compare_as,
            "atol": self.atol,
            "reference": self.reference,
            "reference_step": self._run["reference_step"],
            "step": trainer.global_step,
        }
        error = None
        try:
            write_masks(path, self._live_checker, metadata, writer=trainer.is_global_zero)
        except OSError as exc:
            error = str(exc)
        error = trainer.strategy.broadcast(error)
        if error is not None:
            raise OSError(f"UpdateSparsityMonitor could not save the masks: {error}")

    def _write_heatmap(self, trainer: pl.Trainer, path: Path) -> None:
        steps = [step for step, _ in self.history]
        title = f"update sparsity per layer (compare_as={self.compare_as}, atol={self.atol:g})"
        figure = heatmap(steps, list(self._layers), self._layer_history, title)
        save_png(figure, path, dpi=100)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("update_sparsity/heatmap", figure, global_step=trainer.global_step)
