"""What an update-sparsity check costs: kernel bandwidth, end-to-end step time and GPU memory, in one run.

    python benchmarks/sparsity_overhead.py                         # a CUDA GPU; about 2 minutes on an H100
    python benchmarks/sparsity_overhead.py --quick --device cpu    # tiny sizes on CPU: checks that it runs

(a) Check bandwidth, against the device copy bandwidth measured on the same bytes in the same run:
    - whole model (the demo GPT, >= 100M float32 parameters, compared as bfloat16): the fused check, the check with the
      since-last refresh, the chunked torch path and a plain per-tensor torch count; a few launch settings of the
      fused kernel; the streamed check with pinned-CPU snapshots against the host-to-device copy bandwidth;
    - one tensor of 2**30 bfloat16 elements: fused, ``(a != b).sum()``, the same on int16 views, and ``copy_``.
(b) Step time of the demo GPT (bf16-mixed) without the monitor and with it every 1, 10 and 100 steps (and every 10
    steps with CPU snapshots), as ratios to the mean of two runs without it (run first and last: their spread is the
    noise).
(c) Peak GPU memory of the same runs.

Prints a table and writes ``benchmarks/results/sparsity_overhead.json`` (with ``--quick``:
``sparsity_overhead_quick.json``) and a PNG next to it. JSON: ``machine``, ``kernel_fraction_of_copy_bandwidth``
(whole-model check bandwidth / copy bandwidth), ``step_overhead`` ({"1", "10", "100"}: step time with / without - 1),
``gpu_memory_overhead_bytes``, ``goals`` (each value against its target), the detailed ``whole_model``,
``single_tensor`` and ``end_to_end`` records, and ``environment``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from common import environment, machine_label, save_figure, write_json
from lightning.pytorch.callbacks import Callback
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, TensorDataset

from lightning_power.demo import GPT
from lightning_power.distributed import shard_layout
from lightning_power.sparsity import UpdateSparsityMonitor, counting, fused
from lightning_power.sparsity.checker import UpdateChecker
from lightning_power.sparsity.counting import Piece

NAME = "sparsity_overhead"
FULL = {
    "model": {"width": 1024, "depth": 8, "head_dim": 64, "context_length": 512},
    "batch": 32,
    "tensor_elements": 1 << 30,
    "warmup": 10,
    "measured": 100,
    "repeats": 20,
}
QUICK = {
    "model": {"width": 32, "depth": 1, "head_dim": 16, "context_length": 16},
    "batch": 4,
    "tensor_elements": 1 << 16,
    "warmup": 1,
    "measured": 4,
    "repeats": 2,
}
# (block, tile / block, num_warps) of the fused kernel; the default is (2048, 16, 8)
LAUNCH_SETTINGS = [(1024, 16, 4), (2048, 8, 8), (2048, 16, 8), (2048, 32, 8), (4096, 8, 8), (4096, 16, 16)]
SLEEP_CYCLES = 50_000_000  # ~25 ms of GPU clock: long enough for the CPU to queue one measured call behind it


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    setup: Callable[[], object] | None = None,
    wall: bool = False,
) -> float:
    """Median seconds of ``fn()`` after one warm-up call; ``setup`` runs untimed before each call.

    On CUDA it is device time: two events around ``fn``, queued behind a sleep kernel so that the CPU's launch overhead
    is not counted. ``wall=True`` (and on CPU) it is the wall time of the call, synchronized at both ends.
    """
    times = []
    for i in range(repeats + 1):
        if setup is not None:
            setup()
        synchronize(device)
        if device.type == "cuda" and not wall:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(SLEEP_CYCLES)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            fn()
            synchronize(device)
            seconds = time.perf_counter() - begin
        if i:
            times.append(seconds)
    return statistics.median(times)


def copy_seconds(nbytes: int, device: torch.device, repeats: int) -> float:
    """Device-to-device ``copy_`` moving ``nbytes`` in total (half read, half written)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return timed(lambda: dst.copy_(src), device, repeats)


def gpt(sizes: dict, device: torch.device) -> GPT:
    torch.manual_seed(0)
    return GPT(**sizes["model"]).to(device)


