"""Power and WSD learning-rate schedulers: torch ``LRScheduler`` subclasses, closed form in their counters.

The LR of param group i is ``base_lrs[i] * factor(counters)``. It never chains on the previous LR, so per-group ratios
(muP) survive, a resume is exact and a decay can branch from any checkpoint. ``base_lrs`` (and ``_last_lr``) are the
only per-group state.

Counting convention: the LR used by optimizer step k (0-based) is the schedule at the units consumed *including* that
step's batch: ``(k + 1) * tokens_per_step`` tokens, or ``k + 1`` steps. So the first update is never at LR 0.

On resume (``load_state_dict``) the checkpoint gives the counters: ``last_epoch`` (optimizer steps taken),
``tokens_counted``/``steps_counted``, ``steps_skipped`` (scheduler steps that trained nothing) and ``batch_tokens``
(the last measured batch, used only without ``tokens_per_step``). The current config gives everything else: the
initial LRs, ``a``, ``b``, ``lr_max``, ``tokens_per_step``, warmup, decay, total, ``decay_shape``, ``min_lr_ratio``,
``reference_sequence_length`` and ``units``. So new decay settings at resume branch a decay from the checkpoint.
"""

from __future__ import annotations

import weakref
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_power.schedules import (
    check_positive,
    check_power_args,
    check_wsd_args,
    power_lr,
    wsd_factor,
)

_COUNTERS = ("last_epoch", "_step_count", "tokens_counted", "steps_counted", "batch_tokens")
_OPTIONAL_COUNTERS = {"steps_skipped": 0}  # absent from checkpoints of earlier versions
# What only this process needs, kept out of state_dict() and pickles: the optimizer hook that checks the stepping.
_RUNTIME = (
    "_step_hook",
    "_epoch_at_optimizer_step",
    "_optimizer_steps_at_epoch",
    "_warned_unstepped",
    "fed_by_counter",
)


def _watch_optimizer_steps(scheduler: TokenScheduler) -> RemovableHandle:
    """Call ``scheduler._after_optimizer_step()`` after each step of its optimizer; the hook does not keep the
    scheduler alive."""
    scheduler_ref = weakref.ref(scheduler)

    def after_optimizer_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        watched = scheduler_ref()
        if watched is not None:
            watched._after_optimizer_step()

    return scheduler.optimizer.register_step_post_hook(after_optimizer_step)


