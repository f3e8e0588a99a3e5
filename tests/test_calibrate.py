"""``lightning_power.calibrate`` against ground truth: synthetic sweeps built from known a, b recover them."""

import csv
import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
import yaml

from lightning_power.calibrate import (
    CellOptimum,
    SweepRun,
    cell_optima,
    fit_power_law,
    format_fit,
    main,
    optimal_log2_lr,
    read_runs,
)
from lightning_power.schedulers import PowerScheduler

A, B = 4.6, -0.51  # the paper's RedPajama fit (arXiv 2408.13359, Eq. 5)
BATCHES = (2048, 8192, 32768)  # tokens per step: beta = 0.5, 2, 8
TOKENS = (1e6, 4e6, 1.6e7, 6.4e7)


def true_log2_lr(batch_tokens, tokens, a=A, b=B, batch_exponent=1.0):
    return math.log2(a * (batch_tokens / 4096) ** batch_exponent * tokens**b)


def synthetic_sweep(batch_exponent=1.0, grid=range(-16, 1)):
    """Losses exactly quadratic in log2(lr) around the true optimum: the parabola vertex is exact."""
    optimum = {(b, t): true_log2_lr(b, t, batch_exponent=batch_exponent) for b in BATCHES for t in TOKENS}
    return [
        SweepRun(batch, tokens, 2.0**k, 2.5 + 0.07 * (k - optimum[batch, tokens]) ** 2)
        for batch in BATCHES
        for tokens in TOKENS
        for k in grid
    ]


def test_parabola_vertex_on_an_uneven_grid():
    xs = [-8.0, -7.0, -6.5, -5.0, -4.0, -2.5]
    losses = [2.0 + 0.3 * (x + 5.3) ** 2 for x in xs]
    log2_lr, interior = optimal_log2_lr([2.0**x for x in reversed(xs)], list(reversed(losses)))  # any order
    assert interior
    assert log2_lr == pytest.approx(-5.3, abs=1e-9)


def test_edge_and_diverged_optima_are_flagged():
    lrs = [1e-4, 1e-3, 1e-2]
    assert optimal_log2_lr(lrs, [1.0, 2.0, 3.0]) == (math.log2(1e-4), False)
    assert optimal_log2_lr(lrs, [3.0, 2.0, 1.0]) == (math.log2(1e-2), False)
    # the best point's neighbour diverged: no parabola, the grid point comes back, flagged
    assert optimal_log2_lr(lrs + [1e-1], [3.0, 2.0, 1.0, math.nan]) == (math.log2(1e-2), False)
    with pytest.raises(ValueError, match="every run diverged"):
        optimal_log2_lr(lrs, [math.inf, math.nan, math.inf])
    with pytest.raises(ValueError, match="distinct"):
        optimal_log2_lr([1e-3, 1e-3, 1e-2], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="> 0"):
        optimal_log2_lr([0.0, 1e-3, 1e-2], [1.0, 2.0, 3.0])


def test_cell_optima_average_seeds_and_count_a_diverged_seed_as_diverged():
    runs = [SweepRun(4096, 1e6, 2.0**k, 1.0 + (k + 5) ** 2) for k in (-7, -6, -5, -4, -3)]
    runs += [SweepRun(4096, 1e6, 2.0**k, 1.0 + (k + 5) ** 2 + 0.5 * (k == -4)) for k in (-6, -5, -4)]  # 2nd seed
    (cell,) = cell_optima(runs)
    # means: -6 -> 2, -5 -> 1, -4 -> 2.25; the vertex of the parabola through three points spaced by 1 is
    # x_mid - (y_right - y_left) / (2 (y_right - 2 y_mid + y_left)) = -5 - 0.25 / (2 * 2.25)
    assert cell.interior and math.log2(cell.lr) == pytest.approx(-5 - 0.25 / 4.5, abs=1e-9)
    (cell,) = cell_optima(runs + [SweepRun(4096, 1e6, 2.0**-4, math.nan)])
    assert not cell.interior and math.log2(cell.lr) == -5