def whole_model_bandwidth(sizes: dict, device: torch.device) -> dict:
    """(a) for every parameter of the demo GPT: fused, refresh, torch paths and copy, in seconds and fractions."""
    model = gpt(sizes, device)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    repeats = sizes["repeats"]
    out: dict = {"parameters": n}

    def checker(**kwargs) -> UpdateChecker:
        c = UpdateChecker(shard_layout(model), compare_as="bfloat16", atol=0.0, snapshot_device=device, **kwargs)
        c.reference.capture(c.local_tensors())
        if c.last is not None:
            c.last.capture(c.local_tensors())
        return c

    flip = [False]

    def move_every_element() -> None:  # worst case for the refresh: every bfloat16 value changes
        flip[0] = not flip[0]
        with torch.no_grad():
            torch._foreach_mul_(params, 1 + 2**-6 if flip[0] else 1 / (1 + 2**-6))

    check_bytes = 6 * n  # float32 parameter + bfloat16 reference, read once
    refresh_bytes = 10 * n  # + bfloat16 since-last read and (worst case) written
    out["copy_check_bytes_s"] = copy_seconds(check_bytes, device, repeats)
    out["copy_parameters_s"] = copy_seconds(8 * n, device, repeats)  # the float32 parameters, copied once
    out["copy_refresh_bytes_s"] = copy_seconds(refresh_bytes, device, repeats)
    use_fused = device.type == "cuda" and fused.supported(torch.float32)
    for name, kwargs, setup in (
        ("fused", {"since_last": False}, None),
        ("fused_refresh", {"since_last": True}, move_every_element),
        ("torch_chunked", {"since_last": False, "fused_kernel": False}, None),
    ):
        if name.startswith("fused") and not use_fused:
            out[f"{name}_s"] = None
            continue
        c = checker(**kwargs)
        out[f"{name}_s"] = timed(c.count, device, repeats, setup)
        if name == "fused_refresh":  # what a check costs the training loop: CPU launch work included
            out["fused_refresh_wall_s"] = timed(c.count, device, repeats, setup, wall=True)
        del c
    references = [counting.representation_bits(p.detach(), "bfloat16").clone() for p in params]

    def per_tensor() -> torch.Tensor:  # the naive check: one cast, compare and sum per parameter
        bits = (counting.representation_bits(p.detach(), "bfloat16") for p in params)
        return sum((b != r).sum() for b, r in zip(bits, references))

    out["torch_per_tensor_s"] = timed(per_tensor, device, repeats)
    references.clear()
    if use_fused:
        out["launch_settings"] = launch_settings(model, device, repeats)
    if device.type == "cuda":
        out.update(streamed_bandwidth(model, device, repeats))

    def fraction(seconds: float | None) -> float | None:
        return None if seconds is None else out["copy_check_bytes_s"] / seconds

    out["fused_fraction_of_copy_bandwidth"] = fraction(out["fused_s"])
    out["torch_chunked_fraction_of_copy_bandwidth"] = fraction(out["torch_chunked_s"])
    out["torch_per_tensor_fraction_of_copy_bandwidth"] = fraction(out["torch_per_tensor_s"])
    if out["fused_refresh_s"] is not None:
        out["fused_refresh_fraction_of_copy_bandwidth"] = out["copy_refresh_bytes_s"] / out["fused_refresh_s"]
        out["fused_refresh_time_over_parameter_copy"] = out["fused_refresh_s"] / out["copy_parameters_s"]
    return out


def launch_settings(model: GPT, device: torch.device, repeats: int) -> list[dict]:
    """The fused check (no refresh) of the whole model under a few (block, tile, num_warps) settings."""
    c = UpdateChecker(shard_layout(model), compare_as="bfloat16", atol=0.0, since_last=False, snapshot_device=device)
    c.reference.capture(c.local_tensors())
    tensors = c.local_tensors()
    group = c.layout.groups[0]
    pieces = [Piece(i, 0, offset, c.layout.numels[i]) for i, offset in zip(group.params, group.offsets)]
    counts = torch.zeros(len(tensors), counting.N_COLUMNS, dtype=torch.int64, device=device)
    rows = []
    for block, tiles, warps in LAUNCH_SETTINGS:
        plan = fused.Plan.build(tensors, pieces, device, tile=block * tiles)

        def check(plan=plan, block=block, warps=warps) -> None:
            fused.count(
                plan,
                c.reference.buffers[0],
                None,
                counts,
                compare_as="bfloat16",
                atol=0.0,
                block=block,
                num_warps=warps,
            )

        seconds = timed(check, device, repeats)
        rows.append(
            {
                "block": block,
                "tile": block * tiles,
                "num_warps": warps,
                "programs": plan.programs,
                "unaligned_programs": plan.unaligned.shape[1],
                "seconds": seconds,
            }
        )
    return rows