class TokenScheduler(LRScheduler):
    """Base of the schedulers that can run on tokens: a closed-form ``factor()`` of the counters times ``base_lrs``.

    Token counters: ``tokens_counted`` is the number of tokens consumed by the first ``steps_counted`` optimizer
    steps; every later step is assumed to consume ``batch_tokens`` (the fixed ``tokens_per_step``, or the last batch
    a :class:`~lightning_power.tokens.TokenCounter` measured), until :meth:`set_step_tokens` reports the real count.
    ``steps_skipped`` counts the scheduler steps that trained nothing (:meth:`uncount_last_step`).

    It must be stepped once per optimizer step. A hook on the optimizer checks it: after two optimizer steps without
    a scheduler step at an LR nobody else changed (e.g. Lightning's ``interval="epoch"``), a schedule that counts
    tokens raises a ``ValueError``; one that counts steps warns once.
    """

    def __init__(self, optimizer: Optimizer, *, tokens_per_step: int | None, last_epoch: int) -> None:
        if tokens_per_step is not None:
            check_positive("tokens_per_step", tokens_per_step)
        for i, group in enumerate(optimizer.param_groups):
            if isinstance(group["lr"], torch.Tensor):
                raise TypeError(f"{type(self).__name__} needs float learning rates, param group {i} has a Tensor lr")
        self.tokens_per_step = tokens_per_step
        self.tokens_counted = 0
        self.steps_counted = 0
        self.steps_skipped = 0
        self.batch_tokens = tokens_per_step
        self.fed_by_counter = False  # set by a TokenCounter, which reports the tokens of each step that trains
        self._epoch_at_optimizer_step: int | None = None  # last_epoch at the last optimizer step
        self._optimizer_steps_at_epoch = 0  # optimizer steps taken since last_epoch last changed
        self._warned_unstepped = False
        super().__init__(optimizer, last_epoch)
        self._step_hook = _watch_optimizer_steps(self)

    def factor(self) -> float:
        """The LR multiplier of every param group for optimizer step ``last_epoch``."""
        raise NotImplementedError

    def end_tokens(self) -> int | None:
        """The tokens at which the schedule reaches its floor, or ``None`` (no horizon, or not counted in tokens)."""
        return None

    def counts_tokens(self) -> bool:
        """Whether the schedule advances by tokens (else by optimizer steps)."""
        return True

    def units_consumed(self) -> int:
        """The units (tokens or steps) consumed by the optimizer steps taken, as of the last report."""
        if not self.counts_tokens():
            return self.last_epoch - self.steps_skipped
        if self.batch_tokens is None:
            return self.tokens_counted
        return self.tokens_counted + (self.last_epoch - self.steps_counted) * self.batch_tokens

    def _after_optimizer_step(self) -> None:
        """Refuse (tokens) or warn about (steps) a schedule left unstepped across optimizer steps, its LR frozen."""
        if self.last_epoch != self._epoch_at_optimizer_step:  # stepped since the last optimizer step (or first step)
            self._epoch_at_optimizer_step, self._optimizer_steps_at_epoch = self.last_epoch, 1
            return
        self._optimizer_steps_at_epoch += 1
        if self.last_epoch < 0:
            return  # SequentialLR undid the construction step: idle until its milestone
        current = [group["lr"] for group in self.optimizer.param_groups]
        if any(isinstance(lr, torch.Tensor) for lr in current):
            return  # a tensor LR is updated in place: who wrote it last cannot be told
        if any(lr is not ours for lr, ours in zip(current, self._last_lr)):
            return  # another writer set it, maybe to an equal value: Lightning's LR finder, SequentialLR's next phase
        name = type(self).__name__
        message = (
            f"{name} must be stepped once per optimizer step: configure it with interval='step' and frequency=1 "
            "(Lightning's default for `return [optimizer], [scheduler]` is interval='epoch'), or call "
            f"scheduler.step() after every optimizer.step(); {self._optimizer_steps_at_epoch} optimizer steps ran "
            "at the same LR since its last step"
        )
        if self.counts_tokens():
            raise ValueError(message)
        if not self._warned_unstepped:
            self._warned_unstepped = True
            rank_zero_warn(f"{message}. It counts its own steps, so they are the scheduler steps (e.g. epochs) now.")

    @override
    def state_dict(self) -> dict[str, Any]:
        """The torch default (every attribute but the optimizer), without the optimizer hook of this process."""
        return {key: value for key, value in super().state_dict().items() if key not in _RUNTIME}

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_step_hook"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._step_hook = _watch_optimizer_steps(self)  # on the unpickled or copied optimizer

    @override
    def get_lr(self) -> list[Any]:  # floats; recent torch declares list[float | Tensor], torch 2.7 list[float]
        factor = self.factor()
        return [base_lr * factor for base_lr in self.base_lrs]

    def tokens_through_current_step(self) -> int | None:
        """Tokens consumed by optimizer steps 0 .. ``last_epoch`` inclusive; ``None`` before any batch is known."""
        if self.batch_tokens is None:
            if self.last_epoch > self.steps_counted and not self.fed_by_counter:
                raise ValueError(
                    f"{type(self).__name__} counts tokens but nothing reports them: pass tokens_per_step=<tokens per "
                    "optimizer step, all ranks and gradient accumulation included>, or add "
                    "lightning_power.TokenCounter() to the Trainer callbacks"
                )
            return None
        return self.tokens_counted + (self.last_epoch - self.steps_counted + 1) * self.batch_tokens

    def set_step_tokens(self, tokens: int) -> None:
        """Report the tokens of the coming optimizer step (step ``last_epoch``) and apply its LR to the optimizer.

        :class:`~lightning_power.tokens.TokenCounter` calls this before each ``optimizer.step()``. Later steps are
        assumed to consume the same number until the next report.
        """
        tokens = int(tokens)
        check_positive("tokens", tokens)
        self._bank_uncounted_steps()
        self.batch_tokens = tokens
        self._apply_lr()

    def uncount_last_step(self) -> None:
        """Count the last ``step()`` as 0 tokens and as no optimizer step (``steps_skipped``), and apply the LR that
        follows.

        Lightning steps a step-interval scheduler also at a batch that trained nothing: one the module skipped by
        returning -1 from ``on_train_batch_start``, a ``None`` batch, or an accumulation window whose
        ``training_step`` returned ``None`` throughout. :class:`~lightning_power.tokens.TokenCounter` calls this then.
        """
        if self.last_epoch <= self.steps_counted:
            return
        if self.batch_tokens is not None:
            self.tokens_counted += (self.last_epoch - 1 - self.steps_counted) * self.batch_tokens
        self.steps_counted = self.last_epoch
        self.steps_skipped += 1
        self._apply_lr()

    def _apply_lr(self) -> None:
        """Write the LRs of step ``last_epoch`` into the optimizer, as ``step()`` does, without advancing."""
        values = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values, strict=True):
            group["lr"] = lr
        self._last_lr = values

    def _bank_uncounted_steps(self) -> None:
        """Fold the completed steps that used ``batch_tokens`` into ``tokens_counted``."""
        if self.batch_tokens is not None:
            self.tokens_counted += (self.last_epoch - self.steps_counted) * self.batch_tokens
            self.steps_counted = self.last_epoch

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters only; the settings and initial LRs stay those of the current config.

        So a run resumed with new ``total``/``decay`` settings branches a decay from the checkpoint, and a new
        ``tokens_per_step`` applies from the checkpoint on (the tokens already consumed are kept).
        """
        missing = [key for key in _COUNTERS if key not in state_dict]
        if missing:
            raise KeyError(f"{type(self).__name__} state_dict lacks {missing}; was it saved by another scheduler?")
        for key in _COUNTERS:
            setattr(self, key, state_dict[key])
        for key, default in _OPTIONAL_COUNTERS.items():
            setattr(self, key, state_dict.get(key, default))
        self._bank_uncounted_steps()
        if self.tokens_per_step is not None:
            self.batch_tokens = self.tokens_per_step
        saved_lrs = state_dict.get("_last_lr")
        self._apply_lr()
        self._warn_if_branched_behind(state_dict, saved_lrs)

    def _warn_if_branched_behind(self, state_dict: dict[str, Any], saved_lrs: list[Any] | None) -> None:
        """Warn when new settings start the decay behind a checkpoint that was not yet decaying: the LR jumps into the
        middle of the new decay instead of decaying from the checkpoint."""
        start = self.decay_start()
        consumed = self.units_consumed()
        if start is None or consumed <= start or not set(self._schedule_settings()) <= state_dict.keys():
            return  # no decay behind the checkpoint, or a checkpoint that does not say its settings
        saved_start = self._decay_start_of(state_dict)
        if saved_start is not None and saved_start < consumed:
            return  # the checkpoint was decaying already: a resume of (or a change to) the decay it was in
        lrs = f" (the checkpoint's LR {saved_lrs[0]:.6g}, now {self._last_lr[0]:.6g})" if saved_lrs else ""
        unit = "tokens" if self.counts_tokens() else "steps"
        saved = "no decay" if saved_start is None else f"its decay was to start at {saved_start}"
        rank_zero_warn(
            f"{type(self).__name__} resumed at {consumed} {unit} ({saved}) with settings whose decay starts earlier, "
            f"at {start}: the LR jumps to the middle of that decay{lrs}. To branch a decay from this checkpoint, start "
            f"it at {consumed} or later"
        )

    def _schedule_settings(self) -> tuple[str, ...]:
        """The settings that place the decay, read from a checkpoint's state on resume."""
        return ()

    def _decay_start_of(self, settings: Any) -> int | None:
        """Where the decay of a schedule with these settings (a mapping) starts, in its units; ``None`` without one."""
        return None

    def decay_start(self) -> int | None:
        """Where the decay starts, in the schedule's units (tokens or steps); ``None`` without a decay."""
        return self._decay_start_of(vars(self))


