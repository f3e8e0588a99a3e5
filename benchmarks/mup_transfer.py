"""muP learning-rate transfer across width: the Tensor Programs V (arXiv 2203.03466) Fig. 1 experiment on the demo GPT.

For every width, parametrization (SP, muP) and learning rate on a 2^k grid, train the demo GPT for a fixed token
budget (AdamW, gradients clipped at norm 1, WSD: linear warmup, constant, 1-sqrt decay over the last 20 %) and record
the validation loss. Per width it reports the optimal log2 LR (a parabola through the best grid point and its
neighbours, averaged over seeds), the drift of that optimum from the narrowest to the widest width, and the loss at
each optimum. muP should keep the optimum in place, with wider models better at the transferred LR, while SP's
optimum moves. muP's base width (32) is where init_std and readout_multiplier were tuned (``common.MODEL``).

Seed 0 runs the whole LR grid (extended by up to two LRs when its best is at an edge); the other seeds run at the
``--refine`` LRs around seed 0's optimum, where the parabola is fitted and seed noise matters most.

Usage::

    python benchmarks/mup_transfer.py --quick                  # 2 CPU cores: widths 32-256, about 17 minutes
    python benchmarks/mup_transfer.py --device cuda            # one GPU: widths 128-2048, about 4 minutes
    python benchmarks/mup_transfer.py --quick --resume         # reuse the finished runs in --out, train the rest

JSON: ``optimal_log2_lr.{sp,mup}.{width}``, ``drift_log2.{sp,mup}``, ``best_loss``, ``loss_at_transferred_lr``,
``goals``, ``runs`` (one record per training run), ``config`` and ``environment``.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    MODEL,
    SWEEP,
    LRSweep,
    add_resume_flag,
    benchmark_parser,
    build_gpt,
    check_args,
    final_loss,
    load_corpus,
    log2_grid,
    machine_label,
    make_optimizer,
    make_scheduler,
    matplotlib_pyplot,
    new_payload,
    print_plan,
    replay_finished,
    resolve,
    run_outcome,
    run_sweep,
    save_figure,
    train,
    write_json,
)

from lightning_power.calibrate import optimal_log2_lr

NAME = "mup_transfer"
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(
        MODEL,
        **SWEEP["quick"],
        widths=[32, 64, 128, 256],
        log2_lrs=log2_grid(-9, -3),
        steps=180,
        warmup=20,
        decay_fraction=0.2,
        decay_shape="1-sqrt",
        grad_clip=1.0,
        batch_size=32,
        parametrizations=["sp", "mup"],
    ),
    "full": dict(
        MODEL,
        **SWEEP["full"],
        widths=[128, 256, 512, 1024, 2048],
        log2_lrs=log2_grid(-11, -3),
        steps=300,
        warmup=30,
        decay_fraction=0.2,
        decay_shape="1-sqrt",
        grad_clip=1.0,
        batch_size=32,
        parametrizations=["sp", "mup"],
    ),
}
# What a run's result depends on besides its job (parametrization, width, LR, seed), for --resume.
RUN_SETTINGS = (
    *MODEL,
    "steps",
    "warmup",
    "decay_fraction",
    "decay_shape",
    "grad_clip",
    "batch_size",
    "train_bytes",
    "val_windows",
    "data",
    "device",
)
GOAL_DRIFT = 0.5  # muP's optimum may move at most this many log2 units across the widths
GOAL_QUALITY = 0.01  # muP's widest loss within 1 % of SP's best-tuned widest loss


def run_key(run: dict[str, Any], config: dict[str, Any]) -> tuple:
    """What identifies a run (a job or its record) within one config's ``RUN_SETTINGS``."""
    return (run["parametrization"], run["width"], run["log2_lr"], run["seed"])


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (parametrization, width, LR, seed) and return its record; runs in a worker process."""
    c = job["config"]
    corpus = load_corpus(c["data"], c["context_length"], c["train_bytes"], c["val_windows"])
    model, plan = build_gpt(job["width"], job["parametrization"], c, seed=job["seed"])
    model.to(c["device"])
    optimizer = make_optimizer(model, plan, 2.0 ** job["log2_lr"])
    batch_tokens = c["batch_size"] * c["context_length"]
    scheduler = make_scheduler(
        "wsd",
        optimizer,
        steps=c["steps"],
        batch_tokens=batch_tokens,
        warmup_tokens=c["warmup"] * batch_tokens,
        decay_fraction=c["decay_fraction"],
        decay_shape=c["decay_shape"],
    )
    result = train(
        model,
        optimizer,
        scheduler,
        corpus,
        batch_size=c["batch_size"],
        steps=c["steps"],
        seed=job["seed"],
        device=c["device"],
        grad_clip=c["grad_clip"],
    )
    record = {key: job[key] for key in ("parametrization", "width", "log2_lr", "seed")}
    return {**record, **result.to_dict(), "curve": None}


def mean_losses(runs: list[dict]) -> dict[str, dict[int, dict[float, tuple[float, int]]]]:
    """``[parametrization][width][log2_lr] = (mean loss over seeds, seeds)``; one seed that blew up makes it ``inf``."""
    by_cell: dict[tuple, list[float]] = defaultdict(list)
    for run in runs:
        by_cell[(run["parametrization"], run["width"], run["log2_lr"])].append(final_loss(run))
    table: dict = defaultdict(lambda: defaultdict(dict))
    for (param, width, log2_lr), losses in sorted(by_cell.items()):
        mean = float(np.mean(losses)) if all(math.isfinite(x) for x in losses) else math.inf
        table[param][width][log2_lr] = (mean, len(losses))
    return table


def analyze(runs: list[dict]) -> dict[str, Any]:
    """Optima, drifts, losses at the optima and at the transferred LR, and the goals, from the finished runs."""
    table = mean_losses(runs)
    optimum, interior, best, at_transferred, drift, wider_better = {}, {}, {}, {}, {}, {}
    for param, by_width in table.items():
        optimum[param], interior[param], best[param], at_transferred[param] = {}, {}, {}, {}
        for width, by_lr in sorted(by_width.items()):
            lrs = sorted(by_lr)
            losses = [by_lr[x][0] for x in lrs]
            if not any(math.isfinite(x) for x in losses):
                continue
            log2_opt, inside = optimal_log2_lr([2.0**x for x in lrs], losses)
            optimum[param][width], interior[param][width], best[param][width] = log2_opt, inside, min(losses)
        widths = sorted(optimum[param])
        if len(widths) < 2:
            continue
        drift[param] = optimum[param][widths[-1]] - optimum[param][widths[0]]
        # the transferred LR: the grid point nearest the narrowest width's optimum, used at every width
        transferred = min(by_width[widths[0]], key=lambda x: abs(x - optimum[param][widths[0]]))
        for width in widths:
            at_transferred[param][width] = by_width[width].get(transferred, (math.nan, 0))[0]
        losses = [at_transferred[param][w] for w in widths]
        wider_better[param] = all(later < earlier for earlier, later in itertools.pairwise(losses))
    summary: dict[str, Any] = {
        "optimal_log2_lr": optimum,
        "optimum_inside_grid": interior,
        "drift_log2": drift,
        "best_loss": best,
        "loss_at_transferred_lr": at_transferred,
        "wider_better_at_transferred_lr": wider_better,
        "mean_loss": {
            param: {width: {str(x): v[0] for x, v in by_lr.items()} for width, by_lr in by_width.items()}
            for param, by_width in table.items()
        },
    }
    summary["goals"] = goals(summary)
    return summary


def goals(summary: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's goals, each with the measured number next to its verdict."""
    drift, best, at_transferred = summary["drift_log2"], summary["best_loss"], summary["loss_at_transferred_lr"]
    result: dict[str, Any] = {}
    if "mup" in drift:
        result["mup_drift_within_0.5"] = {"drift_log2": drift["mup"], "met": abs(drift["mup"]) <= GOAL_DRIFT}
        result["mup_wider_better_at_transferred_lr"] = {"met": summary["wider_better_at_transferred_lr"]["mup"]}
    if "sp" in drift:
        result["sp_optimum_moves_more_than_0.5"] = {"drift_log2": drift["sp"], "met": abs(drift["sp"]) > GOAL_DRIFT}
    if "sp" in drift and "mup" in drift:
        widest = max(best["sp"])
        sp_best = best["sp"][widest]
        mup_best, mup_transferred = best["mup"].get(widest, math.nan), at_transferred["mup"].get(widest, math.nan)
        result["mup_widest_within_1pct_of_sp_best"] = {
            "width": widest,
            "sp_best": sp_best,
            "mup_best": mup_best,
            "mup_at_transferred_lr": mup_transferred,
            "mup_best_vs_sp_best": mup_best / sp_best - 1,
            "mup_transferred_vs_sp_best": mup_transferred / sp_best - 1,
            "met": mup_transferred / sp_best - 1 <= GOAL_QUALITY,
        }
    return result


