"""The pure schedules against hand-computed values, phase continuity, bad input and hypothesis properties."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_power.schedules import (
    DECAY_SHAPES,
    decay_shape,
    power_lr,
    step_law_batch_tokens,
    step_law_lr,
    wsd_factor,
)

POWERLM_BATCH = 1024 * 4096  # the paper's 1B runs: 1024 sequences of 4096 tokens


def normalized_exp(u):
    return (math.exp(-u) - 1 / math.e) / (1 - 1 / math.e)


@pytest.mark.parametrize(
    ("shape", "at_half", "at_quarter"),
    [
        ("linear", 0.5, 0.75),
        ("cosine", 0.5, (1 + math.sqrt(0.5)) / 2),
        ("1-sqrt", 1 - math.sqrt(0.5), 0.5),
        ("exponential", normalized_exp(0.5), normalized_exp(0.25)),
    ],
)
def test_decay_shapes_by_hand(shape, at_half, at_quarter):
    assert decay_shape(0.0, shape) == 1.0
    assert decay_shape(1.0, shape) == 0.0
    assert decay_shape(0.5, shape) == pytest.approx(at_half, rel=1e-12)
    assert decay_shape(0.25, shape) == pytest.approx(at_quarter, rel=1e-12)


@pytest.mark.parametrize("u", [-0.1, 1.5])
def test_decay_shape_refuses_progress_outside_0_1(u):
    with pytest.raises(ValueError, match=r"^u must be in \[0, 1\], got"):
        decay_shape(u, "linear")


def test_power_paper_numbers():
    # cap binds until n* = (0.02 / (1024 * 4))^(1 / -0.51) = 2.596e10 tokens
    assert power_lr(2.5e10, batch_tokens=POWERLM_BATCH) == 0.02
    assert power_lr(2.7e10, batch_tokens=POWERLM_BATCH) < 0.02
    assert power_lr(1e11, batch_tokens=POWERLM_BATCH) == pytest.approx(0.0101, abs=5e-5)
    assert power_lr(1e12, batch_tokens=POWERLM_BATCH) == pytest.approx(0.0031, abs=5e-5)
    assert power_lr(1e12, batch_tokens=POWERLM_BATCH) == pytest.approx(1024 * 4 * 1e12**-0.51, rel=1e-12)


def test_power_batch_size_enters_linearly_below_the_cap():
    small = power_lr(1e12, batch_tokens=POWERLM_BATCH // 4)
    assert small == pytest.approx(power_lr(1e12, batch_tokens=POWERLM_BATCH) / 4, rel=1e-12)


def test_power_beta_counts_the_batch_in_sequences_of_the_reference_length():
    # 512 sequences of 2048 tokens are beta = 512 at the default 4096, beta = 1024 at a 2048 reference
    half_batch = POWERLM_BATCH // 2
    short_reference = power_lr(1e12, batch_tokens=half_batch, reference_sequence_length=2048)
    assert short_reference == pytest.approx(power_lr(1e12, batch_tokens=POWERLM_BATCH), rel=1e-12)
    assert short_reference == pytest.approx(2 * power_lr(1e12, batch_tokens=half_batch), rel=1e-12)


def test_power_warmup_rises_linearly_to_the_power_value_at_its_end():
    # beta = 1, a = 4, b = -0.5: eta_power(n) = 4 / sqrt(n); warmup 1e6 -> eta_power(1e6) = 0.004 (below lr_max 0.02)
    kwargs = dict(batch_tokens=4096, a=4.0, b=-0.5, lr_max=0.02, warmup_tokens=1e6)
    assert power_lr(0, **kwargs) == 0.0
    assert power_lr(2.5e5, **kwargs) == pytest.approx(0.001, rel=1e-12)
    assert power_lr(1e6, **kwargs) == pytest.approx(0.004, rel=1e-12)
    assert power_lr(4e6, **kwargs) == pytest.approx(0.002, rel=1e-12)


def test_power_decay_is_anchored_where_it_starts():
    # eta_power(n) = 4 / sqrt(n); decay over [8e6, 1e7] from eta_power(8e6), floor 0.1
    kwargs = dict(batch_tokens=4096, a=4.0, b=-0.5, decay_tokens=2e6, total_tokens=1e7, min_lr_ratio=0.1)
    anchor = 4 / math.sqrt(8e6)
    g_half = normalized_exp(0.5)
    assert power_lr(8e6, **kwargs) == pytest.approx(anchor, rel=1e-12)
    assert power_lr(9e6, **kwargs) == pytest.approx(anchor * (0.1 + 0.9 * g_half), rel=1e-12)
    assert power_lr(1e7, **kwargs) == pytest.approx(anchor * 0.1, rel=1e-12)
    assert power_lr(5e7, **kwargs) == pytest.approx(anchor * 0.1, rel=1e-12)  # held at the floor
    assert power_lr(9e6, **kwargs, decay_shape="linear") == pytest.approx(anchor * (0.1 + 0.9 * 0.5), rel=1e-12)


def test_power_without_total_never_decays_and_zero_decay_drops_to_the_floor_after_total():
    assert power_lr(1e15, batch_tokens=4096, a=4.0, b=-0.5) == pytest.approx(4 / math.sqrt(1e15), rel=1e-12)
    kwargs = dict(batch_tokens=4096, a=4.0, b=-0.5, total_tokens=1e6, min_lr_ratio=0.5)
    assert power_lr(1e6, **kwargs) == pytest.approx(0.004, rel=1e-12)
    assert power_lr(1e6 + 1, **kwargs) == pytest.approx(0.002, rel=1e-12)


def test_power_zero_tokens_is_finite():
    assert power_lr(0, batch_tokens=4096) == 0.02  # no warmup: 0^b is never evaluated, the cap binds
    assert power_lr(1e-300, batch_tokens=4096, b=-5.0) == 0.02  # no overflow for a steep exponent


@pytest.mark.parametrize("boundary", ["warmup", "decay_start", "total"])
def test_power_is_continuous_at_phase_boundaries(boundary):
    kwargs = dict(batch_tokens=4096, a=4.0, b=-0.5, warmup_tokens=1e6, decay_tokens=2e6, total_tokens=1e7)
    x = {"warmup": 1e6, "decay_start": 8e6, "total": 1e7}[boundary]
    eps = x * 1e-9
    left, right = power_lr(x - eps, **kwargs), power_lr(x + eps, **kwargs)
    assert left == pytest.approx(power_lr(x, **kwargs), rel=1e-6, abs=1e-9)
    assert right == pytest.approx(power_lr(x, **kwargs), rel=1e-6, abs=1e-9)


def test_wsd_by_hand():
    kwargs = dict(warmup=10, total=100, decay=20, decay_shape="1-sqrt", min_lr_ratio=0.1)
    assert wsd_factor(0, **kwargs) == 0.0
    assert wsd_factor(5, **kwargs) == 0.5
    assert wsd_factor(10, **kwargs) == 1.0
    assert wsd_factor(80, **kwargs) == 1.0
    assert wsd_factor(85, **kwargs) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25)), rel=1e-12)
    assert wsd_factor(100, **kwargs) == pytest.approx(0.1, rel=1e-12)
    assert wsd_factor(1000, **kwargs) == pytest.approx(0.1, rel=1e-12)


def test_wsd_without_decay_holds_1_through_total_then_drops_to_the_floor():
    kwargs = dict(warmup=10, total=100, decay=0, min_lr_ratio=0.25)
    assert wsd_factor(100, **kwargs) == 1.0
    assert wsd_factor(100.5, **kwargs) == 0.25


@pytest.mark.parametrize("boundary", [10, 80, 100])
def test_wsd_is_continuous_at_phase_boundaries(boundary):
    for shape in DECAY_SHAPES:
        kwargs = dict(warmup=10, total=100, decay=20, decay_shape=shape, min_lr_ratio=0.2)
        at = wsd_factor(boundary, **kwargs)
        assert wsd_factor(boundary - 1e-9, **kwargs) == pytest.approx(at, abs=1e-4)
        assert wsd_factor(boundary + 1e-9, **kwargs) == pytest.approx(at, abs=1e-4)


def test_step_law_by_hand():
    # log10 eta = log10 1.79 - 0.713 * 9 + 0.307 * 11 = -2.7871 ; log10 B = log10 0.58 + 0.571 * 11 = 6.0444
    assert step_law_lr(1e9, 1e11) == pytest.approx(10**-2.7871, rel=1e-3)
    assert step_law_batch_tokens(1e11) == pytest.approx(10**6.0444, rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(b=0.0), "b"),
        (dict(b=0.5), "b"),
        (dict(a=0.0), "a"),
        (dict(a=-1.0), "a"),
        (dict(lr_max=0.0), "lr_max"),
        (dict(warmup_tokens=-1), "warmup_tokens"),
        (dict(warmup_tokens=6, decay_tokens=5, total_tokens=10), "warmup_tokens \\+ decay_tokens"),
        (dict(decay_tokens=5), "decay_tokens"),
        (dict(decay_tokens=-1, total_tokens=10), "decay_tokens"),
        (dict(warmup_tokens=math.nan), "warmup_tokens"),
        (dict(decay_shape="step"), "decay_shape"),
        (dict(min_lr_ratio=1.0), "min_lr_ratio"),
        (dict(min_lr_ratio=-0.1), "min_lr_ratio"),
        (dict(batch_tokens=0), "batch_tokens"),
        (dict(reference_sequence_length=0), "reference_sequence_length"),
        (dict(batch_exponent=-0.5), "batch_exponent"),
        (dict(batch_exponent=2.5), "batch_exponent"),
        (dict(batch_exponent="sqrt"), "batch_exponent"),
    ],
)
def test_power_bad_input_names_the_argument(kwargs, argument):
    kwargs = {"batch_tokens": 4096, **kwargs}
    with pytest.raises(ValueError, match=f"^{argument}"):
        power_lr(100, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(warmup=-1), "warmup"),
        (dict(warmup=60, decay=50), "warmup \\+ decay"),
        (dict(decay=-1), "decay"),
        (dict(warmup=math.nan), "warmup"),
        (dict(total=0, warmup=0, decay=0), "total"),
        (dict(decay_shape="cos"), "decay_shape"),
        (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    ],
)
def test_wsd_bad_input_names_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument}"):
        wsd_factor(1, **{"warmup": 10, "total": 100, "decay": 20, **kwargs})


def test_nan_progress_is_refused():
    with pytest.raises(ValueError, match="^n must be >= 0, got nan"):
        power_lr(math.nan, batch_tokens=4096)
    with pytest.raises(ValueError, match="^t must be >= 0, got nan"):
        wsd_factor(math.nan, warmup=10, total=100, decay=20)


def test_step_law_bad_input():
    with pytest.raises(ValueError, match="^params"):
        step_law_lr(0, 1e9)
    with pytest.raises(ValueError, match="^tokens"):
        step_law_batch_tokens(-1)


# --- properties ------------------------------------------------------------------------------------------------------

TOLERANCE = 1e-12  # libm exp/log/cos are not guaranteed monotone to the last ulp


@st.composite
def power_settings(draw):
    total = draw(st.one_of(st.none(), st.integers(1, 10**13)))
    if total is None:
        warmup, decay = draw(st.integers(0, 10**12)), 0
    else:
        warmup = draw(st.integers(0, total))
        decay = draw(st.integers(0, total - warmup))
    return dict(
        batch_tokens=draw(st.integers(1, 10**8)),
        a=draw(st.floats(0.01, 100)),
        b=draw(st.floats(-2.0, -0.01)),
        lr_max=draw(st.floats(1e-6, 1.0)),
        warmup_tokens=warmup,
        decay_tokens=decay,
        total_tokens=total,
        decay_shape=draw(st.sampled_from(DECAY_SHAPES)),
        min_lr_ratio=draw(st.floats(0.0, 0.99)),
    )


@settings(max_examples=200, deadline=None)
@given(power_settings(), st.integers(0, 10**14), st.integers(0, 10**14))
def test_power_properties(kwargs, n1, n2):
    lo, hi = sorted((n1, n2))
    lr_lo, lr_hi = power_lr(lo, **kwargs), power_lr(hi, **kwargs)
    for lr in (lr_lo, lr_hi):
        assert math.isfinite(lr) and 0.0 <= lr <= kwargs["lr_max"]
    if lo >= kwargs["warmup_tokens"]:
        assert lr_hi <= lr_lo * (1 + TOLERANCE)  # non-increasing after warmup
    total = kwargs["total_tokens"]
    if total is not None and hi >= total:
        start = total - kwargs["decay_tokens"]
        beta = kwargs["batch_tokens"] / 4096
        anchor = kwargs["lr_max"] if start == 0 else min(kwargs["lr_max"], beta * kwargs["a"] * start ** kwargs["b"])
        floor = anchor * kwargs["min_lr_ratio"]
        if hi > total or kwargs["decay_tokens"] > 0:
            assert lr_hi == pytest.approx(floor, rel=1e-9, abs=1e-300)  # the floor is reached at the end and held


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 10**9).flatmap(
        lambda total: st.tuples(st.just(total), st.integers(0, total)).flatmap(
            lambda tw: st.tuples(st.just(tw[0]), st.just(tw[1]), st.integers(0, tw[0] - tw[1]))
        )
    ),
    st.sampled_from(DECAY_SHAPES),
    st.floats(0.0, 0.99),
    st.integers(0, 2 * 10**9),
    st.integers(0, 2 * 10**9),
)
def test_wsd_properties(phases, shape, min_lr_ratio, t1, t2):
    total, warmup, decay = phases
    kwargs = dict(warmup=warmup, total=total, decay=decay, decay_shape=shape, min_lr_ratio=min_lr_ratio)
    lo, hi = sorted((t1, t2))
    f_lo, f_hi = wsd_factor(lo, **kwargs), wsd_factor(hi, **kwargs)
    assert 0.0 <= f_lo <= 1.0 and 0.0 <= f_hi <= 1.0
    if lo >= warmup:
        assert f_hi <= f_lo * (1 + TOLERANCE)
    if hi > total or (hi == total and decay > 0):
        assert f_hi == pytest.approx(min_lr_ratio, abs=1e-15)
