"""Power vs tuned WSD and cosine across batch size and token budget: the Power paper's claim (arXiv 2408.13359, sec. 5).

For every cell of batch size {B, 4B} x token budget {D, 4D}, the muP demo GPT trains with WSD and with cosine, each
tuned on a 2^k LR grid around the law's prediction (extended when the best LR is at an edge), and with the Power
scheduler at **one fixed** (a, b, p, lr_max) for all cells. It reports per cell the best tuned losses, Power's untuned
loss, and ``power_gap_vs_best_wsd`` = Power's loss / best WSD loss - 1; the goal is <= 1 % in every cell. All
schedules share the warmup (in tokens) and end with the same decay over the last 10 % (exponential to 0, the paper's).

(a, b, p, lr_max) come from ``--calibration`` (a ``calibrate_power.py`` JSON: its ``power`` key, the law it chose
with the amplitude its Power search found; by default ``<out>/calibrate_power_<mode>.json`` when it exists), else
the paper's defaults a = 4, b = -0.51, p = 1, lr_max = 0.02; ``--a``, ``--b``, ``--batch-exponent``, ``--lr-max``
override. p is the batch exponent of the law, LR = min(lr_max, beta^p * a * n^b). The WSD and cosine grids centre
on the fitted law's optimum (the fit's own a).

Usage::

    python benchmarks/calibrate_power.py --quick && python benchmarks/schedule_transfer.py --quick   # CPU
    python benchmarks/calibrate_power.py && python benchmarks/schedule_transfer.py                   # GPU
    python benchmarks/schedule_transfer.py --quick --resume   # reuse the finished runs in --out, train the rest

JSON: ``power_gap_vs_best_wsd.{cell}``, ``power_gap_vs_best_cosine.{cell}``, ``cells`` (per cell: best LRs and
losses, Power's loss and seeds), ``goals``, ``power`` (a, b, batch_exponent, lr_max, source), ``runs`` (with train
curves ``[tokens, loss, lr]``), ``config`` and ``environment``. The cell key is ``batch{B}_tokens{D}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    MODEL,
    SCHEDULE_RUN,
    SWEEP,
    TOKENS_D,
    LRSweep,
    add_resume_flag,
    benchmark_parser,
    check_args,
    check_cells,
    final_loss,
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

from lightning_power.calibrate import optimal_log2_lr
from lightning_power.schedules import power_lr

NAME = "schedule_transfer"
PAPER_POWER = {"a": 4.0, "b": -0.51, "batch_exponent": 1.0, "lr_max": 0.02}  # arXiv 2408.13359, section 4
D_QUICK, D_FULL = TOKENS_D["quick"], TOKENS_D["full"]
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(
        MODEL,
        **SWEEP["quick"],
        **SCHEDULE_RUN["quick"],
        width=64,
        batch_sizes=[4, 16],
        token_budgets=[D_QUICK, 4 * D_QUICK],
        grid_halfwidth=1,
    ),
    "full": dict(
        MODEL,
        **SWEEP["full"],
        **SCHEDULE_RUN["full"],
        width=256,
        batch_sizes=[16, 64],
        token_budgets=[D_FULL, 4 * D_FULL],
        grid_halfwidth=2,
    ),
}
SCHEDULES = ("wsd", "cosine", "power")
GOAL_GAP = 0.01


def cell_key(batch_size: int, tokens: int) -> str:
    return f"batch{batch_size}_tokens{tokens}"


def power_settings(args: argparse.Namespace, out: Path, mode: str) -> dict[str, Any]:
    """(a, b, batch_exponent, lr_max), where they came from (a calibration file, else the paper; flags override each
    value), and ``grid_a``: the a of the fitted WSD law that centres the tuning grids."""
    path = Path(args.calibration) if args.calibration else out / f"calibrate_power_{mode}.json"
    settings = dict(PAPER_POWER, source="paper defaults (arXiv 2408.13359, section 4)")
    if path.exists():
        calibration = json.loads(path.read_text())
        if not calibration.get("fit"):
            raise SystemExit(f"--calibration {path} holds no fit: {calibration.get('fit_error', 'no finished runs')}")
        if calibration.get("complete") is False and not args.allow_partial_calibration:
            raise SystemExit(
                f"--calibration {path} is a sweep cut short (complete: false): its fit or Power amplitude may miss "
                "runs. Finish it with calibrate_power.py --resume, or pass --allow-partial-calibration"
            )
        fit = calibration["fit"]
        law = calibration.get("power") or {  # a calibration from before the amplitude search: the fit itself
            "a": fit["a"],
            "b": fit["b"],
            "batch_exponent": fit.get("batch_exponent", 1.0),
            "lr_max": calibration["lr_max"],
        }
        settings = {key: law[key] for key in ("a", "b", "batch_exponent", "lr_max")} | {
            "grid_a": fit["a"],
            "source": str(path)
            + ("; a from its Power amplitude search" if law.get("amplitude_searched") else "")
            + ("; an unfinished calibration" if calibration.get("complete") is False else ""),
        }
    elif args.calibration:
        raise SystemExit(f"--calibration {path} does not exist")
    for key in ("a", "b", "batch_exponent", "lr_max"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
            settings["source"] += f"; {key} from the command line"
    if not (
        settings["a"] > 0 and settings["b"] < 0 and settings["lr_max"] > 0 and 0 <= settings["batch_exponent"] <= 2
    ):
        raise SystemExit(
            f"Power needs a > 0, b < 0, lr_max > 0 and batch_exponent in [0, 2], got {settings} (a fitted b >= 0 "
            "means the law did not hold in that sweep)"
        )
    return settings


def predicted_log2_lr(power: dict[str, Any], batch_tokens: int, tokens: int) -> float:
    """The law's optimal WSD LR for a cell (Eq. 6), capped at lr_max: the centre of the tuning grid."""
    lr = power_lr(
        tokens,
        batch_tokens=batch_tokens,
        a=power.get("grid_a", power["a"]),
        b=power["b"],
        lr_max=power["lr_max"],
        batch_exponent=power["batch_exponent"],
    )
    return math.log2(lr)


