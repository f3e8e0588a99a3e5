"""Calibrate the Power scheduler to your own model and data: fit eta_opt = beta * a * T^b from a WSD sweep.

Shen et al. 2024 ("Power Scheduler", arXiv 2408.13359, section 3) train WSD runs over a grid of batch sizes beta,
token budgets T and learning rates, take each (beta, T) cell's optimal LR, and fit ``eta_opt / beta = a * T^b``
(Eq. 3-4; their RedPajama fit is a = 4.6, b = -0.51, Eq. 5). The Power scheduler then uses
``min(lr_max, beta * a * n^b)`` with n the tokens seen so far (Eq. 7). This module does the same for any sweep:

1. :func:`cell_optima`: per (batch, tokens) cell, the optimal LR from a parabola in log2(LR) (:func:`optimal_log2_lr`).
2. :func:`fit_power_law`: least squares of ``ln(eta_opt / beta^p) = ln a + b ln T``, with standard errors. The paper
   fixes p = 1 (Hypothesis 1: eta_opt grows linearly with the batch); ``batch_exponent=None`` fits p as well, for
   models and batch sizes where it does not (Adam below the critical batch often follows p = 0.5). Either fit reports
   the free estimate of p, so the hypothesis is tested on every sweep.
3. :meth:`PowerLawFit.scheduler_yaml`: the ``lr_scheduler:`` (and ``optimizer:``) YAML for ``lightning-power fit``.

beta is the batch in sequences of ``reference_sequence_length`` tokens (4096 in the paper, and the
:class:`~lightning_power.schedulers.PowerScheduler` default), so ``a`` means the same thing here and there. Under muP
the LR is the base LR, the one given to ``MuPPlan.param_groups``.

Example::

    >>> from lightning_power.calibrate import SweepRun, cell_optima, fit_power_law
    >>> runs = [  # loss is a parabola in log2(lr) around eta_opt = (batch / 4096) * 4 * T^-0.5
    ...     SweepRun(batch, tokens, 2.0**k, 3.0 + (k - math.log2(batch / 4096 * 4 * tokens**-0.5)) ** 2)
    ...     for batch in (4096, 16384) for tokens in (1e6, 4e6, 1.6e7) for k in range(-12, -2)
    ... ]
    >>> fit = fit_power_law(cell_optima(runs))
    >>> round(fit.a, 6), round(fit.b, 6)
    (4.0, -0.5)

Command line (``runs.csv`` has the columns ``batch_tokens,tokens,lr,loss``, one row per run)::

    lightning-power calibrate runs.csv --tokens-per-step 131072 --total-tokens 2e10
    python -m lightning_power.calibrate runs.csv          # the same
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_power.schedules import check_batch_exponent, check_positive, check_power_args, power_lr

PAPER_A, PAPER_B = 4.6, -0.51  # the paper's own fit on RedPajama (arXiv 2408.13359, Eq. 5)
MIN_CELLS = 3  # two parameters and at least one degree of freedom for the uncertainty
REJECT_SIGMAS = 2.0  # a free batch exponent further than this many standard errors from p rejects a law with that p
RUN_COLUMNS = ("batch_tokens", "tokens", "lr", "loss")  # of a sweep file (CSV header or JSON keys)


@dataclass(frozen=True)
class SweepRun:
    """One finished WSD run: tokens per optimizer step, training tokens, base LR and final loss.

    A diverged run has ``loss`` NaN or infinite; it counts as worse than every finite loss.
    """

    batch_tokens: float
    tokens: float
    lr: float
    loss: float


@dataclass(frozen=True)
class CellOptimum:
    """The optimal LR of one (batch, tokens) cell; ``interior`` is ``False`` when the best LR is at the grid's edge
    (then ``lr`` is only a bound, and :func:`fit_power_law` leaves the cell out)."""

    batch_tokens: float
    tokens: float
    lr: float
    interior: bool


def optimal_log2_lr(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float, bool]:
    """log2 of the loss-minimising LR, and whether it lies inside the grid.

    The vertex of the parabola in log2(lr) through the best grid point and its two neighbours (exact for a quadratic,
    any spacing). When the best point is the smallest or largest LR, or a neighbour diverged (NaN or inf loss),
    its own log2(lr) comes back with ``False``. LRs must be distinct and positive.
    """
    if len(lrs) != len(losses) or not lrs:
        raise ValueError(f"lrs and losses must be non-empty and of equal length, got {len(lrs)} and {len(losses)}")
    if any(not lr > 0 for lr in lrs):
        raise ValueError(f"lrs must all be > 0, got {list(lrs)}")
    order = sorted(range(len(lrs)), key=lambda i: lrs[i])
    x = np.log2([lrs[i] for i in order])
    y = np.array([losses[i] for i in order], dtype=float)
    if np.any(np.diff(x) == 0):
        raise ValueError(f"lrs must be distinct (average repeated runs first), got {sorted(lrs)}")
    y[~np.isfinite(y)] = np.inf
    if not np.isfinite(y).any():
        raise ValueError("every run diverged (no finite loss): lower the LR grid")
    best = int(np.argmin(y))
    if best == 0 or best == len(x) - 1 or not np.isfinite(y[best - 1 : best + 2]).all():
        return float(x[best]), False
    curvature, slope, _ = np.polyfit(x[best - 1 : best + 2], y[best - 1 : best + 2], 2)
    if curvature <= 0:  # three equal losses: no curvature, the grid point is as good as any
        return float(x[best]), True
    return float(np.clip(-slope / (2 * curvature), x[best - 1], x[best + 1])), True


def cell_optima(runs: Iterable[SweepRun]) -> list[CellOptimum]:
    """The optimal LR of every (batch_tokens, tokens) cell; repeated runs (seeds) at one LR are averaged first.

    A cell with a diverged run at some LR counts that LR as diverged; a cell where every LR diverged comes back as an
    edge cell at its smallest LR (an upper bound), which :func:`fit_power_law` leaves out. Cells come back sorted by
    (batch, tokens).
    """
    losses: dict[tuple[float, float], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for name in ("batch_tokens", "tokens", "lr"):
            check_positive(name, getattr(run, name))
        losses[(run.batch_tokens, run.tokens)][run.lr].append(run.loss)
    if not losses:
        raise ValueError("runs is empty: give the finished runs of a WSD sweep")
    optima = []
    for (batch, tokens), by_lr in sorted(losses.items()):
        lrs = sorted(by_lr)
        means = [float(np.mean(by_lr[lr])) if np.isfinite(by_lr[lr]).all() else math.inf for lr in lrs]
        if not np.isfinite(means).any():
            optima.append(CellOptimum(batch, tokens, lrs[0], interior=False))
            continue
        log2_lr, interior = optimal_log2_lr(lrs, means)
        optima.append(CellOptimum(batch, tokens, 2.0**log2_lr, interior))
    return optima


@dataclass(frozen=True)
class PowerLawFit:
    """``eta_opt = beta^p * a * T^b`` fitted in log space; the uncertainties are standard errors (1 sigma).

    The law is ``eta_opt = beta^p * a * T^b`` with p = ``batch_exponent``: 1 as in the paper, or fitted
    (``batch_exponent_stderr`` is then its standard error, else ``None``). ``log_a_stderr`` is the standard error of
    ln(a), so a 1-sigma range of ``a`` is ``a * exp(+-log_a_stderr)``. ``free_batch_exponent`` is p in the free fit
    ``eta_opt ~ beta^p * T^b'`` whatever the law: a p several standard errors from 1 rejects the paper's Hypothesis 1
    on this sweep. It is ``None`` without two batch sizes and four cells.
    """

    a: float
    b: float
    log_a_stderr: float
    b_stderr: float
    covariance: tuple[tuple[float, float], tuple[float, float]]  # of (ln a, b)
    residual_std: float  # of ln(eta_opt / beta), in natural-log units
    cells: tuple[CellOptimum, ...]  # the interior cells that entered the fit
    excluded: tuple[CellOptimum, ...]  # the edge cells that did not
    reference_sequence_length: int
    batch_exponent: float
    batch_exponent_stderr: float | None
    free_batch_exponent: float | None
    free_batch_exponent_stderr: float | None

    @property
    def a_stderr(self) -> float:
        """Standard error of ``a`` (delta method: ``a * log_a_stderr``)."""
        return self.a * self.log_a_stderr

    def free_batch_exponent_sigmas(self, p: float = 1.0) -> float | None:
        """How many standard errors the free batch exponent lies from ``p``: more than ``REJECT_SIGMAS`` rejects a law
        with that p on this sweep. ``None`` without a free fit, or when its standard error is 0 (noise-free cells)."""
        if self.free_batch_exponent is None or not self.free_batch_exponent_stderr:
            return None
        return abs(self.free_batch_exponent - p) / self.free_batch_exponent_stderr

    @property
    def max_optimal_lr(self) -> float:
        """The largest optimal LR among the fitted cells: the default ``lr_max``, the cap on the early LR."""
        return max(c.lr for c in self.cells)

    def lr(self, batch_tokens: float, tokens: float) -> float:
        """The fitted optimal LR of a ``tokens``-token WSD run at ``batch_tokens`` tokens per step (uncapped)."""
        return power_lr(
            tokens,
            batch_tokens=batch_tokens,
            a=self.a,
            b=self.b,
            lr_max=math.inf,
            reference_sequence_length=self.reference_sequence_length,
            batch_exponent=self.batch_exponent,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers, lists and strings (JSON)."""
        cell = lambda c: {"batch_tokens": c.batch_tokens, "tokens": c.tokens, "lr": c.lr, "interior": c.interior}
        return {
            "a": self.a,
            "b": self.b,
            "a_stderr": self.a_stderr,
            "log_a_stderr": self.log_a_stderr,
            "b_stderr": self.b_stderr,
            "covariance_log_a_b": [list(row) for row in self.covariance],
            "residual_std": self.residual_std,
            "reference_sequence_length": self.reference_sequence_length,
            "batch_exponent": self.batch_exponent,
            "batch_exponent_stderr": self.batch_exponent_stderr,
            "free_batch_exponent": self.free_batch_exponent,
            "free_batch_exponent_stderr": self.free_batch_exponent_stderr,
            "cells": [cell(c) for c in self.cells],
            "excluded": [cell(c) for c in self.excluded],
        }

    def scheduler_yaml(
        self,
        lr_max: float,
        tokens_per_step: int | None = None,
        warmup_tokens: int = 0,
        total_tokens: int | None = None,
        decay_fraction: float = 0.1,
        decay_shape: str = "exponential",
        a: float | None = None,
    ) -> str:
        """``optimizer:`` and ``lr_scheduler:`` YAML for ``lightning-power fit`` with this fit's ``a`` and ``b``.

        The optimizer LR is ``lr_max``, the LR the schedule scales (under muP, the base LR). With ``total_tokens``
        the run ends with a decay over its last ``decay_fraction`` (the paper: exponential to 0 over the last 10 %);
        without it the schedule has no horizon. Leave ``tokens_per_step`` out when a ``TokenCounter`` measures it.
        ``a`` replaces the fit's amplitude when a search of the Power scheduler itself chose another (the paper
        fitted 4.6 and chose 4 after such a search, arXiv 2408.13359 sec. 4).
        """
        amplitude = self.a if a is None else a
        if not 0 <= decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in [0, 1], got {decay_fraction!r}")
        if not self.b < 0:
            raise ValueError(
                f"the fitted b = {self.b:.4g} +- {self.b_stderr:.2g} is not negative: in this sweep the optimal LR did "
                "not fall as the token budget grew, so no PowerScheduler follows it. Widen the range of token budgets, "
                "or average more seeds per LR"
            )
        decay_tokens = 0 if total_tokens is None else int(decay_fraction * total_tokens)
        check_power_args(
            a=amplitude,
            b=self.b,
            lr_max=lr_max,
            warmup_tokens=warmup_tokens,
            decay_tokens=decay_tokens,
            total_tokens=total_tokens,
            decay_shape=decay_shape,
            min_lr_ratio=0.0,
            reference_sequence_length=self.reference_sequence_length,
            batch_exponent=self.batch_exponent,
        )
        args: dict[str, Any] = {"a": yaml_float(amplitude), "b": yaml_float(self.b), "lr_max": yaml_float(lr_max)}
        if tokens_per_step is not None:
            args["tokens_per_step"] = int(tokens_per_step)
        counter = (
            []
            if tokens_per_step is not None
            else ["# No tokens_per_step: add lightning_power.tokens.TokenCounter to trainer.callbacks to count tokens."]
        )
        args["warmup_tokens"] = int(warmup_tokens)
        if total_tokens is not None:
            args["total_tokens"] = int(total_tokens)
            args["decay_tokens"] = decay_tokens
            args["decay_shape"] = decay_shape
        if self.reference_sequence_length != 4096:
            args["reference_sequence_length"] = self.reference_sequence_length
        if self.batch_exponent != 1.0:
            args["batch_exponent"] = yaml_float(self.batch_exponent)
        lines = [
            f"# Power scheduler calibrated on {len(self.cells)} WSD cells: eta_opt = {_law(self.batch_exponent)} with",
            (
                f"# a = {self.a:.4g} (1 sigma: x{math.exp(self.log_a_stderr):.3g}), "
                f"b = {self.b:.4f} +- {self.b_stderr:.4f}{_fitted_p(self)}; "
                f"beta = batch tokens / {self.reference_sequence_length}."
            ),
            *(
                []
                if a is None
                else [f"# a = {amplitude:.4g} (the fit's a x {amplitude / self.a:.3g}), searched with Power runs."]
            ),
            *counter,
            *optimizer_yaml(lr_max),
            "lr_scheduler:",
            "  class_path: lightning_power.schedulers.PowerScheduler",
            "  init_args:",
            *(f"    {key}: {value}" for key, value in args.items()),
        ]
        return "\n".join(lines) + "\n"