def _base_lr(group: dict[str, Any]) -> float:
    """A param group's initial LR before muP's factor (``mup_lr_factor``, set by ``MuPPlan.param_groups``)."""
    return group.get("initial_lr", group["lr"]) / group.get("mup_lr_factor", 1.0)


class PowerScheduler(TokenScheduler):
    """The Power scheduler (arXiv 2408.13359, Eq. 7-8): LR = min(lr_max, beta^p * a * n^b), n tokens; p = 1 by default.

    The reference LR is the largest initial LR of the param groups, before muP's per-group factors: the optimizer's
    LR. A group at the reference LR runs at ``power_lr(n)`` (see :func:`~lightning_power.schedules.power_lr`); every
    group's LR is its initial LR times ``power_lr(n) / reference_lr``, so muP's per-group multipliers survive.
    ``lr_max`` defaults to the reference LR, as in the paper's recipe, where the optimizer's LR is the cap.

    beta (the batch in 4096-token sequences) comes from ``tokens_per_step``, or from the live batch when a
    :class:`~lightning_power.tokens.TokenCounter` feeds the scheduler, which then also counts n in real tokens.
    Without ``total_tokens`` there is no decay and no horizon.

    Must be stepped once per optimizer step (Lightning: ``"interval": "step"``).

    Args:
        optimizer: the wrapped optimizer.
        a: amplitude (paper default 4).
        b: exponent, < 0 (paper default -0.51).
        lr_max: the cap of the law, > 0; ``math.inf`` for none. Defaults to the reference LR.
        tokens_per_step: tokens per optimizer step over all ranks and accumulated micro-batches. Leave it out when a
            ``TokenCounter`` measures them.
        warmup_tokens: linear warmup up to the power-law value at ``warmup_tokens``.
        decay_tokens: length of the final decay, which ends at ``total_tokens``.
        total_tokens: the horizon; ``None`` (default) means no decay.
        decay_shape: ``"exponential"`` (paper), ``"linear"``, ``"cosine"`` or ``"1-sqrt"``.
        min_lr_ratio: the floor, as a fraction of the LR where the decay starts, in [0, 1).
        reference_sequence_length: the sequence length beta is counted in (4096 in the paper).
        batch_exponent: p, how the LR grows with the batch: 1 (paper, linear), or what ``lightning-power calibrate``
            fitted on your sweep (e.g. 0.5, square root).
        last_epoch: torch's index of the last step taken (steps taken - 1); leave at -1 (Lightning restores the
            state on resume).

    Example::

        >>> import torch
        >>> from lightning_power.schedulers import PowerScheduler
        >>> optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.02)
        >>> batch = 1024 * 4096  # tokens per optimizer step
        >>> scheduler = PowerScheduler(optimizer, tokens_per_step=batch, warmup_tokens=100 * batch)
        >>> round(optimizer.param_groups[0]["lr"], 8)  # step 0: 1/100 of the way up to min(0.02, 4096 * n^-0.51)
        0.0002
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        a: float = 4.0,
        b: float = -0.51,
        lr_max: float | None = None,
        tokens_per_step: int | None = None,
        warmup_tokens: int = 0,
        decay_tokens: int = 0,
        total_tokens: int | None = None,
        decay_shape: Literal["exponential", "linear", "cosine", "1-sqrt"] = "exponential",
        min_lr_ratio: float = 0.0,
        reference_sequence_length: int = 4096,
        batch_exponent: float = 1.0,
        last_epoch: int = -1,
    ) -> None:
        reference_lr = max(_base_lr(group) for group in optimizer.param_groups)
        if not reference_lr > 0:
            raise ValueError(
                f"{type(self).__name__} scales each param group's initial LR by power_lr(n) / the largest one, so "
                f"the optimizer's LR must be > 0, got {reference_lr!r}"
            )
        if lr_max is None:
            lr_max = reference_lr
        check_power_args(
            a=a,
            b=b,
            lr_max=lr_max,
            warmup_tokens=warmup_tokens,
            decay_tokens=decay_tokens,
            total_tokens=total_tokens,
            decay_shape=decay_shape,
            min_lr_ratio=min_lr_ratio,
            reference_sequence_length=reference_sequence_length,
            batch_exponent=batch_exponent,
        )
        self.a, self.b, self.lr_max, self.batch_exponent = a, b, lr_max, batch_exponent
        self.reference_lr = reference_lr
        self.warmup_tokens, self.decay_tokens, self.total_tokens = warmup_tokens, decay_tokens, total_tokens
        self.decay_shape, self.min_lr_ratio = decay_shape, min_lr_ratio
        self.reference_sequence_length = reference_sequence_length
        super().__init__(optimizer, tokens_per_step=tokens_per_step, last_epoch=last_epoch)

    @override
    def end_tokens(self) -> int | None:
        return self.total_tokens

    @override
    def _schedule_settings(self) -> tuple[str, ...]:
        return ("decay_tokens", "total_tokens")

    @override
    def _decay_start_of(self, settings: Any) -> int | None:
        total = settings["total_tokens"]
        return None if total is None else total - settings["decay_tokens"]

    @override
    def factor(self) -> float:
        """``power_lr(n) / reference_lr``; 0 until the first batch's tokens are known."""
        n = self.tokens_through_current_step()
        if n is None or self.batch_tokens is None:  # n is None exactly when batch_tokens is
            return 0.0
        lr = power_lr(
            n,
            batch_tokens=self.batch_tokens,
            a=self.a,
            b=self.b,
            lr_max=self.lr_max,
            warmup_tokens=self.warmup_tokens,
            decay_tokens=self.decay_tokens,
            total_tokens=self.total_tokens,
            decay_shape=self.decay_shape,
            min_lr_ratio=self.min_lr_ratio,
            reference_sequence_length=self.reference_sequence_length,
            batch_exponent=self.batch_exponent,
        )
        return lr / self.reference_lr