def test_a_cell_where_every_run_diverged_is_left_out_of_the_fit_not_fatal():
    diverged = [SweepRun(BATCHES[0], 10 * TOKENS[-1], 2.0**k, math.inf) for k in (-6, -5, -4)]
    optima = cell_optima(synthetic_sweep() + diverged)
    (dead,) = [c for c in optima if c.tokens == 10 * TOKENS[-1]]
    assert not dead.interior and dead.lr == 2.0**-6
    fit = fit_power_law(optima)
    assert dead in fit.excluded and len(fit.cells) == len(BATCHES) * len(TOKENS)


def test_fit_recovers_a_and_b_exactly_from_a_synthetic_sweep():
    optima = cell_optima(synthetic_sweep())
    assert len(optima) == len(BATCHES) * len(TOKENS) and all(c.interior for c in optima)
    for c in optima:
        assert math.log2(c.lr) == pytest.approx(true_log2_lr(c.batch_tokens, c.tokens), abs=1e-9)
    fit = fit_power_law(optima)
    assert fit.a == pytest.approx(A, rel=1e-9)
    assert fit.b == pytest.approx(B, abs=1e-10)
    assert fit.b_stderr < 1e-9 and fit.log_a_stderr < 1e-8
    assert fit.batch_exponent == 1.0 and fit.batch_exponent_stderr is None  # the paper's law, p fixed
    assert fit.free_batch_exponent == pytest.approx(1.0, abs=1e-9)
    # the fitted LR is the law's: beta * a * T^b, e.g. 2 * 4.6 * (1e9)^-0.51
    assert fit.lr(8192, 1e9) == pytest.approx(2 * 4.6 * 1e9**-0.51, rel=1e-9)


def test_batch_exponent_reveals_a_law_other_than_linear_in_batch():
    optima = cell_optima(synthetic_sweep(batch_exponent=0.5))
    paper = fit_power_law(optima)  # p fixed at 1: the free estimate says the hypothesis fails
    assert paper.batch_exponent == 1.0
    assert paper.free_batch_exponent == pytest.approx(0.5, abs=1e-9)
    assert paper.b == pytest.approx(B, abs=1e-9)  # the T exponent is still right; a absorbs the averaged batch
    assert paper.residual_std > 0.1  # but the cells scatter around the p = 1 law
    fitted = fit_power_law(optima, batch_exponent=None)  # p fitted: the law is recovered whole
    assert fitted.batch_exponent == pytest.approx(0.5, abs=1e-9) and fitted.batch_exponent_stderr < 1e-9
    assert fitted.a == pytest.approx(A, rel=1e-9) and fitted.b == pytest.approx(B, abs=1e-9)
    assert fitted.lr(32768, 1e9) == pytest.approx(8**0.5 * A * 1e9**B, rel=1e-9)
    fixed = fit_power_law(optima, batch_exponent=0.5)  # p given: the same law
    assert fixed.a == pytest.approx(A, rel=1e-9) and fixed.batch_exponent_stderr is None


def test_a_fitted_batch_exponent_reaches_the_scheduler_through_the_yaml(tmp_path, capsys):
    fit = fit_power_law(cell_optima(synthetic_sweep(batch_exponent=0.5)), batch_exponent=None)
    config = yaml.safe_load(fit.scheduler_yaml(lr_max=1.0, tokens_per_step=32768))
    assert config["lr_scheduler"]["init_args"]["batch_exponent"] == pytest.approx(0.5, abs=1e-6)
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), **config["optimizer"]["init_args"])
    scheduler = PowerScheduler(optimizer, **config["lr_scheduler"]["init_args"])
    for _ in range(99):
        optimizer.step()
        scheduler.step()
    # 100 steps of 32768 tokens, beta = 8: LR = beta^0.5 * a * n^b, by hand
    assert optimizer.param_groups[0]["lr"] == pytest.approx(8**0.5 * 4.6 * (100 * 32768) ** -0.51, rel=1e-5)
    path = tmp_path / "runs.json"
    runs = synthetic_sweep(batch_exponent=0.5)
    path.write_text(
        json.dumps([{"batch_tokens": r.batch_tokens, "tokens": r.tokens, "lr": r.lr, "loss": r.loss} for r in runs])
    )
    assert main([str(path), "--batch-exponent", "fit"]) == 0
    output = capsys.readouterr().out
    assert "p = 0.500 +- 0.000" in output
    assert yaml.safe_load(output)["lr_scheduler"]["init_args"]["batch_exponent"] == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(SystemExit):
        main([str(path), "--batch-exponent", "sqrt"])
    assert "--batch-exponent must be a number in [0, 2] or 'fit', got 'sqrt'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"batch_exponent must be a number in \[0, 2\]"):
        fit_power_law(cell_optima(runs), batch_exponent=3.0)
    with pytest.raises(ValueError, match=r"batch_exponent=None fits the batch exponent, which needs >= 4"):
        fit_power_law(
            [CellOptimum(4096, t, 4.6 * t**-0.51, True) for t in (1e6, 4e6, 1.6e7, 6.4e7)], batch_exponent=None
        )