def analyze(runs: list[dict], config: dict[str, Any]) -> dict[str, Any]:
    """Per cell: the tuned optimum of WSD and cosine, Power's loss, and the gaps; plus the goal."""
    losses: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        losses[(cell_key(run["batch_size"], run["tokens"]), run["schedule"])][run["log2_lr"]].append(final_loss(run))
    order = [cell_key(b, t) for b in config["batch_sizes"] for t in config["token_budgets"]]
    cells: dict[str, dict[str, Any]] = {cell: {} for cell in order if any(key[0] == cell for key in losses)}
    for (cell, schedule), by_lr in losses.items():
        means = {x: float(np.mean(v)) if all(math.isfinite(y) for y in v) else math.inf for x, v in by_lr.items()}
        best = min(means, key=means.get)
        entry = cells[cell]
        if schedule == "power":
            entry["power"] = {"loss": means[best], "seeds": by_lr[best], "lr_max": 2.0**best}
            continue
        lrs = sorted(means)
        log2_opt, inside = (best, False)
        if len(lrs) > 1 and math.isfinite(means[best]):  # every LR blew up: no optimum, the grid is too high
            log2_opt, inside = optimal_log2_lr([2.0**x for x in lrs], [means[x] for x in lrs])
        entry[schedule] = {
            "best_loss": means[best],
            "best_log2_lr": best,
            "seeds_at_best": by_lr[best],
            "optimal_log2_lr": log2_opt,
            "optimum_inside_grid": inside,
            "mean_loss": {str(x): means[x] for x in lrs},
        }
    gaps: dict[str, dict[str, float]] = {"wsd": {}, "cosine": {}}
    for cell, entry in cells.items():
        for schedule in ("wsd", "cosine"):
            # A schedule whose every LR blew up has no tuned loss to compare with: no gap, and the goal is not met.
            if "power" in entry and schedule in entry and math.isfinite(entry[schedule]["best_loss"]):
                gaps[schedule][cell] = entry["power"]["loss"] / entry[schedule]["best_loss"] - 1
    complete = all(cell in gaps["wsd"] for cell in order)
    worst = max(gaps["wsd"].values(), default=math.nan)
    return {
        "cells": cells,
        "power_gap_vs_best_wsd": gaps["wsd"],
        "power_gap_vs_best_cosine": gaps["cosine"],
        "goals": {
            "power_within_1pct_of_best_wsd_in_every_cell": {
                "worst_gap": worst,
                "cells": len(gaps["wsd"]),
                "met": complete and worst <= GOAL_GAP,
            }
        },
    }