class WSDScheduler(TokenScheduler):
    """Warmup-stable-decay: each param group's initial LR times :func:`~lightning_power.schedules.wsd_factor`.

    Linear warmup from 0 over ``warmup`` units, constant, then a decay over the last ``decay`` units that ends at
    ``total``; held at ``min_lr_ratio`` afterwards. Units are optimizer steps, or tokens measured by a
    :class:`~lightning_power.tokens.TokenCounter` (``units="tokens"``). Resume with a new ``total``/``decay`` to branch
    a decay from a checkpoint. Must be stepped once per optimizer step (Lightning: ``"interval": "step"``).

    Args:
        optimizer: the wrapped optimizer.
        warmup: warmup length in ``units``.
        total: where the decay ends, in ``units``.
        decay: decay length in ``units``; ``warmup + decay <= total``.
        decay_shape: ``"1-sqrt"`` (default), ``"linear"``, ``"cosine"`` or ``"exponential"``.
        min_lr_ratio: the floor, as a fraction of the initial LR, in [0, 1).
        units: ``"steps"`` (optimizer steps) or ``"tokens"``.
        last_epoch: torch's index of the last step taken (steps taken - 1); leave at -1 (Lightning restores the
            state on resume).

    Example::

        >>> import torch
        >>> from lightning_power.schedulers import WSDScheduler
        >>> optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
        >>> scheduler = WSDScheduler(optimizer, warmup=2, total=10, decay=4, decay_shape="linear")
        >>> lrs = []
        >>> for _ in range(10):
        ...     lrs.append(optimizer.param_groups[0]["lr"])
        ...     optimizer.step()
        ...     scheduler.step()
        >>> lrs
        [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        warmup: int,
        total: int,
        decay: int,
        decay_shape: Literal["1-sqrt", "linear", "cosine", "exponential"] = "1-sqrt",
        min_lr_ratio: float = 0.0,
        units: Literal["steps", "tokens"] = "steps",
        last_epoch: int = -1,
    ) -> None:
        check_wsd_args(warmup=warmup, total=total, decay=decay, decay_shape=decay_shape, min_lr_ratio=min_lr_ratio)
        if units not in ("steps", "tokens"):
            raise ValueError(f"units must be 'steps' or 'tokens', got {units!r}")
        self.warmup, self.total, self.decay = warmup, total, decay
        self.decay_shape, self.min_lr_ratio, self.units = decay_shape, min_lr_ratio, units
        super().__init__(optimizer, tokens_per_step=None, last_epoch=last_epoch)

    @override
    def end_tokens(self) -> int | None:
        return self.total if self.units == "tokens" else None

    @override
    def counts_tokens(self) -> bool:
        return self.units == "tokens"

    @override
    def _schedule_settings(self) -> tuple[str, ...]:
        return ("total", "decay")

    @override
    def _decay_start_of(self, settings: Any) -> int | None:
        return settings["total"] - settings["decay"]

    @override
    def factor(self) -> float:
        """``wsd_factor(t)`` with t = the optimizer steps through this one (``last_epoch + 1 - steps_skipped``), or the
        tokens through this step (0 before known)."""
        t: int | None
        if self.units == "steps":
            t = self.last_epoch + 1 - self.steps_skipped
        else:
            t = self.tokens_through_current_step()
            if t is None:
                return 0.0
        return wsd_factor(
            t,
            warmup=self.warmup,
            total=self.total,
            decay=self.decay,
            decay_shape=self.decay_shape,
            min_lr_ratio=self.min_lr_ratio,
        )