def test_standard_errors_match_the_spread_of_refits_under_noise():
    rng = np.random.default_rng(0)
    sigma = 0.2  # noise of ln(eta_opt)
    estimates, reported_b, reported_log_a = [], [], []
    for _ in range(400):
        optima = [
            CellOptimum(
                batch, tokens, math.exp(math.log(2) * true_log2_lr(batch, tokens) + sigma * rng.standard_normal()), True
            )
            for batch in BATCHES
            for tokens in TOKENS
        ]
        fit = fit_power_law(optima)
        estimates.append((math.log(fit.a), fit.b))
        reported_b.append(fit.b_stderr)
        reported_log_a.append(fit.log_a_stderr)
    log_a, b = np.array(estimates).T
    assert np.mean(b) == pytest.approx(B, abs=0.01)  # unbiased
    assert np.mean(log_a) == pytest.approx(math.log(A), abs=0.1)
    assert np.mean(reported_b) == pytest.approx(np.std(b), rel=0.1)
    assert np.mean(reported_log_a) == pytest.approx(np.std(log_a), rel=0.1)


def test_edge_cells_are_left_out_and_too_few_cells_fail():
    optima = [CellOptimum(4096, t, 4.6 * t**-0.51, True) for t in (1e6, 4e6, 1.6e7)]
    edge = CellOptimum(4096, 6.4e7, 1.0, False)
    fit = fit_power_law([*optima, edge])
    assert fit.excluded == (edge,) and len(fit.cells) == 3
    assert fit.a == pytest.approx(4.6, rel=1e-9)
    with pytest.raises(ValueError, match="interior cells over"):
        fit_power_law([*optima[:2], edge])
    with pytest.raises(ValueError, match="2 token counts"):
        fit_power_law([CellOptimum(b, 1e6, 1e-3 * b, True) for b in (1024, 2048, 4096)])


def test_scheduler_yaml_gives_a_power_scheduler_that_follows_the_fit():
    fit = fit_power_law(cell_optima(synthetic_sweep()))
    text = fit.scheduler_yaml(lr_max=0.01, tokens_per_step=8192, warmup_tokens=0)
    config = yaml.safe_load(text)
    assert config["lr_scheduler"]["class_path"] == "lightning_power.schedulers.PowerScheduler"
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), **config["optimizer"]["init_args"])
    scheduler = PowerScheduler(optimizer, **config["lr_scheduler"]["init_args"])
    for _ in range(999):
        optimizer.step()
        scheduler.step()
    # step 1000 has seen 1000 * 8192 tokens: LR = min(0.01, beta * a * n^b) with beta = 2, by hand
    assert optimizer.param_groups[0]["lr"] == pytest.approx(min(0.01, 2 * 4.6 * (1000 * 8192) ** -0.51), rel=1e-5)
    with_decay = yaml.safe_load(fit.scheduler_yaml(lr_max=0.01, total_tokens=10**9))["lr_scheduler"]["init_args"]
    assert with_decay["decay_tokens"] == 10**8 and with_decay["decay_shape"] == "exponential"
    with pytest.raises(ValueError, match="lr_max"):
        fit.scheduler_yaml(lr_max=0.0)
    searched = yaml.safe_load(fit.scheduler_yaml(lr_max=0.01, a=2.3))["lr_scheduler"]["init_args"]
    assert searched["a"] == 2.3 and searched["b"] == pytest.approx(fit.b, rel=1e-3)
    assert "the fit's a x 0.5" in fit.scheduler_yaml(lr_max=0.01, a=fit.a / 2)
    with pytest.raises(ValueError, match="a must be > 0"):
        fit.scheduler_yaml(lr_max=0.01, a=0.0)