def streamed_bandwidth(model: GPT, device: torch.device, repeats: int) -> dict:
    """The check with pinned-CPU snapshots (streamed through two chunk buffers) against plain pinned H2D copies."""
    c = UpdateChecker(
        shard_layout(model), compare_as="bfloat16", atol=0.0, since_last=True, snapshot_device=torch.device("cpu")
    )
    c.reference.capture(c.local_tensors())
    c.last.capture(c.local_tensors())
    h2d_bytes = c.reference.nbytes() + c.last.nbytes()
    host = torch.empty(h2d_bytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(h2d_bytes, dtype=torch.uint8, device=device)
    h2d = timed(lambda: target.copy_(host, non_blocking=True), device, repeats)
    streamed = timed(c.count, device, repeats)
    return {
        "h2d_bytes": h2d_bytes,
        "h2d_s": h2d,
        "streamed_s": streamed,
        "streamed_fraction_of_h2d_bandwidth": h2d / streamed,
        "streamed_chunk_buffer_bytes": sum(b.numel() for b in c._staging),
    }


def single_tensor_bandwidth(sizes: dict, device: torch.device) -> dict:
    """(a) for one large bfloat16 tensor pair: the same bytes through copy, fused and plain torch counts."""
    n, repeats = sizes["tensor_elements"], sizes["repeats"]
    a = torch.randn(n, device=device).to(torch.bfloat16)
    b = a.clone()
    out = {"elements": n, "copy_s": timed(lambda: b.copy_(a), device, repeats)}
    out["torch_ne_sum_s"] = timed(lambda: (a != b).sum(), device, repeats)
    out["torch_int16_ne_sum_s"] = timed(lambda: (a.view(torch.int16) != b.view(torch.int16)).sum(), device, repeats)
    if device.type == "cuda" and fused.supported(torch.bfloat16):
        plan = fused.Plan.build([a], [Piece(0, 0, 0, n)], device)
        counts = torch.zeros(1, counting.N_COLUMNS, dtype=torch.int64, device=device)
        reference = b.view(torch.int16)
        out["fused_s"] = timed(
            lambda: fused.count(plan, reference, None, counts, compare_as=None, atol=0.0), device, repeats
        )
        out["fused_fraction_of_copy_bandwidth"] = out["copy_s"] / out["fused_s"]
    out["torch_fraction_of_copy_bandwidth"] = out["copy_s"] / out["torch_ne_sum_s"]
    return out


class StepWindow(Callback):
    """Wall time of the optimizer steps ``start + 1 .. stop`` (synchronized only at the two ends)."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop, self.seconds = start, stop, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in (self.start, self.stop):
            synchronize(pl_module.device)
            if trainer.global_step == self.start:
                self._t0 = time.perf_counter()
            else:
                self.seconds = time.perf_counter() - self._t0


def step_time(sizes: dict, device: torch.device, monitor: dict | None, scratch: str) -> tuple[float, int]:
    """(b, c) seconds per optimizer step and peak GPU memory of one short bf16-mixed fit (files go to ``scratch``).

    ``monitor`` holds the ``UpdateSparsityMonitor`` arguments (``None``: no monitor). The monitor is built here and
    dropped with the trainer, so that its snapshots do not count in the next run's memory.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = GPT(**sizes["model"])
    context, batch = sizes["model"]["context_length"], sizes["batch"]
    steps = sizes["warmup"] + sizes["measured"]
    tokens = torch.randint(0, 256, (steps * batch, context + 1))
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch)
    window = StepWindow(sizes["warmup"], steps)
    callbacks = [window] if monitor is None else [UpdateSparsityMonitor(compare_as="bfloat16", **monitor), window]
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32",
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=scratch,
    )
    trainer.fit(model, data)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return window.seconds / sizes["measured"], peak


