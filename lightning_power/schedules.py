"""Learning-rate schedules as pure functions of the units consumed (tokens or steps). No torch here.

- :func:`power_lr`: the Power scheduler, Shen et al. 2024, "Power Scheduler: A Batch Size and Token Number Agnostic
  Learning Rate Scheduler", arXiv 2408.13359, Eq. 7-8.
- :func:`wsd_factor`: warmup-stable-decay (MiniCPM, arXiv 2404.06395; 1-sqrt cooldown from Hagele et al. 2024,
  arXiv 2405.18392).
- :func:`decay_shape`: the decay shapes g(u) both share, defined once.
- :func:`step_law_lr`, :func:`step_law_batch_tokens`: the Step Law optimum, Li et al. 2025, "Predictable Scale:
  Part I", arXiv 2503.04715.

Every function validates its arguments and raises ``ValueError`` naming the argument, the value and the accepted
range. The torch schedulers in :mod:`lightning_power.schedulers` call the same validators at construction.

Example::

    >>> round(power_lr(1e11, batch_tokens=1024 * 4096), 4)
    0.0101
    >>> wsd_factor(95, warmup=10, total=100, decay=10, decay_shape="linear")
    0.5
"""

from __future__ import annotations

import math

DECAY_SHAPES = ("linear", "cosine", "1-sqrt", "exponential")
"""Names accepted by ``decay_shape`` arguments."""


def decay_shape(u: float, shape: str) -> float:
    """The decay shape g(u) for progress ``u`` in [0, 1]: g(0) = 1, g(1) = 0, non-increasing.

    - ``"linear"``: 1 - u
    - ``"cosine"``: (1 + cos(pi u)) / 2
    - ``"1-sqrt"``: 1 - sqrt(u) (Hagele et al. 2024)
    - ``"exponential"``: (e^-u - e^-1) / (1 - e^-1), the normalized form of IBM's exponential decay with floor 0. It is
      never negative, unlike the unclamped original.
    """
    check_decay_shape(shape)
    if not 0.0 <= u <= 1.0:
        raise ValueError(f"u must be in [0, 1], got {u}")
    if shape == "linear":
        return 1.0 - u
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * u))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(u)
    return (math.exp(-u) - math.exp(-1.0)) / (1.0 - math.exp(-1.0))


def _decayed(t: float, decay_start: float, decay: float, shape: str, min_lr_ratio: float) -> float:
    """r + (1 - r) g(u), with u = (t - decay_start) / decay clipped to [0, 1]; the floor r once the decay is over."""
    u = 1.0 if decay == 0 else min(1.0, (t - decay_start) / decay)
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay_shape(u, shape)


def power_lr(
    n: float,
    *,
    batch_tokens: float,
    a: float = 4.0,
    b: float = -0.51,
    lr_max: float = 0.02,
    warmup_tokens: float = 0,
    decay_tokens: float = 0,
    total_tokens: float | None = None,
    decay_shape: str = "exponential",
    min_lr_ratio: float = 0.0,
    reference_sequence_length: int = 4096,
    batch_exponent: float = 1.0,
) -> float:
    """The Power scheduler's LR after ``n`` tokens (arXiv 2408.13359, Eq. 7-8).

    With beta = ``batch_tokens / reference_sequence_length`` (the batch in the paper's 4096-token sequences),
    p = ``batch_exponent``, N_w = ``warmup_tokens``, N = ``total_tokens`` and N_d = ``decay_tokens``:

    - eta_power(n) = min(lr_max, beta^p * a * n^b)                                    (Eq. 7)
    - n < N_w:              (n / N_w) * eta_power(N_w)    (linear up to the power value at N_w, not to lr_max)
    - N_w <= n <= N - N_d:  eta_power(n)
    - n > N - N_d:          eta_power(N - N_d) * [r + (1 - r) g(u)],  u = (n - (N - N_d)) / N_d clipped to [0, 1]

    r is ``min_lr_ratio`` and g is :func:`decay_shape`. Without ``total_tokens`` there is no decay: the schedule
    needs no horizon. After N the LR is held at the floor. The paper's law is linear in the batch (p = 1, its
    Hypothesis 1); a sweep that finds another p (``lightning_power.calibrate``) sets it here.
    """
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
    check_positive("batch_tokens", batch_tokens)
    check_non_negative("n", n)
    beta = batch_tokens / reference_sequence_length

    def eta_power(tokens: float) -> float:  # Eq. 7
        if tokens == 0:  # the limit of beta * a * n^b as n -> 0+ is +inf, so the cap binds; never evaluate 0^b
            return lr_max
        log_lr = (
            batch_exponent * math.log(beta) + math.log(a) + b * math.log(tokens)
        )  # in log space: a tiny n with a steep b cannot overflow
        return lr_max if log_lr >= math.log(lr_max) else min(lr_max, math.exp(log_lr))

    decay_start = math.inf if total_tokens is None else total_tokens - decay_tokens
    if n > decay_start:
        return eta_power(decay_start) * _decayed(n, decay_start, decay_tokens, decay_shape, min_lr_ratio)
    if n < warmup_tokens:
        return n / warmup_tokens * eta_power(warmup_tokens)
    return eta_power(n)