def test_command_line_reads_a_csv_and_prints_the_fit_and_yaml(tmp_path, capsys):
    path = tmp_path / "runs.csv"
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["batch_tokens", "tokens", "lr", "loss", "seed"])
        writer.writerows([r.batch_tokens, r.tokens, r.lr, r.loss, 0] for r in synthetic_sweep())
    assert main([str(path), "--tokens-per-step", "8192"]) == 0
    output = capsys.readouterr().out
    assert "a = 4.6 +- " in output and "b = -0.5100" in output
    config = yaml.safe_load(output)  # the table lines are YAML comments
    assert config["lr_scheduler"]["init_args"]["a"] == pytest.approx(4.6, rel=1e-5)
    assert config["lr_scheduler"]["init_args"]["lr_max"] == pytest.approx(
        max(2.0 ** true_log2_lr(b, t) for b in BATCHES for t in TOKENS), rel=1e-5
    )
    # --a: the amplitude a search with Power runs chose; b and lr_max stay the fit's
    assert main([str(path), "--tokens-per-step", "8192", "--a", "6.9"]) == 0
    searched = yaml.safe_load(capsys.readouterr().out)["lr_scheduler"]["init_args"]
    assert searched["a"] == 6.9 and searched["b"] == pytest.approx(-0.51, rel=1e-5)
    assert searched["lr_max"] == config["lr_scheduler"]["init_args"]["lr_max"]
    with pytest.raises(SystemExit):
        main([str(path), "--a", "-1"])
    assert "--a must be a finite number > 0, got -1.0" in capsys.readouterr().err


