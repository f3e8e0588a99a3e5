"""Count the real tokens of every optimizer step, across ranks and gradient accumulation, and feed the schedulers.

Logged metrics, to every logger, when and at the step Lightning logs its own: every ``trainer.log_every_n_steps``
batches that stepped, at the count of those batches (``trainer.global_step`` with one optimizer):

- ``tokens/seen``: tokens consumed by all optimizer steps so far, this one included, summed over ranks.
- ``tokens/step``: tokens of this optimizer step, all ranks and accumulated micro-batches together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch.optim import Optimizer
from typing_extensions import override

from lightning_power.schedulers import TokenScheduler


def count_tokens(batch: Any, *, mask_key: str = "attention_mask", tokens_key: str = "input_ids") -> int | torch.Tensor:
    """The number of tokens in ``batch`` by the default rule.

    - a tensor: ``numel()``;
    - a tuple or list: the first tensor in it, e.g. ``inputs`` of an ``(inputs, targets)`` batch;
    - a mapping: the nonzero entries of ``batch[mask_key]`` when the mask is present (padding excluded; it must be a
      (batch, sequence) or (sequence,) mask of any dtype: 0/1, bool, float, or segment ids with 0 for padding), else
      ``batch[tokens_key].numel()``. Counting nonzeros, not summing, keeps a half-precision mask exact.
    """
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, (tuple, list)):
        for item in batch:
            if isinstance(item, torch.Tensor):
                return item.numel()
    elif isinstance(batch, Mapping):
        if mask_key in batch:
            mask = batch[mask_key]
            if not isinstance(mask, torch.Tensor):
                raise TypeError(
                    f"batch[{mask_key!r}] is a {type(mask).__name__}, not a tensor: cannot count tokens from it; "
                    "pass TokenCounter(count_fn=...) or mask_key=<the key of a (batch, sequence) padding mask>"
                )
            if mask.dim() > 2:  # e.g. a (batch, 1, query, key) attention mask of a packing collator
                raise ValueError(
                    f"batch[{mask_key!r}] has shape {tuple(mask.shape)}: counting tokens needs a (batch, sequence) "
                    "padding mask; pass TokenCounter(count_fn=...) or mask_key=<the key of such a mask>"
                )
            return torch.count_nonzero(mask)
        if tokens_key in batch:
            return batch[tokens_key].numel()
        raise TypeError(
            f"cannot count tokens in a batch with keys {list(batch)}: it has neither {mask_key!r} nor {tokens_key!r}; "
            "set TokenCounter(mask_key=..., tokens_key=...) or count_fn"
        )
    raise TypeError(f"cannot count tokens in a batch of type {type(batch).__name__}; pass TokenCounter(count_fn=...)")


def _data_parallel_group(trainer: pl.Trainer) -> torch.distributed.ProcessGroup | None:
    """The ranks that read different batches: the world (``None``), or the data-parallel mesh dimension of
    ``ModelParallelStrategy`` (tensor-parallel peers share a batch)."""
    if isinstance(trainer.strategy, ModelParallelStrategy):
        return trainer.strategy.device_mesh["data_parallel"].get_group()
    return None


def _data_parallel_size(trainer: pl.Trainer) -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size(_data_parallel_group(trainer))


def _global_sum(local: int | torch.Tensor, trainer: pl.Trainer) -> int:
    """Sum a per-rank count over the data-parallel ranks: one all-reduce, called on every rank."""
    total = torch.as_tensor(local, dtype=torch.int64, device=trainer.strategy.root_device)
    if _data_parallel_size(trainer) > 1:
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=_data_parallel_group(trainer))
    return int(total.item())


class TokenCounter(Callback):
    """Count the tokens of each optimizer step over all ranks and feed them to the token schedulers.

    Each micro-batch is counted in ``on_train_batch_start`` (see :func:`count_tokens`, or pass ``count_fn``). Just
    before each optimizer step, one all-reduce sums the step's count over the data-parallel ranks. Under automatic
    optimization a micro-batch whose ``training_step`` returned ``None`` (no backward) counts 0 tokens, and a
    scheduler step Lightning takes where nothing trained (a batch skipped with -1 or ``None``) is uncounted. The
    :class:`~lightning_power.PowerScheduler` and :class:`~lightning_power.WSDScheduler` of the trainer then get the
    step's tokens and set the LR the step uses: Power's n and beta follow the real batch, so a batch-size ramp or a
    resume with a new batch size is exact. The count is saved in checkpoints.

    A callback that reads ``param_groups[i]["lr"]`` in ``on_before_optimizer_step`` must come after this one.
    ``LearningRateMonitor`` logs in ``on_train_batch_start``, before the step's micro-batches are all counted, so it
    shows the LR predicted from the previous step's batch (at the first step: this rank's first micro-batch times
    the data-parallel size times ``accumulate_grad_batches``). The prediction is exact while the batch is constant.

    Args:
        count_fn: ``batch -> tokens`` (an int or a 0-d integer tensor), replacing the default rule; in YAML an import
            path such as ``lightning_power.tokens.count_tokens``.
        mask_key: the mapping key of the attention mask (padding excluded when present).
        tokens_key: the mapping key counted by ``numel()`` when there is no mask.

    Raises:
        ValueError: in ``on_train_start``, if a token scheduler is not stepped with ``interval="step"`` and
            ``frequency=1``; in ``setup``, if ``training_step`` takes a ``dataloader_iter`` (callbacks never see the
            batch then).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_power.tokens import TokenCounter
        >>> trainer = Trainer(callbacks=[TokenCounter()], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        count_fn: Callable[[Any], Any] | None = None,  # returns an int or a 0-d tensor; Any lets jsonargparse take it
        mask_key: str = "attention_mask",
        tokens_key: str = "input_ids",
    ) -> None:
        if count_fn is not None and not callable(count_fn):
            raise TypeError(f"count_fn must be callable, got {count_fn!r}")
        self.count_fn = count_fn
        self.mask_key = mask_key
        self.tokens_key = tokens_key
        self.tokens_seen = 0
        self.step_tokens = 0
        self._local_tokens: int | torch.Tensor = 0
        self._local_batches = 0
        self._open_batch_tokens: int | torch.Tensor | None = None  # counted in on_train_batch_start, not yet ended
        self._open_batch_backward = False  # Lightning backpropagated the open batch's loss (training_step gave one)
        self._reported_this_batch = False  # the schedulers got a step's tokens during the current batch
        self._horizon_checked = False
        self._schedulers: list[TokenScheduler] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
            raise ValueError(
                f"TokenCounter cannot count tokens: {type(pl_module).__name__}.training_step takes `dataloader_iter`, "
                "so Lightning fetches the batches inside training_step and callbacks never see them. Use "
                "training_step(self, batch, batch_idx), or drop TokenCounter and give PowerScheduler a fixed "
                "tokens_per_step, or report each optimizer step's tokens (all ranks) yourself with "
                "scheduler.set_step_tokens(tokens) before the step"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._schedulers = []
        for config in trainer.lr_scheduler_configs:
            if not isinstance(config.scheduler, TokenScheduler):
                continue
            name = type(config.scheduler).__name__
            if config.interval != "step" or config.frequency != 1:
                raise ValueError(
                    f"{name} must be stepped once per optimizer step: configure it with interval='step' and "
                    f"frequency=1, got interval={config.interval!r}, frequency={config.frequency!r}"
                )
            config.scheduler.fed_by_counter = True
            self._schedulers.append(config.scheduler)
        self._local_tokens, self._local_batches = 0, 0
        self._open_batch_tokens = None
        self._open_batch_backward = self._reported_this_batch = False
        self._horizon_checked = False

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.count_fn is not None:
            tokens = self.count_fn(batch)
        else:
            tokens = count_tokens(batch, mask_key=self.mask_key, tokens_key=self.tokens_key)
        self._local_tokens = self._local_tokens + tokens
        self._local_batches += 1
        self._open_batch_tokens = tokens
        self._open_batch_backward = False
        unmeasured = [scheduler for scheduler in self._schedulers if scheduler.batch_tokens is None]
        if unmeasured and self._local_batches == 1:
            # Before the first measured step a scheduler has no batch size to predict its LR from (what
            # LearningRateMonitor logs next): estimate it from this micro-batch. The exact count replaces it below.
            estimate = int(tokens) * _data_parallel_size(trainer) * trainer.accumulate_grad_batches
            for scheduler in unmeasured:
                if estimate > 0:
                    scheduler.set_step_tokens(estimate)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._open_batch_backward = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.automatic_optimization:
            if self._open_batch_tokens is not None and not self._open_batch_backward:
                self._drop_open_batch()  # training_step returned None inside an accumulation window
            if not self._reported_this_batch and not trainer.fit_loop._should_accumulate():
                # The window closed at this batch and nothing trained: a None batch (Lightning runs no optimizer step
                # and the next window zeroes the gradients it accumulated), or training_step returned None throughout.
                # Lightning stepped the step-interval schedulers all the same (before this hook).
                self._take_back_untrained_step()
        self._open_batch_tokens = None
        self._reported_this_batch = False

    def _take_back_untrained_step(self) -> None:
        """Drop the open window and count Lightning's scheduler step of this batch as no step: nothing trained."""
        self._local_tokens, self._local_batches = 0, 0
        for scheduler in self._schedulers:
            scheduler.uncount_last_step()

    def _drop_open_batch(self) -> None:
        """Take the batch counted in ``on_train_batch_start`` out of the window: it trained nothing."""
        assert self._open_batch_tokens is not None
        self._local_tokens = self._local_tokens - self._open_batch_tokens
        self._local_batches -= 1
        self._open_batch_tokens = None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._open_batch_tokens is None:
            return
        # The module ended the epoch by returning -1 from on_train_batch_start: that batch never trained.
        if pl_module.automatic_optimization:
            # Lightning still stepped every step-interval scheduler once, and zeroes the gradients of an accumulation
            # window the skip cut short when the next epoch starts: neither that step nor the window trained.
            self._take_back_untrained_step()
        else:  # the module steps its optimizers itself: only the skipped batch is dropped
            self._drop_open_batch()
        self._open_batch_tokens = None

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if pl_module.automatic_optimization and self._open_batch_tokens is not None and not self._open_batch_backward:
            # training_step returned None (single device only): Lightning skipped this micro-batch's backward
            self._drop_open_batch()
            if getattr(trainer.precision_plugin, "scaler", None) is not None:
                # and a precision plugin with a GradScaler skips optimizer.step() too: the whole window is lost
                self._local_tokens, self._local_batches = 0, 0
        if self._local_batches == 0:  # nothing trained, or a second optimizer on the same batch (its tokens counted)
            return
        step_tokens = _global_sum(self._local_tokens, trainer)
        if step_tokens <= 0 and self._schedulers:
            raise ValueError(
                f"TokenCounter counted {step_tokens} tokens in an optimizer step over all ranks (is every sequence "
                "padding?); a token schedule cannot advance by 0 tokens. Drop empty batches, or pass count_fn"
            )
        self.step_tokens = step_tokens
        self.tokens_seen += self.step_tokens
        self._local_tokens, self._local_batches = 0, 0
        self._reported_this_batch = True
        for scheduler in self._schedulers:
            scheduler.set_step_tokens(self.step_tokens)
        if not self._horizon_checked:
            self._horizon_checked = True
            self._warn_if_a_schedule_ends_early(trainer)
        # When and at which step Lightning itself logs (and LearningRateMonitor): once per batch that steps, also
        # when several optimizers each add one to global_step.
        if trainer._logger_connector.should_update_logs:
            metrics: dict[str, float] = {"tokens/seen": self.tokens_seen, "tokens/step": self.step_tokens}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    def _warn_if_a_schedule_ends_early(self, trainer: pl.Trainer) -> None:
        """At the first step of a fit: warn when a token schedule would reach its floor well before the fit ends, at
        this step's tokens (e.g. a recipe's token settings kept while devices multiply the global batch)."""
        if not trainer.lightning_module.automatic_optimization:  # max_steps counts every optimizer's steps there
            return
        total_steps = trainer.estimated_stepping_batches  # what max_steps, max_epochs and the data allow
        if not math.isfinite(total_steps) or total_steps < 0:  # no end, or an iterable dataset without a length
            return
        done = trainer.fit_loop.epoch_loop._batches_that_stepped + 1  # this step included, as tokens_seen
        planned = self.tokens_seen + (total_steps - done) * self.step_tokens
        for scheduler in self._schedulers:
            end = scheduler.end_tokens()
            if end is not None and planned > 1.05 * end:
                rank_zero_warn(
                    f"{type(scheduler).__name__} reaches its floor at {end} tokens, after about "
                    f"{done + -(-(end - self.tokens_seen) // self.step_tokens)} of the {int(total_steps)} optimizer "
                    f"steps this fit runs, at {self.step_tokens} tokens a step (all devices and accumulated "
                    "micro-batches): the rest trains at the floor LR. Scale the scheduler's token settings with the "
                    "global batch, or train fewer steps"
                )

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._local_batches > 0:
            rank_zero_warn(
                f"TokenCounter: this checkpoint (step {trainer.global_step}) is saved inside a gradient accumulation "
                f"window, after {self._local_batches} of its {trainer.accumulate_grad_batches} micro-batches. "
                "Lightning saves neither their accumulated gradients nor their tokens, so a run resumed from it "
                "restarts the window without them and will not match the uninterrupted run exactly. Save at optimizer "
                "steps: ModelCheckpoint(every_n_train_steps=...), or a val_check_interval that is a multiple of "
                "accumulate_grad_batches"
            )

    @override
    def state_dict(self) -> dict[str, int]:
        return {"tokens_seen": self.tokens_seen, "step_tokens": self.step_tokens}

    @override
    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.tokens_seen = state_dict["tokens_seen"]
        self.step_tokens = state_dict["step_tokens"]