def print_table(summary: dict[str, Any], power: dict[str, Any]) -> None:
    print(
        f"\nPower at a = {power['a']:.4g}, b = {power['b']:.4f}, p = {power['batch_exponent']:.3g}, "
        f"lr_max = {power['lr_max']:.4g} ({power['source']})"
    )
    print(
        f"{'cell':>26} {'WSD best (log2 LR)':>20} {'cosine best (log2 LR)':>23} {'Power':>8} "
        f"{'vs WSD':>8} {'vs cos':>8}"
    )
    for cell, entry in summary["cells"].items():
        wsd, cos, pw = entry.get("wsd", {}), entry.get("cosine", {}), entry.get("power", {})
        fmt = lambda e: f"{e['best_loss']:.4f} ({e['best_log2_lr']:+.0f})" if e else "-"
        gap_w = summary["power_gap_vs_best_wsd"].get(cell, math.nan)
        gap_c = summary["power_gap_vs_best_cosine"].get(cell, math.nan)
        power_loss = pw.get("loss", math.nan)
        print(f"{cell:>26} {fmt(wsd):>20} {fmt(cos):>23} {power_loss:>8.4f} {gap_w:>+8.2%} {gap_c:>+8.2%}")
    goal = summary["goals"]["power_within_1pct_of_best_wsd_in_every_cell"]
    print(
        f"goal: Power within 1% of the best-tuned WSD in every cell: {'MET' if goal['met'] else 'NOT MET'} "
        f"(worst gap {goal['worst_gap']:+.2%} over {goal['cells']} cells)"
    )


