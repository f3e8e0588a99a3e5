"""GPU check: every feature at once on CUDA with bf16-mixed precision, under every strategy the machine can run.

The recipe is ``examples/configs/gpt_mup_power.yaml`` (muP, the Power scheduler with a TokenCounter) plus the
UpdateSparsityMonitor, run through the ``lightning-power`` console script exactly as the CPU test matrix
(``tests/test_all_features.py``) runs it, at a GPU width. Each strategy's run is compared with the single-device run:

- the LR sequence and the token counts must be equal;
- the loss must agree within ``--loss-rtol`` (bf16 kernels and FSDP's mixed precision round differently);
- the sparsity numbers must agree within ``--sparsity-atol``.

Then the single-device run is killed with SIGKILL mid-run and resumed from ``last.ckpt``: its LRs, token counts and
sparsity series must equal the uninterrupted run's, and its losses agree within ``--loss-rtol`` (CUDA kernels are
not bit-deterministic).

One GPU runs: single device, FSDPStrategy (FSDP1) and ModelParallelStrategy (FSDP2) on one device. Two or more GPUs
add DDP, FSDP1 and FSDP2 on two. Run it from the repository root (it uses the test helpers' step recorder)::

    python benchmarks/gpu_check.py                       # CUDA, bf16-mixed; writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --accelerator cpu --precision 32-true --steps 4 --width 64   # a CPU smoke run

It prints a table, writes JSON (rewritten after every run; a SIGTERM leaves the finished runs with
``"complete": false``), and exits 1 if any check fails or the check was stopped.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from common import RESULTS, Interrupted, environment, machine_label, write_json  # noqa: E402

from tests.helpers.callbacks import read_records  # noqa: E402
from tests.helpers.recipe import fit_in, fit_until_killed, recipe_args, sparsity_history, train_losses  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--precision", default="bf16-mixed", help="trainer.precision (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--width", type=int, default=512, help="model width; muP's base is 32 (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--context", type=int, default=256, help="context length (default: %(default)s)")
    parser.add_argument("--global-batch", type=int, default=32, help="sequences per step (default: %(default)s)")
    parser.add_argument("--devices", type=int, help="devices to use, 1 or 2 (default: every GPU; 1 on CPU)")
    parser.add_argument("--loss-rtol", type=float, default=2e-2)
    parser.add_argument("--sparsity-atol", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json", help="JSON path (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.steps < 4 or args.steps % 2:
        parser.error(f"--steps must be an even number >= 4, got {args.steps}")
    if args.width < 64:
        parser.error(f"--width must be >= 64 (muP's delta model has width 64), got {args.width}")
    devices = _device_count(args.accelerator) if args.devices is None else args.devices
    if devices == 0:
        parser.error("--accelerator cuda: no CUDA device here; use --accelerator cpu for a smoke run")

    def recipe(strategy: str | None, n_devices: int = 1, max_steps: int = args.steps, extra=()) -> list[str]:
        return recipe_args(
            devices=n_devices,
            strategy=strategy,
            max_steps=max_steps,
            width=args.width,
            depth=args.depth,
            context=args.context,
            global_batch=args.global_batch,
            checkpoint_every=args.steps // 2,
            accelerator=args.accelerator,
            precision=args.precision,
            extra=extra,
        )

    runs: list[tuple[str, str | None, int]] = [("single", None, 1), ("fsdp x1", "fsdp", 1), ("fsdp2 x1", "fsdp2", 1)]
    if devices >= 2 and args.global_batch % 2 == 0:
        runs += [("ddp x2", "ddp", 2), ("fsdp x2", "fsdp", 2), ("fsdp2 x2", "fsdp2", 2)]
    results: list[dict[str, Any]] = []

    def write_report(complete: bool) -> dict[str, Any]:
        """The JSON so far, rewritten after every run: a time limit still leaves the finished comparisons."""
        report = {
            "machine": machine_label(environment(args.accelerator)),
            "environment": environment(args.accelerator),
            "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "runs": results,
            "complete": complete,
            "passed": complete and all(result.get("passed", True) for result in results),
        }
        write_json(args.out, report)
        return report

    def stop(signum: int, frame: Any) -> None:  # subprocess.run kills the running job when this raises
        raise Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    complete = False
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
            folders = {}
            for name, strategy, n_devices in runs:
                started = time.perf_counter()
                folders[name] = fit_in(Path(work) / name.replace(" ", "-"), recipe(strategy, n_devices), timeout=1200)
                seconds = time.perf_counter() - started
                comparison = {} if name == "single" else compare(folders["single"], folders[name], args)
                results.append({"run": name, "seconds": round(seconds, 1), **comparison})
                print(f"{name}: {seconds:.0f} s {comparison}", flush=True)
                write_report(complete=False)

            resumed = Path(work) / "killed-and-resumed"
            kill = [
                "--trainer.callbacks+=tests.helpers.callbacks.KillAtStep",
                f"--trainer.callbacks.step={args.steps - 1}",
            ]
            fit_until_killed(resumed, recipe(None, extra=kill))
            fit_in(resumed, recipe(None, extra=["--ckpt_path=ckpt/last.ckpt"]), timeout=1200)
            results.append(
                {"run": "single, SIGKILL + resume", **compare(folders["single"], resumed, args, resumed=True)}
            )
        complete = True
    except Interrupted:
        print("stopped by SIGTERM: the JSON holds the runs finished so far (complete: false)", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    report = write_report(complete)
    print_table(report)
    return 0 if report["passed"] else 1


def compare(reference: Path, run: Path, args: argparse.Namespace, resumed: bool = False) -> dict[str, Any]:
    """How ``run`` differs from ``reference``: equal LRs and tokens, losses and sparsity within tolerance.

    Losses are the logged ``train/loss`` (the mean over ranks); a killed-and-resumed single-device run's come from
    the step recorder, which writes each step as it ends (a killed CSV logger may not have flushed).
    """
    want, got = read_records(reference / "steps.jsonl"), read_records(run / "steps.jsonl")
    same_steps = sorted(want) == sorted(got)
    lrs_equal = same_steps and all(want[step]["lrs"] == got[step]["lrs"] for step in want)
    tokens_equal = same_steps and all(want[step]["tokens_seen"] == got[step]["tokens_seen"] for step in want)
    if resumed:
        losses_want = {step: record["loss"] for step, record in want.items()}
        losses_got = {step: record["loss"] for step, record in got.items()}
    else:
        losses_want, losses_got = train_losses(reference), train_losses(run)
    loss_rel = max(abs(losses_got[step] / losses_want[step] - 1) for step in losses_want)
    history_want, history_got = sparsity_history(reference), sparsity_history(run)
    sparsity_diff = max(
        abs(got_metrics[key] - value)
        for (_, want_metrics), (_, got_metrics) in zip(history_want, history_got, strict=True)
        for key, value in want_metrics.items()
        if key.startswith("update_sparsity/")
    )
    return {
        "lrs_equal": lrs_equal,
        "tokens_equal": tokens_equal,
        "max_loss_rel_diff": loss_rel,
        "max_sparsity_abs_diff": sparsity_diff,
        "final_loss": losses_got[max(losses_got)],
        "final_update_sparsity": history_got[-1][1]["update_sparsity/total"],
        "passed": lrs_equal and tokens_equal and loss_rel <= args.loss_rtol and sparsity_diff <= args.sparsity_atol,
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['machine']}")
    print(f"{'run':<26} {'LRs':>5} {'tokens':>6} {'loss rel diff':>14} {'sparsity diff':>14} {'passed':>7}")
    for row in report["runs"]:
        if "passed" not in row:
            continue
        print(
            f"{row['run']:<26} {_yes(row['lrs_equal']):>5} {_yes(row['tokens_equal']):>6} "
            f"{row['max_loss_rel_diff']:>14.2e} {row['max_sparsity_abs_diff']:>14.2e} {_yes(row['passed']):>7}"
        )
    print(f"all passed: {_yes(report['passed'])}" + ("" if report["complete"] else " (stopped before the end)"))


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def _device_count(accelerator: str) -> int:
    import torch

    return 1 if accelerator == "cpu" else torch.cuda.device_count()


if __name__ == "__main__":
    sys.exit(main())