def wsd_factor(
    t: float,
    *,
    warmup: float,
    total: float,
    decay: float,
    decay_shape: str = "1-sqrt",
    min_lr_ratio: float = 0.0,
) -> float:
    """The warmup-stable-decay LR factor in [0, 1] after ``t`` units (steps or tokens).

    - t < warmup:                 t / warmup (linear from 0)
    - warmup <= t <= total-decay: 1
    - t > total - decay:          r + (1 - r) g(u),  u = (t - (total - decay)) / decay clipped to [0, 1]

    r is ``min_lr_ratio`` and g is :func:`decay_shape`. After ``total`` the factor is held at r.
    """
    check_wsd_args(warmup=warmup, total=total, decay=decay, decay_shape=decay_shape, min_lr_ratio=min_lr_ratio)
    check_non_negative("t", t)
    decay_start = total - decay
    if t > decay_start:
        return _decayed(t, decay_start, decay, decay_shape, min_lr_ratio)
    if t < warmup:
        return t / warmup
    return 1.0


def step_law_lr(params: float, tokens: float) -> float:
    """Step Law optimal peak LR, eta = 1.79 N^-0.713 D^0.307 (arXiv 2503.04715).

    ``params`` is N, the non-embedding parameters; ``tokens`` is D, the training tokens.
    """
    check_positive("params", params)
    check_positive("tokens", tokens)
    return 1.79 * params**-0.713 * tokens**0.307


def step_law_batch_tokens(tokens: float) -> float:
    """Step Law optimal batch size in tokens, B = 0.58 D^0.571 (arXiv 2503.04715); D is the training tokens."""
    check_positive("tokens", tokens)
    return 0.58 * tokens**0.571


# --- validation, shared by the functions above and the torch schedulers --------------------------------------------


def check_positive(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value > 0`` (NaN fails too)."""
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_non_negative(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value >= 0`` (NaN fails too)."""
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_decay_shape(shape: str) -> None:
    """Raise ``ValueError`` unless ``shape`` is one of :data:`DECAY_SHAPES`."""
    if shape not in DECAY_SHAPES:
        raise ValueError(f"decay_shape must be one of {DECAY_SHAPES}, got {shape!r}")


def check_batch_exponent(batch_exponent: float) -> None:
    """p in the Power law's beta^p must lie in [0, 2]."""
    if not (isinstance(batch_exponent, (int, float)) and 0 <= batch_exponent <= 2):
        raise ValueError(
            f"batch_exponent must be a number in [0, 2] (1: the LR grows linearly with the batch, as in the paper; "
            f"0.5: with its square root), got {batch_exponent!r}"
        )


def check_min_lr_ratio(min_lr_ratio: float) -> None:
    """Raise ``ValueError`` unless ``min_lr_ratio`` is in [0, 1)."""
    if not 0.0 <= min_lr_ratio < 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1), got {min_lr_ratio!r}")


def _check_phases(
    warmup_name: str, warmup: float, decay_name: str, decay: float, total_name: str, total: float
) -> None:
    check_non_negative(warmup_name, warmup)
    check_non_negative(decay_name, decay)
    check_positive(total_name, total)
    if warmup + decay > total:
        raise ValueError(
            f"{warmup_name} + {decay_name} must be <= {total_name}, got {warmup} + {decay} = {warmup + decay} > {total}"
        )


def check_power_args(
    *,
    a: float,
    b: float,
    lr_max: float,
    warmup_tokens: float,
    decay_tokens: float,
    total_tokens: float | None,
    decay_shape: str,
    min_lr_ratio: float,
    reference_sequence_length: int,
    batch_exponent: float = 1.0,
) -> None:
    """Validate the Power scheduler's settings (see :func:`power_lr`)."""
    check_positive("a", a)
    if not b < 0:
        raise ValueError(f"b must be < 0 (the LR decreases as tokens grow), got {b!r}")
    check_positive("lr_max", lr_max)
    check_positive("reference_sequence_length", reference_sequence_length)
    check_batch_exponent(batch_exponent)
    if total_tokens is None:
        check_non_negative("warmup_tokens", warmup_tokens)
        if decay_tokens != 0:
            raise ValueError(f"decay_tokens={decay_tokens!r} needs total_tokens (the decay ends at total_tokens)")
    else:
        _check_phases("warmup_tokens", warmup_tokens, "decay_tokens", decay_tokens, "total_tokens", total_tokens)
    check_decay_shape(decay_shape)
    check_min_lr_ratio(min_lr_ratio)


def check_wsd_args(*, warmup: float, total: float, decay: float, decay_shape: str, min_lr_ratio: float) -> None:
    """Validate the WSD settings (see :func:`wsd_factor`)."""
    _check_phases("warmup", warmup, "decay", decay, "total", total)
    check_decay_shape(decay_shape)
    check_min_lr_ratio(min_lr_ratio)
