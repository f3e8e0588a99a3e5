"""Fit the Power scheduler's law to the demo GPT: eta_opt = beta * a * T^b from a WSD sweep (arXiv 2408.13359, sec. 3).

A WSD sweep of the muP demo GPT over batch size x token budget x learning rate (2^k grid). Each (batch, tokens) cell's
optimal LR comes from a parabola in log2(LR); ``lightning_power.calibrate`` fits
``ln(eta_opt / beta^p) = ln a + b ln T`` (beta = batch tokens / 4096, T = training tokens) twice: with p = 1 (the
paper's Hypothesis 1) and with p fitted. It prints a, b (and p) with their standard errors and the PowerScheduler YAML
of the law the sweep supports: the paper's, unless the free p lies more than 2 standard errors from 1. The paper's fit
on RedPajama is a = 4.6, b = -0.51, p = 1.

The fit is the optimum of a constant LR held for the whole budget T, while the Power scheduler runs at
min(lr_max, beta^p a n^b) after n < T tokens, above it. So, as the paper did before choosing its a = 4 over the
fitted 4.6 (sec. 4, Table 3), a second stage searches the Power scheduler's own amplitude: Power runs with
a * 2^k (k on a 0.5-spaced grid, extended at an edge) in one cell of the sweep, ``--amplitude-cell``, by default
its centre, and a parabola in k gives the best multiplier. ``schedule_transfer.py`` then uses a, b, p and lr_max
of the ``power`` key: that amplitude and the fit's b, p and lr_max.

Usage::

    python benchmarks/calibrate_power.py --quick               # 2 CPU cores, width 64, about 19 minutes
    python benchmarks/calibrate_power.py --device cuda         # one GPU, width 256, about 6 minutes (estimated)
    python benchmarks/calibrate_power.py --quick --resume      # reuse the finished runs in --out, train the rest
    python benchmarks/calibrate_power.py --analyze benchmarks/results/calibrate_power_quick.json  # refit, no training
    lightning-power calibrate benchmarks/results/calibrate_power_quick.json --batch-exponent fit   # the library's CLI

JSON: ``fit`` (the chosen law: ``a``, ``b``, ``batch_exponent``, their standard errors, ``free_batch_exponent``,
cells), ``law``, ``fit_paper`` and ``fit_free_batch_exponent`` (both fits), ``lr_max``, ``amplitude_search`` (the cell,
mean loss per k, the best ``log2_multiplier`` and the resulting ``a``), ``power`` (the Power scheduler's a, b,
batch_exponent, lr_max), ``yaml`` (with that a), ``optima``, ``runs`` (one record per WSD run, with
``batch_tokens``, ``tokens``, ``lr`` and ``loss``: the input ``lightning-power calibrate`` reads),
``amplitude_runs`` (the Power runs), ``config`` and ``environment``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    MODEL,
    POWER_LAW,
    SCHEDULE_RUN,
    SWEEP,
    TOKENS_D,
    LRSweep,
    add_resume_flag,
    benchmark_parser,
    check_args,
    check_cells,
    final_loss,
    log2_grid,
    machine_label,
    matplotlib_pyplot,
    new_payload,
    print_plan,
    replay_finished,
    resolve,
    run_outcome,
    run_schedule_job,
    run_sweep,
    save_figure,
    write_json,
)

from lightning_power.calibrate import (
    PAPER_A,
    PAPER_B,
    REJECT_SIGMAS,
    CellOptimum,
    SweepRun,
    cell_optima,
    fit_power_law,
    format_fit,
    optimal_log2_lr,
)

NAME = "calibrate_power"
SUMMARY_KEYS = (  # what analyze() writes into the JSON, every key present (None when it does not apply)
    "optima",
    "fit",
    "fit_error",
    "law",
    "fit_paper",
    "fit_free_batch_exponent",
    "lr_max",
    "amplitude_search",
    "power",
    "table",
    "yaml",
    "yaml_error",
)
D_QUICK, D_FULL = TOKENS_D["quick"], TOKENS_D["full"]
AMPLITUDE_STEP = 0.5  # log2 spacing of the Power amplitude search, a * 2^k
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(
        MODEL,
        **SWEEP["quick"],
        **SCHEDULE_RUN["quick"],
        width=64,
        batch_sizes=[4, 8, 16],
        token_budgets=[D_QUICK, 2 * D_QUICK, 4 * D_QUICK],
        log2_lrs=log2_grid(-9, -6),
        amplitude_search=True,
        amplitude_cell=[8, 2 * D_QUICK],
        log2_amplitudes=log2_grid(-1, 1, AMPLITUDE_STEP),
    ),
    "full": dict(
        MODEL,
        **SWEEP["full"],
        **SCHEDULE_RUN["full"],
        width=256,
        batch_sizes=[16, 32, 64],
        token_budgets=[D_FULL, 2 * D_FULL, 4 * D_FULL],
        log2_lrs=log2_grid(-10, -5),
        amplitude_search=True,
        amplitude_cell=[32, 2 * D_FULL],
        log2_amplitudes=log2_grid(-1, 1, AMPLITUDE_STEP),
    ),
}


def sweep_runs(runs: list[dict]) -> list[SweepRun]:
    """The runs as ``lightning_power.calibrate`` takes them; a diverged run (loss ``null`` in JSON) counts as inf."""
    return [
        SweepRun(r["batch_tokens"], r["tokens"], r["lr"], math.inf if r["loss"] is None else r["loss"]) for r in runs
    ]


def analyze(runs: list[dict], amplitude_runs: list[dict], config: dict[str, Any]) -> dict[str, Any]:
    """Cell optima, the paper's fit (p = 1), the fit with a free batch exponent p, the Power scheduler's amplitude
    search, and the YAML of the law the sweep supports: the paper's, unless the sweep puts p more than
    ``REJECT_SIGMAS`` standard errors from 1, with the searched amplitude. A fit that cannot be made is reported with
    its reason."""
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
    sigmas = paper.free_batch_exponent_sigmas(1.0)
    rejected = free is not None and sigmas is not None and sigmas > REJECT_SIGMAS
    fit = free if rejected else paper
    law = {"a": fit.a, "b": fit.b, "batch_exponent": fit.batch_exponent, "lr_max": fit.max_optimal_lr}
    search = amplitude_search(amplitude_runs, law)
    searched = search is not None and search["error"] is None
    summary |= {
        "fit": fit.to_dict(),
        "law": "fitted batch exponent" if rejected else "paper (p = 1)",
        "fit_paper": paper.to_dict(),
        "fit_free_batch_exponent": None if free is None else free.to_dict(),
        "lr_max": fit.max_optimal_lr,
        "amplitude_search": search,
        "power": law | {"a": search["a"] if searched else fit.a, "amplitude_searched": searched},
        "table": format_fit(paper) + ("\n" + format_fit(free) if free is not None else ""),
    }
    try:
        summary["yaml"] = fit.scheduler_yaml(
            fit.max_optimal_lr, warmup_tokens=config["warmup_tokens"], a=summary["power"]["a"]
        )  # no horizon
    except ValueError as error:  # e.g. b >= 0: the law did not hold in this sweep
        summary["yaml_error"] = str(error)
    return summary


def amplitude_search(runs: list[dict], law: dict[str, float]) -> dict[str, Any] | None:
    """The Power scheduler's best amplitude a * 2^k from its runs around ``law`` (the paper's sec. 4 search of a):
    the mean loss per k over seeds and the vertex of a parabola in k. ``None`` without runs; ``error`` says why no
    amplitude follows (the runs searched around another law, or all diverged)."""
    if not runs:
        return None
    result: dict[str, Any] = {
        "cell": [runs[0]["batch_size"], runs[0]["tokens"]],
        "mean_loss": None,
        "seeds": None,
        "log2_multiplier": None,
        "interior": None,
        "a": None,
        "error": None,
    }
    around = [
        any(r["power"][key] != law[key] for key in POWER_LAW if key != "a")
        or not math.isclose(r["power"]["a"], law["a"] * 2.0 ** r["log2_amplitude"], rel_tol=1e-9)
        for r in runs
    ]
    if any(around):
        return result | {"error": "the amplitude runs searched around another law than this fit: rerun the search"}
    losses: dict[float, list[float]] = {}
    for r in runs:
        losses.setdefault(r["log2_amplitude"], []).append(final_loss(r))
    means = {k: float(np.mean(v)) if all(map(math.isfinite, v)) else math.inf for k, v in sorted(losses.items())}
    try:
        best, interior = optimal_log2_lr([2.0**k for k in means], list(means.values()))
    except ValueError as error:
        return result | {"error": str(error)}
    return result | {
        "mean_loss": {str(k): loss for k, loss in means.items()},
        "seeds": {str(k): len(v) for k, v in sorted(losses.items())},
        "log2_multiplier": best,
        "interior": interior,
        "a": law["a"] * 2.0**best,
    }


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
    search = summary.get("amplitude_search")
    panels = 3 if search and search["mean_loss"] else 2
    fig, (left, right, *rest) = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
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
    for ax in rest:  # the Power scheduler's amplitude search
        ks = [float(k) for k in search["mean_loss"]]
        ax.plot(ks, list(search["mean_loss"].values()), "o-", color="tab:green")
        ax.axvline(search["log2_multiplier"], color="k", ls=":", lw=1)
        batch, tokens = search["cell"]
        ax.set_title(
            f"Power at a x 2^k, batch {batch}, {tokens} tokens: best k = {search['log2_multiplier']:+.2f}, "
            f"a = {search['a']:.3g}",
            fontsize=9,
        )
        ax.set(xlabel="k (log2 of the amplitude multiplier)", ylabel="validation loss (mean over seeds)")
    for ax in (left, right, *rest):
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
        "--amplitude-cell",
        type=int,
        nargs=2,
        metavar=("BATCH", "TOKENS"),
        help="where Power searches its amplitude a * 2^k (default: the sweep's centre cell)",
    )
    parser.add_argument(
        "--log2-amplitudes", type=float, nargs="+", help=f"the starting grid of k, {AMPLITUDE_STEP} apart"
    )
    parser.add_argument(
        "--no-amplitude-search",
        dest="amplitude_search",
        action="store_false",
        default=None,
        help="keep the fit's a for the Power scheduler (no Power runs)",
    )
    add_resume_flag(parser)
    parser.add_argument(
        "--analyze", metavar="JSON", help="refit and redraw a saved sweep (this script's JSON); no runs"
    )
    args = parser.parse_args(argv)
    if args.analyze:
        return reanalyze(Path(args.analyze))
    mode = "quick" if args.quick else "full"
    config = resolve(args, PRESETS[mode]) | {"mode": mode, "device": args.device, "data": args.data}
    check_args(config)
    cells = [(b, t) for b in config["batch_sizes"] for t in config["token_budgets"]]
    check_cells([*cells, tuple(config["amplitude_cell"])], config)
    steps = [k / AMPLITUDE_STEP for k in config["log2_amplitudes"]]
    if any(abs(x - round(x)) > 1e-9 for x in steps):
        parser.error(f"--log2-amplitudes must be multiples of {AMPLITUDE_STEP}, got {config['log2_amplitudes']}")
    out = Path(args.out)
    path = out / f"{NAME}_{mode}.json"
    replay = replay_finished(path, config, args.device, run_lists=("runs", "amplitude_runs")) if args.resume else None
    payload = new_payload(NAME, config, args.device)
    runs: list[dict] = []
    amplitude_runs: list[dict] = []
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

    jobs = [job for b, t in cells for job in jobs_for(b, t, sweep.start((b, t), config["log2_lrs"]))]

    def on_result(job: dict[str, Any], record: dict[str, Any]) -> list[dict[str, Any]]:
        record["loss"] = final_loss(record)  # inf (null in JSON) = blew up; the field `lightning-power calibrate` reads
        record["curve"] = None  # the fit needs final losses only
        runs.append(record)
        print(
            f"[{len(runs):4d}] batch {record['batch_size']:4d} tokens {record['tokens']:9d} "
            f"lr 2^{record['log2_lr']:+.1f} seed {record['seed']}: {run_outcome(record)}",
            flush=True,
        )
        write_json(path, payload | {"runs": runs})
        key = (job["batch_size"], job["tokens"])
        return jobs_for(*key, sweep.record(key, job["log2_lr"], job["seed"], record["loss"]))

    if args.plan:
        print_plan(NAME, config, jobs, ("batch_size", "tokens"))
        if config["amplitude_search"]:
            print(
                f"After the fit, Power's amplitude search trains {len(config['log2_amplitudes'])} runs or more in the "
                f"cell batch {config['amplitude_cell'][0]}, tokens {config['amplitude_cell'][1]}."
            )
        return 0
    complete = run_sweep(jobs, run_schedule_job, config, args.device, on_result, runs, replay)
    if not runs:
        return 1
    law = analyze(runs, [], config)["power"]
    if complete and config["amplitude_search"] and law is not None and law["b"] < 0:
        complete = search_amplitude(law, config, payload | {"runs": runs}, amplitude_runs, path, replay)
    return report(payload | {"runs": runs, "amplitude_runs": amplitude_runs, "complete": complete}, path)


def search_amplitude(
    law: dict[str, Any],
    config: dict[str, Any],
    payload: dict[str, Any],
    amplitude_runs: list[dict],
    path: Path,
    replay: Callable[[dict[str, Any]], dict[str, Any] | None] | None,
) -> bool:
    """The second stage: Power with the fitted law at a * 2^k in ``config["amplitude_cell"]``, k from
    ``config["log2_amplitudes"]``, extended past an edge and refined with more seeds like an LR sweep. Appends the
    records (with ``log2_amplitude`` = k) to ``amplitude_runs``; True when every run finished."""
    batch, tokens = config["amplitude_cell"]
    law = {key: law[key] for key in POWER_LAW}
    sweep = LRSweep(config["seeds"], config["refine"], step=AMPLITUDE_STEP)

    def jobs_for(k_seeds: list[tuple[float, int]]) -> list[dict[str, Any]]:
        return [
            {
                "schedule": "power",
                "batch_size": batch,
                "tokens": tokens,
                "log2_lr": math.log2(law["lr_max"]),
                "seed": seed,
                "cost": tokens,
                "config": config,
                "power": law | {"a": law["a"] * 2.0**k},
                "log2_amplitude": k,
            }
            for k, seed in k_seeds
        ]

    def on_result(job: dict[str, Any], record: dict[str, Any]) -> list[dict[str, Any]]:
        record |= {"log2_amplitude": job["log2_amplitude"], "loss": final_loss(record), "curve": None}
        amplitude_runs.append(record)
        print(
            f"[power {len(amplitude_runs):3d}] batch {batch} tokens {tokens} a x 2^{job['log2_amplitude']:+.1f} "
            f"= {job['power']['a']:.4g} seed {record['seed']}: {run_outcome(record)}",
            flush=True,
        )
        write_json(path, payload | {"amplitude_runs": amplitude_runs})
        return jobs_for(sweep.record("k", job["log2_amplitude"], job["seed"], record["loss"]))

    jobs = jobs_for(sweep.start("k", config["log2_amplitudes"]))
    return run_sweep(jobs, run_schedule_job, config, config["device"], on_result, amplitude_runs, replay)


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
    """Analyze ``payload["runs"]`` and ``payload["amplitude_runs"]``, write the JSON to ``path`` and the figure beside
    it, print the result."""
    summary = analyze(payload["runs"], payload.get("amplitude_runs") or [], payload["config"])
    payload |= summary
    write_json(path, payload)
    plot(summary, payload, path.with_suffix(".png"))
    if summary["fit"] is None:
        print(f"no fit: {summary['fit_error']}")
    else:
        print(summary["table"])
        search = summary["amplitude_search"]
        if search is not None:
            print(
                f"Power amplitude search at batch {search['cell'][0]}, {search['cell'][1]} tokens: "
                + (
                    f"best a = fit's a x 2^{search['log2_multiplier']:+.2f} = {search['a']:.4g}"
                    f"{'' if search['interior'] else ' (at the grid edge)'}"
                    if search["error"] is None
                    else f"no amplitude: {search['error']}"
                )
            )
        if summary["yaml"]:
            print(summary["yaml"], end="")
        else:
            print(f"no PowerScheduler YAML: {summary['yaml_error']}")
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0 if payload["complete"] and summary.get("yaml") else 1


if __name__ == "__main__":
    sys.exit(main())
