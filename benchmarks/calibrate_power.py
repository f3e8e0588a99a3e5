"""Fit the Power scheduler's law to the demo GPT: eta_opt = beta * a * T^b from a WSD sweep (arXiv 2408.13359, sec. 3).

A WSD sweep of the muP demo GPT over batch size x token budget x learning rate (2^k grid). Each (batch, tokens) cell's
optimal LR comes from a parabola in log2(LR); ``lightning_power.calibrate`` fits
``ln(eta_opt / beta^p) = ln a + b ln T`` (beta = batch tokens / 4096, T = training tokens) twice: with p = 1 (the
paper's Hypothesis 1) and with p fitted. It prints a, b (and p) with their standard errors and the PowerScheduler YAML
of the law the sweep supports: the paper's, unless the free p lies more than 2 standard errors from 1. The paper's fit
on RedPajama is a = 4.6, b = -0.51, p = 1. ``schedule_transfer.py`` then uses the chosen a, b, p and lr_max.

Usage::

    python benchmarks/calibrate_power.py --quick               # 2 CPU cores, width 64, 16 minutes
    python benchmarks/calibrate_power.py --device cuda         # one GPU, width 256, about 5 minutes (estimated)
    python benchmarks/calibrate_power.py --analyze benchmarks/results/calibrate_power_quick.json  # refit, no training
    lightning-power calibrate benchmarks/results/calibrate_power_quick.json --batch-exponent fit   # the library's CLI

JSON: ``fit`` (the chosen law: ``a``, ``b``, ``batch_exponent``, their standard errors, ``free_batch_exponent``,
cells), ``law``, ``fit_paper`` and ``fit_free_batch_exponent`` (both fits), ``lr_max``, ``yaml``, ``optima``, ``runs``
(one record per training run, with ``batch_tokens``, ``tokens``, ``lr`` and ``loss``: the input
``lightning-power calibrate`` reads), ``config`` and ``environment``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    MODEL,
    SCHEDULE_RUN,
    SWEEP,
    TOKENS_D,
    LRSweep,
    benchmark_parser,
    check_args,
    final_loss,
    log2_grid,
    machine_label,
    matplotlib_pyplot,
    new_payload,
    resolve,
    run_schedule_job,
    run_sweep,
    save_figure,
    write_json,
)

from lightning_power.calibrate import PAPER_A, PAPER_B, CellOptimum, SweepRun, cell_optima, fit_power_law, format_fit

NAME = "calibrate_power"
REJECT_SIGMA = 2.0  # the sweep rejects the paper's p = 1 when its free batch exponent lies further than this from 1
SUMMARY_KEYS = (  # what analyze() writes into the JSON, every key present (None when it does not apply)
    "optima",
    "fit",
    "fit_error",
    "law",
    "fit_paper",
    "fit_free_batch_exponent",
    "lr_max",
    "table",
    "yaml",
    "yaml_error",
)
D_QUICK, D_FULL = TOKENS_D["quick"], TOKENS_D["full"]
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(
        MODEL,
        **SWEEP["quick"],
        **SCHEDULE_RUN["quick"],
        width=64,
        batch_sizes=[4, 8, 16],
        token_budgets=[D_QUICK, 2 * D_QUICK, 4 * D_QUICK],
        log2_lrs=log2_grid(-9, -6),
    ),
    "full": dict(
        MODEL,
        **SWEEP["full"],
        **SCHEDULE_RUN["full"],
        width=256,
        batch_sizes=[16, 32, 64],
        token_budgets=[D_FULL, 2 * D_FULL, 4 * D_FULL],
        log2_lrs=log2_grid(-10, -5),
    ),
}


def sweep_runs(runs: list[dict]) -> list[SweepRun]:
    """The runs as ``lightning_power.calibrate`` takes them; a diverged run (loss ``null`` in JSON) counts as inf."""
    return [
        SweepRun(r["batch_tokens"], r["tokens"], r["lr"], math.inf if r["loss"] is None else r["loss"]) for r in runs
    ]


def analyze(runs: list[dict], config: dict[str, Any]) -> dict[str, Any]:
    """Cell optima, the paper's fit (p = 1), the fit with a free batch exponent p, and the YAML of the law the sweep
    supports: the paper's, unless the sweep puts p more than ``REJECT_SIGMA`` standard errors from 1. A fit that
    cannot be made is reported with its reason."""
    optima = cell_optima(sweep_runs(runs))
    summary: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS) | {"optima": [_cell(c) for c in optima]}
    try:
        paper = fit_power_law(optima)
    except ValueError as error:
        return summary | {"fit_error": str(error)}
    try:
        free = fit_power_law(optima, batch_exponent=None)
    except ValueError:
        free = None
    rejected = free is not None and abs(free.batch_exponent - 1) > REJECT_SIGMA * free.batch_exponent_stderr
    fit = free if rejected else paper
    summary |= {
        "fit": fit.to_dict(),
        "law": "fitted batch exponent" if rejected else "paper (p = 1)",
        "fit_paper": paper.to_dict(),
        "fit_free_batch_exponent": None if free is None else free.to_dict(),
        "lr_max": fit.max_optimal_lr,
        "table": format_fit(paper) + ("\n" + format_fit(free) if free is not None else ""),
    }
    try:
        summary["yaml"] = fit.scheduler_yaml(fit.max_optimal_lr, warmup_tokens=config["warmup_tokens"])  # no horizon
    except ValueError as error:  # e.g. b >= 0: the law did not hold in this sweep
        summary["yaml_error"] = str(error)
    return summary


def _cell(c: CellOptimum) -> dict[str, Any]:
    return {
        "batch_tokens": c.batch_tokens,
        "tokens": c.tokens,
        "lr": c.lr,
        "log2_lr": math.log2(c.lr),
        "interior": c.interior,
    }


def plot(summary: dict[str, Any], payload: dict[str, Any], path: Path) -> None:
    plt = matplotlib_pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    optima = summary["optima"]
    batches = sorted({c["batch_tokens"] for c in optima})
    colors = dict(zip(batches, plt.cm.viridis(np.linspace(0, 0.9, len(batches)))))
    fit = summary.get("fit")
    p = fit["batch_exponent"] if fit else 1.0
    for c in optima:
        beta = c["batch_tokens"] / 4096
        style = {"color": colors[c["batch_tokens"]], "marker": "o" if c["interior"] else "x", "ls": "none"}
        left.plot(c["tokens"], c["lr"] / beta**p, **style)
        right.plot(beta, c["lr"], **style)
    for batch in batches:
        left.plot([], [], "o", color=colors[batch], label=f"batch {batch} tokens")
    tokens = np.geomspace(min(c["tokens"] for c in optima) / 1.5, max(c["tokens"] for c in optima) * 1.5, 50)
    if fit:
        left.plot(
            tokens,
            fit["a"] * tokens ** fit["b"],
            "k-",
            label=f"fit: {fit['a']:.3g} T^{fit['b']:.3f} (b +- {fit['b_stderr']:.3f})",
        )
    if p == 1.0:
        left.plot(tokens, PAPER_A * tokens**PAPER_B, "k:", label=f"paper (RedPajama): {PAPER_A} T^{PAPER_B}")
    left.set(
        xscale="log",
        yscale="log",
        xlabel="training tokens T",
        ylabel="eta_opt / beta" if p == 1.0 else f"eta_opt / beta^{p:.2f}",
    )
    left.set_title("optimal WSD LR / beta vs tokens (x: not bracketed)", fontsize=9)
    left.legend(fontsize=7)
    for budget in sorted({c["tokens"] for c in optima}):
        cells = sorted((c for c in optima if c["tokens"] == budget), key=lambda c: c["batch_tokens"])
        right.plot([c["batch_tokens"] / 4096 for c in cells], [c["lr"] for c in cells], "-", color="gray", lw=0.7)
    if fit and fit.get("free_batch_exponent") is not None:
        right.set_title(
            f"eta_opt vs batch: free exponent {fit['free_batch_exponent']:.2f} +- "
            f"{fit['free_batch_exponent_stderr']:.2f} (paper: 1)",
            fontsize=9,
        )
    right.set(xscale="log", yscale="log", xlabel="beta (batch tokens / 4096)", ylabel="eta_opt (base LR, muP)")
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(
        f"Power-law calibration, muP demo GPT width {payload['config']['width']} "
        f"({machine_label(payload['environment'])})",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--width", type=int, help="model width")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="sequences per step, one sweep per value")
    parser.add_argument("--token-budgets", type=int, nargs="+", help="training tokens T, one sweep per value")
    parser.add_argument("--log2-lrs", type=float, nargs="+", help="the starting LR grid in log2 units")
    parser.add_argument("--seeds", type=int, help="seeds per LR near each cell's optimum")
    parser.add_argument("--refine", type=int, help="LRs around seed 0's optimum that the other seeds run")
    parser.add_argument("--warmup-tokens", type=int, help="warmup tokens (the same for every run)")
    parser.add_argument(
        "--analyze", metavar="JSON", help="refit and redraw a saved sweep (this script's JSON); no runs"
    )
    args = parser.parse_args(argv)
    if args.analyze:
        return reanalyze(Path(args.analyze))
    mode = "quick" if args.quick else "full"
    config = resolve(args, PRESETS[mode]) | {"mode": mode, "device": args.device, "data": args.data}
    check_args(config)
    for batch in config["batch_sizes"]:
        for tokens in config["token_budgets"]:
            if tokens % (batch * config["context_length"]) or tokens // (batch * config["context_length"]) < 4:
                parser.error(
                    f"token budget {tokens} must be a multiple of batch {batch} x context "
                    f"{config['context_length']}, and at least 4 steps"
                )
    out = Path(args.out)
    payload = new_payload(NAME, config, args.device)
    runs: list[dict] = []
    sweep = LRSweep(config["seeds"], config["refine"])

    def jobs_for(batch: int, tokens: int, lr_seeds: list[tuple[float, int]]) -> list[dict[str, Any]]:
        return [
            {
                "schedule": "wsd",
                "batch_size": batch,
                "tokens": tokens,
                "log2_lr": x,
                "seed": seed,
                "cost": tokens,
                "config": config,
            }
            for x, seed in lr_seeds
        ]

    jobs = [
        job
        for b in config["batch_sizes"]
        for t in config["token_budgets"]
        for job in jobs_for(b, t, sweep.start((b, t), config["log2_lrs"]))
    ]

    def on_result(job: dict[str, Any], record: dict[str, Any]) -> list[dict[str, Any]]:
        record["loss"] = final_loss(record)  # inf (null in JSON) = blew up; the field `lightning-power calibrate` reads
        record["curve"] = None  # the fit needs final losses only
        runs.append(record)
        print(
            f"[{len(runs):4d}] batch {record['batch_size']:4d} tokens {record['tokens']:9d} "
            f"lr 2^{record['log2_lr']:+.1f} seed {record['seed']}: loss {record['val_loss']:.4f} "
            f"({record['seconds']:.1f} s)",
            flush=True,
        )
        write_json(out / f"{NAME}_{mode}.json", payload | {"runs": runs})
        key = (job["batch_size"], job["tokens"])
        return jobs_for(*key, sweep.record(key, job["log2_lr"], job["seed"], record["loss"]))

    payload["complete"] = run_sweep(jobs, run_schedule_job, config, args.device, on_result, runs)
    if not runs:
        return 1
    return report(payload | {"runs": runs}, out / f"{NAME}_{mode}.json")


def reanalyze(path: Path) -> int:
    """Refit, rewrite and redraw a saved sweep, e.g. after the analysis changed or a run was interrupted."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"--analyze {path}: cannot read it ({error})") from None
    if not isinstance(payload, dict) or payload.get("benchmark") != NAME or "config" not in payload:
        raise SystemExit(f"--analyze {path}: not a {NAME}.py result")
    if not payload.get("runs"):
        raise SystemExit(f"--analyze {path}: holds no finished runs")
    return report(payload, path)  # the new analysis replaces every key of the old one


def report(payload: dict[str, Any], path: Path) -> int:
    """Analyze ``payload["runs"]``, write the JSON to ``path`` and the figure beside it, print the result."""
    summary = analyze(payload["runs"], payload["config"])
    payload |= summary
    write_json(path, payload)
    plot(summary, payload, path.with_suffix(".png"))
    if summary["fit"] is None:
        print(f"no fit: {summary['fit_error']}")
    else:
        print(summary["table"])
        if summary["yaml"]:
            print(summary["yaml"], end="")
        else:
            print(f"no PowerScheduler YAML: {summary['yaml_error']}")
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0 if payload["complete"] and summary.get("yaml") else 1


if __name__ == "__main__":
    sys.exit(main())