def fit_power_law(
    optima: Sequence[CellOptimum], reference_sequence_length: int = 4096, batch_exponent: float | None = 1.0
) -> PowerLawFit:
    """Fit ``ln(eta_opt / beta^p) = ln a + b ln T`` by least squares over the interior cells (arXiv 2408.13359, Eq. 4).

    beta = ``batch_tokens / reference_sequence_length`` and p = ``batch_exponent``: 1 is the paper's law; ``None``
    fits p too (``ln eta_opt = ln a + p ln beta + b ln T``; needs >= 4 interior cells over >= 2 batch sizes). Needs at
    least 3 interior cells spanning 2 token counts; the covariance is ``s^2 (X^T X)^-1`` with ``s^2`` the residual
    variance on ``n - k`` degrees of freedom.
    """
    check_positive("reference_sequence_length", reference_sequence_length)
    if batch_exponent is not None:
        check_batch_exponent(batch_exponent)  # the range the scheduler accepts
    cells = tuple(c for c in optima if c.interior)
    excluded = tuple(c for c in optima if not c.interior)
    if len(cells) < MIN_CELLS or len({c.tokens for c in cells}) < 2:
        raise ValueError(
            f"optima must hold >= {MIN_CELLS} cells whose best LR is inside the LR grid, over >= 2 token counts; got "
            f"{len(cells)} interior cells over {len({c.tokens for c in cells})} token count(s) ({len(excluded)} cells "
            "had their best LR at the grid's edge: widen the LR grid)"
        )
    log_beta = np.log([c.batch_tokens / reference_sequence_length for c in cells])
    log_t = np.log([c.tokens for c in cells])
    log_lr = np.log([c.lr for c in cells])
    free_p = free_p_stderr = None
    free = np.column_stack([np.ones_like(log_t), log_beta, log_t])
    if len(cells) >= 4 and np.linalg.matrix_rank(free) == 3:  # needs batch sizes that vary apart from T
        free_coef, free_cov, free_residual = _least_squares(free, log_lr)
        free_p, free_p_stderr = float(free_coef[1]), float(math.sqrt(free_cov[1, 1]))
    if batch_exponent is None:
        if free_p is None:
            raise ValueError(
                "batch_exponent=None fits the batch exponent, which needs >= 4 interior cells over >= 2 batch sizes "
                f"that vary apart from the token count; got {len(cells)} interior cells over "
                f"{len({c.batch_tokens for c in cells})} batch size(s)"
            )
        keep = [0, 2]  # (ln a, b) out of (ln a, p, b)
        log_a, b = free_coef[keep]
        cov, residual = free_cov[np.ix_(keep, keep)], free_residual
        p, p_stderr = free_p, free_p_stderr
    else:
        design = np.column_stack([np.ones_like(log_t), log_t])
        (log_a, b), cov, residual = _least_squares(design, log_lr - batch_exponent * log_beta)
        p, p_stderr = float(batch_exponent), None
    return PowerLawFit(
        a=float(math.exp(log_a)),
        b=float(b),
        log_a_stderr=float(math.sqrt(cov[0, 0])),
        b_stderr=float(math.sqrt(cov[1, 1])),
        covariance=((float(cov[0, 0]), float(cov[0, 1])), (float(cov[1, 0]), float(cov[1, 1]))),
        residual_std=residual,
        cells=cells,
        excluded=excluded,
        reference_sequence_length=reference_sequence_length,
        batch_exponent=p,
        batch_exponent_stderr=p_stderr,
        free_batch_exponent=free_p,
        free_batch_exponent_stderr=free_p_stderr,
    )