def end_to_end(sizes: dict, device: torch.device) -> dict:
    def monitor(every: int, snapshot_device: str = "same") -> dict:
        return {"every_n_steps": every, "snapshot_device": snapshot_device}

    runs = {
        "none_first": None,
        "1": monitor(1),
        "10": monitor(10),
        "100": monitor(100),
        "10_cpu_snapshot": monitor(10, "cpu"),
        "none_last": None,
    }
    with tempfile.TemporaryDirectory() as scratch:
        measured = {name: step_time(sizes, device, m, scratch) for name, m in runs.items()}
    baseline = (measured["none_first"][0] + measured["none_last"][0]) / 2
    baseline_memory = max(measured["none_first"][1], measured["none_last"][1])
    model = GPT(**sizes["model"])
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": sizes["batch"],
        "seconds_per_step": {name: s for name, (s, _) in measured.items()},
        "baseline_spread": abs(measured["none_first"][0] - measured["none_last"][0]) / baseline,
        "step_overhead": {name: s / baseline - 1 for name, (s, _) in measured.items() if not name.startswith("none")},
        "peak_memory_bytes": {name: m for name, (_, m) in measured.items()},
        "memory_overhead_bytes": {
            name: m - baseline_memory for name, (_, m) in measured.items() if not name.startswith("none")
        },
        "parameter_bytes": parameter_bytes,
    }


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:9.3f} ms"


def report(result: dict) -> str:
    a, t, b = result["whole_model"], result["single_tensor"], result["end_to_end"]

    def frac(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:6.1f}%"

    lines = [
        f"machine: {result['machine']}; torch {result['environment']['torch']}, "
        f"triton {result['environment']['triton']}",
        "",
        f"(a) whole model, {a['parameters']:,} float32 parameters compared as bfloat16",
        f"    copy of the same bytes    {fmt(a['copy_check_bytes_s'])}",
        f"    fused check               {fmt(a['fused_s'])}  {frac(a['fused_fraction_of_copy_bandwidth'])} of copy bw",
        f"    fused check + refresh     {fmt(a['fused_refresh_s'])}  "
        f"{a.get('fused_refresh_time_over_parameter_copy') or 0:.2f}x one copy of the parameters",
        f"      wall time of that check   {fmt(a.get('fused_refresh_wall_s'))}  (CPU launch work included)",
        f"    torch chunked path        {fmt(a['torch_chunked_s'])}  "
        f"{frac(a['torch_chunked_fraction_of_copy_bandwidth'])}",
        f"    plain torch per tensor    {fmt(a['torch_per_tensor_s'])}  "
        f"{frac(a['torch_per_tensor_fraction_of_copy_bandwidth'])}",
    ]
    for row in a.get("launch_settings", []):
        lines.append(
            f"    fused block={row['block']:<5} tile={row['tile']:<7} warps={row['num_warps']:<3}"
            f"{fmt(row['seconds'])}  ({row['programs']} programs)"
        )
    if "streamed_s" in a:
        lines.append(
            f"    streamed CPU snapshots    {fmt(a['streamed_s'])}  "
            f"{frac(a['streamed_fraction_of_h2d_bandwidth'])} of H2D bw (H2D alone {fmt(a['h2d_s'])})"
        )
    lines += [
        "",
        f"(a) one tensor, {t['elements']:,} bfloat16 elements",
        f"    copy_                     {fmt(t['copy_s'])}",
        f"    fused                     {fmt(t.get('fused_s'))}  {frac(t.get('fused_fraction_of_copy_bandwidth'))}",
        f"    (a != b).sum()            {fmt(t['torch_ne_sum_s'])}  {frac(t['torch_fraction_of_copy_bandwidth'])}",
        f"    int16 views, != .sum()    {fmt(t['torch_int16_ne_sum_s'])}",
        "",
        f"(b, c) demo GPT, {b['parameters']:,} parameters, batch {b['batch']}; baseline spread "
        f"{100 * b['baseline_spread']:.2f}%",
        f"    {'monitor':<18}{'s/step':>10}{'overhead':>10}{'peak GPU memory':>18}{'memory overhead':>17}",
    ]
    for name, seconds in b["seconds_per_step"].items():
        overhead = b["step_overhead"].get(name)
        memory = b["memory_overhead_bytes"].get(name)
        lines.append(
            f"    {name:<18}{seconds:>10.4f}{'' if overhead is None else f'{100 * overhead:+.2f}%':>10}"
            f"{b['peak_memory_bytes'][name] / 2**20:>14.1f} MiB"
            f"{'' if memory is None else f'{memory / 2**20:+.1f} MiB':>17}"
        )
    lines.append("")
    for name, goal in result["goals"].items():
        verdict = {True: "met", False: "NOT met", None: "n/a"}[goal["met"]]
        value = "-" if goal["value"] is None else f"{goal['value']:.4g}"
        lines.append(f"    goal {name:<48} {value:>12} (target {goal['target']:.4g}): {verdict}")
    return "\n".join(lines)