def test_runs_from_json_with_a_diverged_run(tmp_path, capsys):
    records = [
        {"batch_tokens": r.batch_tokens, "tokens": r.tokens, "lr": r.lr, "loss": r.loss} for r in synthetic_sweep()
    ]
    records.append({"batch_tokens": 2048, "tokens": 1e6, "lr": 2.0, "loss": None})
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"runs": records}))
    runs = read_runs(path)
    assert runs[-1].loss == math.inf and len(runs) == len(records)
    bad = tmp_path / "bad.csv"
    bad.write_text("batch_tokens,tokens,lr\n4096,1e6,0.01\n")
    with pytest.raises(SystemExit):
        main([str(bad)])
    assert "lacks ['loss']" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("4096,1e6,0.01,abc", r"line 3, column 'loss': 'abc' is not a number"),
        ("4096,1e6", r"line 3, column 'lr': None is not a number"),
        ("4096,inf,0.01,2.5", r"line 3, column 'tokens': 'inf' is not a finite number"),
    ],
)
def test_a_bad_value_names_its_line_and_column(tmp_path, capsys, row, message):
    path = tmp_path / "runs.csv"
    path.write_text(f"batch_tokens,tokens,lr,loss\n4096,1e6,0.02,2.0\n{row}\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(path)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_spreadsheet_csv_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("batch_tokens,tokens,lr,loss\n4096,1e6,0.02,2.0\n", encoding="utf-8-sig")
    assert read_runs(path) == [SweepRun(4096, 1e6, 0.02, 2.0)]


@pytest.mark.parametrize(
    "flags", [["--tokens-per-step", "0"], ["--lr-max", "inf"], ["--a", "nan"], ["--total-tokens", "inf"]]
)
def test_flags_that_would_print_an_unusable_yaml_are_usage_errors(tmp_path, capsys, flags):
    path = tmp_path / "runs.csv"
    path.write_text("batch_tokens,tokens,lr,loss\n4096,1e6,0.02,2.0\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), *flags])
    assert exit_info.value.code == 2 and f"{flags[0]} must be a finite number" in capsys.readouterr().err


def test_a_law_whose_lr_grows_with_tokens_gives_no_scheduler(tmp_path, capsys):
    optima = [CellOptimum(4096, t, 0.01 * (t / 1e6) ** 0.3, True) for t in (1e6, 4e6, 1.6e7)]
    fit = fit_power_law(optima)
    assert fit.b == pytest.approx(0.3, abs=1e-9)  # reported as measured
    with pytest.raises(ValueError, match="b = 0.3 .* is not negative"):
        fit.scheduler_yaml(lr_max=0.01)
    path = tmp_path / "runs.json"
    path.write_text(
        json.dumps(
            [
                {"batch_tokens": 4096, "tokens": c.tokens, "lr": 2.0**k, "loss": 1.0 + (k - math.log2(c.lr)) ** 2}
                for c in optima
                for k in range(-12, 0)
            ]
        )
    )
    assert main([str(path)]) == 1
    captured = capsys.readouterr()
    assert "b = 0.3000" in captured.out and "no PowerScheduler YAML" in captured.err


def write_csv(path, runs):
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["batch_tokens", "tokens", "lr", "loss"])
        writer.writerows([r.batch_tokens, r.tokens, r.lr, r.loss] for r in runs)
    return path


def noisy_optima(seed=1, sigma=0.2, batch_exponent=0.7):
    rng = np.random.default_rng(seed)
    return [
        CellOptimum(
            batch,
            tokens,
            2.0 ** true_log2_lr(batch, tokens, batch_exponent=batch_exponent) * math.exp(sigma * rng.standard_normal()),
            True,
        )
        for batch in BATCHES
        for tokens in TOKENS
    ]


def ordinary_least_squares(columns, target):
    design = np.column_stack(columns)
    coef = np.linalg.solve(design.T @ design, design.T @ target)
    variance = np.sum((target - design @ coef) ** 2) / (len(target) - design.shape[1])
    return coef, variance * np.linalg.inv(design.T @ design), math.sqrt(variance)


def test_standard_errors_on_noisy_cells_are_those_of_ordinary_least_squares():
    optima = noisy_optima()
    ones = np.ones(len(optima))
    log_beta = np.log([c.batch_tokens / 4096 for c in optima])
    log_t = np.log([c.tokens for c in optima])
    log_lr = np.log([c.lr for c in optima])
    free_coef, free_cov, free_std = ordinary_least_squares([ones, log_beta, log_t], log_lr)
    coef, cov, std = ordinary_least_squares([ones, log_t], log_lr - log_beta)  # p = 1

    fixed = fit_power_law(optima)
    assert fixed.a == pytest.approx(math.exp(coef[0]), rel=1e-9) and fixed.b == pytest.approx(coef[1], rel=1e-9)
    assert fixed.log_a_stderr == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-9)
    assert fixed.a_stderr == pytest.approx(fixed.a * math.sqrt(cov[0, 0]), rel=1e-9)
    assert fixed.b_stderr == pytest.approx(math.sqrt(cov[1, 1]), rel=1e-9)
    assert np.array(fixed.covariance) == pytest.approx(cov, rel=1e-9)
    assert fixed.residual_std == pytest.approx(std, rel=1e-9)
    assert fixed.free_batch_exponent == pytest.approx(free_coef[1], rel=1e-9)
    assert fixed.free_batch_exponent_stderr == pytest.approx(math.sqrt(free_cov[1, 1]), rel=1e-9)
    assert fixed.to_dict()["a_stderr"] == pytest.approx(fixed.a * math.sqrt(cov[0, 0]), rel=1e-9)

    fitted = fit_power_law(optima, batch_exponent=None)  # p fitted: (ln a, b) out of (ln a, p, b)
    assert fitted.a == pytest.approx(math.exp(free_coef[0]), rel=1e-9)
    assert fitted.b == pytest.approx(free_coef[2], rel=1e-9)
    assert fitted.batch_exponent == pytest.approx(free_coef[1], rel=1e-9)
    assert fitted.batch_exponent_stderr == pytest.approx(math.sqrt(free_cov[1, 1]), rel=1e-9)
    assert fitted.log_a_stderr == pytest.approx(math.sqrt(free_cov[0, 0]), rel=1e-9)
    assert fitted.a_stderr == pytest.approx(fitted.a * math.sqrt(free_cov[0, 0]), rel=1e-9)
    assert fitted.b_stderr == pytest.approx(math.sqrt(free_cov[2, 2]), rel=1e-9)
    assert np.array(fitted.covariance) == pytest.approx(free_cov[np.ix_([0, 2], [0, 2])], rel=1e-9)
    assert fitted.residual_std == pytest.approx(free_std, rel=1e-9)