def plot(summary: dict[str, Any], runs: list[dict], payload: dict[str, Any], path: Path) -> None:
    plt = matplotlib_pyplot()
    cells = list(summary["cells"])
    fig, axes = plt.subplots(2, len(cells), figsize=(4.2 * len(cells), 6.5), squeeze=False)
    colors = {"wsd": "tab:blue", "cosine": "tab:orange", "power": "tab:green"}
    for column, cell in enumerate(cells):
        entry = summary["cells"][cell]
        ends = []
        for schedule in SCHEDULES:
            if schedule not in entry:
                continue
            log2_lr = math.log2(entry["power"]["lr_max"]) if schedule == "power" else entry[schedule]["best_log2_lr"]
            run = next(
                (
                    r
                    for r in runs
                    if cell_key(r["batch_size"], r["tokens"]) == cell
                    and r["schedule"] == schedule
                    and r["log2_lr"] == log2_lr
                    and r["seed"] == 0
                ),
                None,
            )
            if run is None or not run["curve"]:
                continue
            tokens, loss, lr = np.array(run["curve"]).T
            label = schedule if schedule == "power" else f"{schedule} (best, 2^{log2_lr:+.0f})"
            axes[0][column].plot(tokens, lr, color=colors[schedule], label=label)
            axes[1][column].plot(tokens, loss, color=colors[schedule], label=label)
            ends.append(loss[-1])
        gap = summary["power_gap_vs_best_wsd"].get(cell)
        axes[0][column].set_title(f"{cell}\nPower vs best WSD: {gap:+.2%}" if gap is not None else cell, fontsize=9)
        axes[0][column].set_yscale("log")
        axes[1][column].set_xlabel("tokens")
        if ends:
            axes[1][column].set_ylim(min(ends) - 0.1, min(ends) + 1.0)
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("base LR (muP)")
    axes[1][0].set_ylabel("train loss (interval mean)")
    axes[0][0].legend(fontsize=7)
    power = payload["power"]
    fig.suptitle(
        f"Power (a={power['a']:.3g}, b={power['b']:.3f}, p={power['batch_exponent']:.3g}, "
        f"lr_max={power['lr_max']:.3g}) vs tuned WSD and "
        f"cosine, muP demo GPT width {payload['config']['width']} ({machine_label(payload['environment'])})",
        fontsize=10,
    )
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--calibration", help="a calibrate_power.py JSON to take a, b and lr_max from")
    parser.add_argument("--a", type=float, help="Power amplitude a (overrides the calibration)")
    parser.add_argument("--b", type=float, help="Power exponent b < 0 (overrides the calibration)")
    parser.add_argument("--batch-exponent", type=float, help="Power batch exponent p (overrides the calibration)")
    parser.add_argument("--lr-max", type=float, help="Power LR cap (overrides the calibration)")
    parser.add_argument(
        "--allow-partial-calibration",
        action="store_true",
        help="accept a calibration that a time limit cut short (complete: false)",
    )
    parser.add_argument("--width", type=int, help="model width")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="sequences per step: B and 4B")
    parser.add_argument("--token-budgets", type=int, nargs="+", help="training tokens: D and 4D")
    parser.add_argument("--grid-halfwidth", type=int, help="WSD/cosine LRs 2^(k-h) .. 2^(k+h) around the law's 2^k")
    parser.add_argument("--seeds", type=int, help="seeds of Power and of the tuned schedules near their optimum")
    parser.add_argument("--refine", type=int, help="LRs around seed 0's optimum that the other seeds run")
    parser.add_argument("--warmup-tokens", type=int, help="warmup tokens (the same for every run)")
    add_resume_flag(parser)
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    out = Path(args.out)
    power = power_settings(args, out, mode)
    config = resolve(args, PRESETS[mode]) | {"mode": mode, "device": args.device, "data": args.data, "power": power}
    check_args(config)
    check_cells([(b, t) for b in config["batch_sizes"] for t in config["token_budgets"]], config)
    path = out / f"{NAME}_{mode}.json"
    replay = replay_finished(path, config, args.device) if args.resume else None
    payload = new_payload(NAME, config, args.device, power=power)
    runs: list[dict] = []
    sweep = LRSweep(config["seeds"], config["refine"])

    def jobs_for(schedule: str, batch: int, tokens: int, lr_seeds: list[tuple[float, int]]) -> list[dict[str, Any]]:
        return [
            {
                "schedule": schedule,
                "batch_size": batch,
                "tokens": tokens,
                "log2_lr": x,
                "seed": seed,
                "cost": tokens,
                "config": config,
            }
            for x, seed in lr_seeds
        ]

    jobs = []
    for batch in config["batch_sizes"]:
        for tokens in config["token_budgets"]:
            centre = round(predicted_log2_lr(power, batch * config["context_length"], tokens))
            grid = range(centre - config["grid_halfwidth"], centre + config["grid_halfwidth"] + 1)
            for schedule in ("wsd", "cosine"):
                jobs += jobs_for(schedule, batch, tokens, sweep.start((schedule, batch, tokens), grid))
            jobs += jobs_for("power", batch, tokens, [(math.log2(power["lr_max"]), s) for s in range(config["seeds"])])

    def on_result(job: dict[str, Any], record: dict[str, Any]) -> list[dict[str, Any]]:
        runs.append(record)
        print(
            f"[{len(runs):4d}] {record['schedule']:>6} batch {record['batch_size']:4d} tokens {record['tokens']:9d} "
            f"lr 2^{record['log2_lr']:+.2f} seed {record['seed']}: {run_outcome(record)}",
            flush=True,
        )
        write_json(path, payload | {"runs": runs})
        if job["schedule"] == "power":
            return []
        key = (job["schedule"], job["batch_size"], job["tokens"])
        return jobs_for(*key, sweep.record(key, job["log2_lr"], job["seed"], final_loss(record)))

    if args.plan:
        print_plan(NAME, config, jobs, ("schedule", "batch_size", "tokens"))
        settings = ", ".join(f"{key} {power[key]:g}" for key in ("a", "b", "batch_exponent", "lr_max"))
        print(f"Power: {settings}, from {power['source']}.")
        return 0
    payload["complete"] = run_sweep(jobs, run_schedule_job, config, args.device, on_result, runs, replay)
    if not runs:
        return 1
    summary = analyze(runs, config)
    payload |= summary | {"runs": runs}
    write_json(path, payload)
    plot(summary, runs, payload, path.with_suffix(".png"))
    print_table(summary, power)
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0 if payload["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