def goals(result: dict) -> dict:
    """Each measured value against its target (benchmarks/README.md)."""
    a, e2e = result["whole_model"], result["end_to_end"]

    def goal(value: float | None, target: float, at_most: bool) -> dict:
        met = None if value is None else (value <= target if at_most else value >= target)
        return {"value": value, "target": target, "met": met}

    return {
        "kernel_at_least_90pct_of_copy_bandwidth": goal(a["fused_fraction_of_copy_bandwidth"], 0.9, False),
        "refresh_at_most_1.5x_parameter_copy": goal(a.get("fused_refresh_time_over_parameter_copy"), 1.5, True),
        "streamed_at_least_80pct_of_h2d_bandwidth": goal(a.get("streamed_fraction_of_h2d_bandwidth"), 0.8, False),
        "step_overhead_every_100_at_most_1pct": goal(e2e["step_overhead"]["100"], 0.01, True),
        "step_overhead_every_step_at_most_5pct": goal(e2e["step_overhead"]["1"], 0.05, True),
        # One copy of the float32 parameters (the bfloat16 reference and since-last snapshots), plus under 1 MiB of
        # counts and launch tables.
        "memory_at_most_one_parameter_copy": goal(
            e2e["memory_overhead_bytes"]["1"], e2e["parameter_bytes"] + 2**20, True
        ),
        "cpu_snapshot_memory_at_most_two_chunk_buffers": goal(
            e2e["memory_overhead_bytes"]["10_cpu_snapshot"], a.get("streamed_chunk_buffer_bytes", 0) + 2**20, True
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for a CPU); default: the GPU sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="folder for JSON, PNG")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if not args.quick and device.type != "cuda":
        raise SystemExit("the full benchmark needs a CUDA GPU; use --quick --device cpu to check that it runs")
    sizes = QUICK if args.quick else FULL
    torch.backends.cuda.matmul.allow_tf32 = True
    env = environment(args.device) | {"triton": getattr(fused.triton, "__version__", None)}
    result: dict = {
        "benchmark": NAME,
        "machine": machine_label(env),
        "quick": args.quick,
        "sizes": sizes,
        "whole_model": whole_model_bandwidth(sizes, device),
    }
    gc.collect()
    result["single_tensor"] = single_tensor_bandwidth(sizes, device)
    gc.collect()
    result["end_to_end"] = e2e = end_to_end(sizes, device)
    if not args.quick and e2e["parameters"] < 100_000_000:
        raise SystemExit(f"the GPU model must have >= 100M parameters, got {e2e['parameters']:,}")
    result["kernel_fraction_of_copy_bandwidth"] = result["whole_model"]["fused_fraction_of_copy_bandwidth"]
    result["step_overhead"] = {k: e2e["step_overhead"][k] for k in ("1", "10", "100")}
    result["gpu_memory_overhead_bytes"] = e2e["memory_overhead_bytes"]["1"]
    result["goals"] = goals(result)
    result["environment"] = env
    print(report(result))
    out = Path(args.out) / f"{NAME}{'_quick' if args.quick else ''}.json"
    write_json(out, result)
    save_figure(plot(result), out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


def plot(result: dict) -> Figure:
    figure = Figure(figsize=(10, 3.6))
    left, right = figure.subplots(1, 2)
    a = result["whole_model"]
    bars = {
        "fused": a["fused_fraction_of_copy_bandwidth"],
        "torch chunked": a["torch_chunked_fraction_of_copy_bandwidth"],
        "torch per tensor": a["torch_per_tensor_fraction_of_copy_bandwidth"],
    }
    bars = {k: v for k, v in bars.items() if v is not None}
    left.bar(list(bars), [100 * v for v in bars.values()], color="tab:blue")
    left.axhline(90, color="gray", linestyle="--", linewidth=1)
    left.set_ylabel("% of copy bandwidth (same bytes)")
    left.set_title("whole-model check", fontsize=9)
    overhead = result["end_to_end"]["step_overhead"]
    right.bar(list(overhead), [100 * v for v in overhead.values()], color="tab:orange")
    right.set_ylabel("step time overhead (%)")
    right.set_xlabel("monitor every n steps")
    right.set_title("end-to-end, demo GPT", fontsize=9)
    figure.suptitle(f"update-sparsity check overhead ({result['machine']})", fontsize=9)
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    raise SystemExit(main())