def test_the_free_batch_exponent_needs_four_cells_and_one_degree_of_freedom():
    law = lambda batch, tokens: batch / 4096 * A * tokens**B
    three = [CellOptimum(b, t, law(b, t), True) for b, t in ((4096, 1e6), (4096, 4e6), (8192, 1e6))]
    fit = fit_power_law(three)  # 3 cells: a and b fit, p would have no degree of freedom left
    assert fit.a == pytest.approx(A, rel=1e-9)
    assert fit.free_batch_exponent is None and fit.free_batch_exponent_stderr is None
    with pytest.raises(ValueError, match="got 3 interior cells over 2 batch size"):
        fit_power_law(three, batch_exponent=None)
    # a 2 x 2 design whose 4th cell is 10 % off the law: the interaction is the one residual, so by hand
    # p = 1 + ln(1.1) / (2 ln 2) and its standard error is ln(1.1) / (2 ln 2)
    four = [*three, CellOptimum(8192, 4e6, 1.1 * law(8192, 4e6), True)]
    half_interaction = math.log(1.1) / (2 * math.log(2))
    for fit in (fit_power_law(four), fit_power_law(four, batch_exponent=None)):
        assert fit.free_batch_exponent == pytest.approx(1 + half_interaction, rel=1e-9)
        assert fit.free_batch_exponent_stderr == pytest.approx(half_interaction, rel=1e-9)


@pytest.mark.parametrize("decay_fraction", [-0.1, 1.5])
def test_a_decay_fraction_outside_zero_to_one_is_refused(decay_fraction):
    fit = fit_power_law(cell_optima(synthetic_sweep()))
    with pytest.raises(ValueError, match=r"decay_fraction must be in \[0, 1\], got " + str(decay_fraction)):
        fit.scheduler_yaml(lr_max=0.01, total_tokens=10**9, decay_fraction=decay_fraction)


def test_an_empty_loss_cell_in_a_csv_is_a_diverged_run(tmp_path, capsys):
    path = tmp_path / "runs.csv"
    path.write_text("batch_tokens,tokens,lr,loss\n4096,1e6,0.02,2.0\n4096,1e6,0.04,\n")
    assert read_runs(path) == [SweepRun(4096, 1e6, 0.02, 2.0), SweepRun(4096, 1e6, 0.04, math.inf)]
    # a sweep with a diverged run at a too-large LR still calibrates
    write_csv(path, synthetic_sweep())
    with path.open("a") as file:
        file.write(f"{BATCHES[0]},{TOKENS[0]},4.0,\n")
    assert main([str(path)]) == 0
    assert "a = 4.6 +- " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("field", "value"), [("batch_tokens", 0), ("batch_tokens", -4096), ("tokens", 0), ("tokens", -1e6)]
)
def test_a_run_with_a_non_positive_batch_or_budget_is_refused(tmp_path, capsys, field, value):
    runs = synthetic_sweep()
    runs[5] = dataclasses.replace(runs[5], **{field: value})
    with pytest.raises(ValueError, match=f"{field} must be > 0, got {value}"):
        cell_optima(runs)
    with pytest.raises(SystemExit) as exit_info:
        main([str(write_csv(tmp_path / "runs.csv", runs))])
    assert exit_info.value.code == 2 and f"{field} must be > 0" in capsys.readouterr().err