def _least_squares(design: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Coefficients, their covariance ``s^2 (X^T X)^-1`` and the residual std ``s`` (``n - k`` degrees of freedom)."""
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    dof = len(target) - design.shape[1]
    variance = float(np.sum((target - design @ coef) ** 2) / dof) if dof > 0 else math.nan
    return coef, variance * np.linalg.inv(design.T @ design), math.sqrt(variance)


def optimizer_yaml(lr_max: float) -> list[str]:
    """The YAML lines of the AdamW ``optimizer:`` a printed ``PowerScheduler`` needs: its LR is ``lr_max``."""
    note = "# = lr_max: the schedule multiplies each group's LR by power_lr(n) / lr_max"
    return ["optimizer:", "  class_path: torch.optim.AdamW", "  init_args:", f"    lr: {yaml_float(lr_max)}  {note}"]


def yaml_float(value: float) -> str:
    """``value`` to 6 significant digits, spelled so that every YAML reader takes it for a number: ``5.0e-05``, not
    ``5e-05``, which YAML 1.1 readers such as PyYAML's ``safe_load`` take for a string."""
    text = repr(float(f"{value:.6g}"))
    mantissa, exponent_mark, exponent = text.partition("e")
    if exponent_mark and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text


def _law(batch_exponent: float) -> str:
    return "beta * a * T^b" if batch_exponent == 1.0 else f"beta^{batch_exponent:.3g} * a * T^b"


def _fitted_p(fit: PowerLawFit) -> str:
    return (
        ""
        if fit.batch_exponent_stderr is None
        else f", p = {fit.batch_exponent:.3f} +- {fit.batch_exponent_stderr:.3f}"
    )


def read_runs(path: str | Path) -> list[SweepRun]:
    """Runs from a CSV (header ``batch_tokens,tokens,lr,loss``; more columns are ignored) or a JSON file (a list of
    such records, or an object whose ``"runs"`` holds them, as ``benchmarks/calibrate_power.py`` writes).
    A missing or empty loss is a diverged run."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        loaded = json.loads(path.read_text())
        records = loaded["runs"] if isinstance(loaded, Mapping) and "runs" in loaded else loaded
        where = [f"{path}: record {i}" for i in range(len(records))] if isinstance(records, list) else []
    else:
        with path.open(newline="", encoding="utf-8-sig") as file:  # utf-8-sig: spreadsheets write a BOM
            reader = csv.DictReader(file)
            records, where = [], []
            for record in reader:
                records.append(record)
                where.append(f"{path} line {reader.line_num}")
    if not isinstance(records, list) or not all(isinstance(r, Mapping) for r in records):
        raise ValueError(f"{path}: expected a list of records with keys batch_tokens, tokens, lr, loss")
    runs = []
    for record, place in zip(records, where):
        missing = [k for k in RUN_COLUMNS if k not in record]
        if missing:
            raise ValueError(f"{place} lacks {missing} (it has {list(record)}); each run needs {list(RUN_COLUMNS)}")
        batch_tokens, tokens, lr = (_finite_number(record[k], k, place) for k in RUN_COLUMNS[:3])
        loss = math.inf if record["loss"] in (None, "") else _number(record["loss"], "loss", place)
        runs.append(SweepRun(batch_tokens, tokens, lr, loss))
    return runs


def _number(value: Any, column: str, place: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{place}, column {column!r}: {value!r} is not a number") from None


def _finite_number(value: Any, column: str, place: str) -> float:
    number = _number(value, column, place)
    if not math.isfinite(number):
        raise ValueError(f"{place}, column {column!r}: {value!r} is not a finite number")
    return number


def format_fit(fit: PowerLawFit) -> str:
    """A table of the cells and the fitted law, each line prefixed with ``#`` so that it stays valid YAML."""
    gamma_name = "eta_opt/beta" if fit.batch_exponent == 1.0 else f"eta_opt/beta^{fit.batch_exponent:.2f}"
    lines = [f"# {'batch tokens':>14}{'tokens':>14}{'eta_opt':>12}{gamma_name:>19}  used"]
    for cell in sorted(fit.cells + fit.excluded, key=lambda c: (c.batch_tokens, c.tokens)):
        gamma = cell.lr / (cell.batch_tokens / fit.reference_sequence_length) ** fit.batch_exponent
        used = "yes" if cell.interior else "no (best LR at the grid's edge)"
        lines.append(f"# {cell.batch_tokens:>14.6g}{cell.tokens:>14.6g}{cell.lr:>12.4g}{gamma:>19.4g}  {used}")
    lines.append(
        f"# fit of eta_opt = {_law(fit.batch_exponent)}: a = {fit.a:.4g} +- {fit.a_stderr:.2g}, "
        f"b = {fit.b:.4f} +- {fit.b_stderr:.4f}{_fitted_p(fit)} (1 sigma), residual std {fit.residual_std:.3f} in "
        f"ln(LR); the paper's RedPajama fit: a = {PAPER_A}, b = {PAPER_B}, p = 1"
    )
    if fit.free_batch_exponent is not None:
        lines.append(
            f"# free batch exponent: eta_opt ~ beta^{fit.free_batch_exponent:.2f} +- "
            f"{fit.free_batch_exponent_stderr:.2f} (the paper's law assumes 1)"
        )
    sigmas = fit.free_batch_exponent_sigmas(fit.batch_exponent)
    if fit.batch_exponent_stderr is None and sigmas is not None and sigmas > REJECT_SIGMAS:
        lines.append(
            f"# this sweep rejects p = {fit.batch_exponent:g} by {sigmas:.1f} standard errors: the LR will not carry "
            "over between batch sizes; refit with --batch-exponent fit (fit_power_law(..., batch_exponent=None))"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-power calibrate",
        description="Fit the Power scheduler's a and b (eta_opt = beta * a * T^b, arXiv 2408.13359 section 3) to a WSD "
        "sweep over batch size x token count x LR, and print the PowerScheduler YAML.",
    )
    parser.add_argument("runs", help="CSV (columns batch_tokens,tokens,lr,loss) or JSON file of the finished runs")
    parser.add_argument("--reference-sequence-length", type=int, default=4096, help="beta's unit in tokens (4096)")
    parser.add_argument(
        "--batch-exponent",
        default="1",
        help="p in eta_opt = beta^p * a * T^b: 1 (the paper, default), another number, or 'fit' to fit it too",
    )
    parser.add_argument("--lr-max", type=float, default=None, help="the LR cap (default: the largest optimal LR found)")
    parser.add_argument(
        "--a",
        type=float,
        default=None,
        help="the PowerScheduler's a, when a search with Power runs chose another than the fit's (default: the fit's)",
    )
    parser.add_argument("--tokens-per-step", type=int, default=None, help="the target run's tokens per step")
    parser.add_argument("--warmup-tokens", type=float, default=0, help="the target run's warmup tokens")
    parser.add_argument("--total-tokens", type=float, default=None, help="the target run's tokens (adds a decay)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lightning-power calibrate``; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    for flag, value in (("--a", args.a), ("--lr-max", args.lr_max), ("--tokens-per-step", args.tokens_per_step)):
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"{flag} must be a finite number > 0, got {value}")
    for flag, value in (("--warmup-tokens", args.warmup_tokens), ("--total-tokens", args.total_tokens)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            parser.error(f"{flag} must be a finite number >= 0, got {value}")
    try:
        batch_exponent = None if args.batch_exponent == "fit" else float(args.batch_exponent)
    except ValueError:
        parser.error(f"--batch-exponent must be a number in [0, 2] or 'fit', got {args.batch_exponent!r}")
    try:
        fit = fit_power_law(cell_optima(read_runs(args.runs)), args.reference_sequence_length, batch_exponent)
    except (OSError, ValueError, KeyError) as error:
        parser.error(str(error))
    print(format_fit(fit))
    lr_max = fit.max_optimal_lr if args.lr_max is None else args.lr_max
    total_tokens = None if args.total_tokens is None else int(args.total_tokens)
    try:
        print(fit.scheduler_yaml(lr_max, args.tokens_per_step, int(args.warmup_tokens), total_tokens, a=args.a), end="")
    except ValueError as error:
        print(f"lightning-power calibrate: no PowerScheduler YAML: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