def print_table(summary: dict[str, Any], config: dict[str, Any]) -> None:
    print(f"\n{'param':>9} {'width':>6} {'opt log2 LR':>12} {'best loss':>10} {'loss @ transferred LR':>22}")
    for param, by_width in summary["optimal_log2_lr"].items():
        for width, log2_opt in by_width.items():
            edge = "" if summary["optimum_inside_grid"][param][width] else " (not bracketed: best grid point)"
            transferred = summary["loss_at_transferred_lr"].get(param, {}).get(width, math.nan)
            print(
                f"{param:>9} {width:>6} {log2_opt:>12.2f} {summary['best_loss'][param][width]:>10.4f} "
                f"{transferred:>22.4f}{edge}"
            )
    for param, drift in summary["drift_log2"].items():
        span = max(config["widths"]) // min(config["widths"])
        print(f"drift of the optimum, {param}: {drift:+.2f} log2 units over {span}x width")
    for name, goal in summary["goals"].items():
        numbers = ", ".join(f"{k}={v:.4g}" for k, v in goal.items() if isinstance(v, float))
        print(f"goal {name}: {'MET' if goal['met'] else 'NOT MET'} ({numbers})")


def plot(summary: dict[str, Any], runs: list[dict], payload: dict[str, Any], path: Path) -> None:
    plt = matplotlib_pyplot()
    params = list(summary["mean_loss"])
    fig, axes = plt.subplots(1, len(params), figsize=(5.5 * len(params), 4.2), sharey=True, squeeze=False)
    low = min(final_loss(r) for r in runs)
    widths = sorted({r["width"] for r in runs})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(widths)))
    for ax, param in zip(axes[0], params):
        for width, color in zip(widths, colors):
            by_lr = summary["mean_loss"][param].get(width, {})
            xs = sorted(by_lr, key=float)
            ax.plot([float(x) for x in xs], [by_lr[x] for x in xs], "o-", color=color, ms=3, label=f"width {width}")
            seeds = [r for r in runs if r["parametrization"] == param and r["width"] == width]
            kept = [r for r in seeds if math.isfinite(final_loss(r))]
            ax.plot([r["log2_lr"] for r in kept], [r["val_loss"] for r in kept], ".", color=color, ms=2, alpha=0.5)
            lost = [r["log2_lr"] for r in seeds if not math.isfinite(final_loss(r))]
            ax.plot(lost, [low + 0.95] * len(lost), "x", color=color, ms=5)  # blew up: drawn at the top
            if width in summary["optimal_log2_lr"].get(param, {}):
                ax.axvline(summary["optimal_log2_lr"][param][width], color=color, ls=":", lw=1)
        drift = summary["drift_log2"].get(param)
        ax.set_title(f"{param}: optimum drift {drift:+.2f} log2 (x: blew up)" if drift is not None else param)
        ax.set_xlabel("log2 learning rate")
        if math.isfinite(low):
            ax.set_ylim(low - 0.05, low + 1.0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"validation loss (nats/byte) after {payload['config']['steps']} steps")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"muP LR transfer, demo GPT ({machine_label(payload['environment'])})", fontsize=10)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--widths", type=int, nargs="+", help="model widths (each >= --base-width)")
    parser.add_argument("--log2-lrs", type=float, nargs="+", help="the LR grid in log2 units, e.g. -9 -8 ... -3")
    parser.add_argument("--seeds", type=int, help="seeds per LR near the optimum")
    parser.add_argument("--refine", type=int, help="LRs around seed 0's optimum that the other seeds run")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (the token budget)")
    parser.add_argument("--warmup", type=int, help="warmup steps")
    parser.add_argument("--batch-size", type=int, help="sequences per step")
    parser.add_argument(
        "--parametrizations",
        nargs="+",
        choices=["sp", "mup", "mup_zero"],
        help="sp, mup (default readout init) and/or mup_zero (zero-init readout and query)",
    )
    add_resume_flag(parser)
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    config = resolve(args, PRESETS[mode]) | {"mode": mode, "device": args.device, "data": args.data}
    check_args(config)
    if len(config["widths"]) < 2 or len(config["log2_lrs"]) < 3:
        parser.error("give at least 2 widths and 3 learning rates")
    path = Path(args.out) / f"{NAME}_{mode}.json"
    replay = replay_finished(path, config, args.device, run_key=run_key, settings=RUN_SETTINGS) if args.resume else None
    payload = new_payload(NAME, config, args.device)
    runs: list[dict] = []
    sweep = LRSweep(config["seeds"], config["refine"])

    def jobs_for(param: str, width: int, lr_seeds: list[tuple[float, int]]) -> list[dict[str, Any]]:
        cost = width * width + 64 * width
        return [
            {"parametrization": param, "width": width, "log2_lr": x, "seed": seed, "cost": cost, "config": config}
            for x, seed in lr_seeds
        ]

    jobs = [
        job
        for p in config["parametrizations"]
        for w in config["widths"]
        for job in jobs_for(p, w, sweep.start((p, w), config["log2_lrs"]))
    ]

    def on_result(job: dict[str, Any], record: dict[str, Any]) -> list[dict[str, Any]]:
        runs.append(record)
        print(
            f"[{len(runs):4d}] {record['parametrization']:>8} width {record['width']:5d} "
            f"lr 2^{record['log2_lr']:+.1f} seed {record['seed']}: {run_outcome(record)}",
            flush=True,
        )
        write_json(path, payload | {"runs": runs})
        key = (job["parametrization"], job["width"])
        return jobs_for(*key, sweep.record(key, job["log2_lr"], job["seed"], final_loss(record)))

    if args.plan:
        tokens_per_run = config["steps"] * config["batch_size"] * config["context_length"]
        print_plan(NAME, config, jobs, ("parametrization", "width"), tokens_of=lambda job: tokens_per_run)
        return 0
    payload["complete"] = run_sweep(jobs, run_job, config, args.device, on_result, runs, replay)
    if not runs:
        return 1
    summary = analyze(runs)
    payload |= summary | {"runs": runs}
    write_json(path, payload)
    plot(summary, runs, payload, path.with_suffix(".png"))
    print_table(summary, config)
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0 if payload["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