def test_command_line_flags_reach_the_yaml_and_the_scheduler(tmp_path, capsys):
    path = write_csv(tmp_path / "runs.csv", synthetic_sweep())
    argv = [str(path), "--tokens-per-step", "8192", "--reference-sequence-length", "2048"]
    assert main([*argv, "--lr-max", "0.005", "--warmup-tokens", "81920"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    init_args = config["lr_scheduler"]["init_args"]
    assert init_args["lr_max"] == 0.005 and config["optimizer"]["init_args"]["lr"] == 0.005
    assert init_args["warmup_tokens"] == 81920
    # beta counted in 2048-token sequences doubles, so a halves: the law in tokens is the same
    assert init_args["reference_sequence_length"] == 2048 and init_args["a"] == pytest.approx(A / 2, rel=1e-5)
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), **config["optimizer"]["init_args"])
    scheduler = PowerScheduler(optimizer, **init_args)
    for _ in range(999):
        optimizer.step()
        scheduler.step()
    # step 1000, after the 10-step warmup: 8192 tokens per step are beta = 2 sequences of 4096, LR = 2 * 4.6 * n^b
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2 * A * (1000 * 8192) ** B, rel=1e-5)
    assert main(argv) == 0  # without the flags: the largest optimal LR, no warmup
    init_args = yaml.safe_load(capsys.readouterr().out)["lr_scheduler"]["init_args"]
    assert init_args["warmup_tokens"] == 0
    assert init_args["lr_max"] == pytest.approx(
        max(2.0 ** true_log2_lr(b, t) for b in BATCHES for t in TOKENS), rel=1e-5
    )


def test_the_table_divides_eta_opt_by_beta_to_the_fitted_power():
    fit = fit_power_law(cell_optima(synthetic_sweep(batch_exponent=0.5)), batch_exponent=0.5)
    table = format_fit(fit)
    assert "eta_opt/beta^0.50" in table.splitlines()[0]
    rows = [line.split() for line in table.splitlines() if line.endswith("yes")]
    assert len(rows) == len(BATCHES) * len(TOKENS)
    for _, _, tokens, _, gamma, _ in rows:  # eta_opt / beta^0.5 = a T^b, whatever the batch
        assert float(gamma) == pytest.approx(A * float(tokens) ** B, rel=1e-3)


@pytest.mark.parametrize("batch_exponent", [0.7, 1.0])
def test_the_table_advises_a_batch_exponent_fit_when_the_sweep_rejects_p(batch_exponent):
    optima = noisy_optima(batch_exponent=batch_exponent, sigma=0.1)
    log_beta = np.log([c.batch_tokens / 4096 for c in optima])
    log_t, log_lr = np.log([c.tokens for c in optima]), np.log([c.lr for c in optima])
    coef, cov, _ = ordinary_least_squares([np.ones(len(optima)), log_beta, log_t], log_lr)
    sigmas_from_one = abs(coef[1] - 1) / math.sqrt(cov[1, 1])
    assert (sigmas_from_one > 2) == (batch_exponent == 0.7)  # the two cases lie on either side of the threshold

    fixed = fit_power_law(optima)
    assert fixed.free_batch_exponent_sigmas(1.0) == pytest.approx(sigmas_from_one, rel=1e-9)
    advice = [line for line in format_fit(fixed).splitlines() if "--batch-exponent fit" in line]
    if batch_exponent == 0.7:
        assert advice == [
            f"# this sweep rejects p = 1 by {sigmas_from_one:.1f} standard errors: the LR will not carry over between "
            "batch sizes; refit with --batch-exponent fit (fit_power_law(..., batch_exponent=None))"
        ]
    else:
        assert advice == []
    # a law with p fitted, or fixed at a value the sweep accepts, needs no advice
    assert "--batch-exponent fit" not in format_fit(fit_power_law(optima, batch_exponent=None))
    assert "--batch-exponent fit" not in format_fit(fit_power_law(optima, batch_exponent=round(coef[1], 2)))


def test_the_yaml_numbers_are_numbers_to_a_yaml_1_1_reader():
    # PyYAML's safe_load follows YAML 1.1, where 5e-05 (no dot) is a string; the CLI's jsonargparse reads both
    fit = fit_power_law(cell_optima(synthetic_sweep()))
    config = yaml.safe_load(fit.scheduler_yaml(lr_max=5e-5, a=2.5e-5))
    assert config["optimizer"]["init_args"]["lr"] == 5e-5
    assert config["lr_scheduler"]["init_args"]["lr_max"] == 5e-5
    assert config["lr_scheduler"]["init_args"]["a"] == 2.5e-5
