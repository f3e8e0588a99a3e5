"""Shared by the benchmarks: the run record, the corpus, the demo GPT under SP or muP, a fast training loop, a process
pool that runs many small trainings at once, and atomic JSON / PNG writing.

The runs are many and tiny, so they use a plain PyTorch loop instead of the Lightning Trainer. The model, the muP
setup (``MuPPlan`` + its param groups + the readout multiplier) and the schedulers are the ones users get.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import queue
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_power.demo import GPT, ByteCorpus
from lightning_power.files import save_png, write_atomically
from lightning_power.mup import MuPPlan
from lightning_power.schedulers import PowerScheduler, WSDScheduler

# The demo GPT used by every benchmark. init_std and readout_multiplier (alpha_out) were tuned on the muP base model
# (width 32) alone, as muTransfer prescribes; muP carries them to every width (benchmarks/README.md has the numbers).
MODEL: dict[str, Any] = {
    "depth": 2,
    "head_dim": 16,
    "context_length": 128,
    "base_width": 32,
    "init_std": 0.05,
    "readout_multiplier": 8.0,
}
# The schedule benchmarks share these, so that schedule_transfer.py tests what calibrate_power.py fitted: the token
# budget D (192 and 768 steps of 32 x 128 tokens), the warmup of every run, and the paper's final decay.
TOKENS_D = {"quick": 786_432, "full": 3_145_728}
SCHEDULE_RUN: dict[str, dict[str, Any]] = {
    mode: {"warmup_tokens": warmup, "decay_fraction": 0.1, "decay_shape": "exponential", "grad_clip": 1.0}
    for mode, warmup in (("quick", 32_768), ("full", 131_072))
}
# What every benchmark's preset shares per mode: seeds and refined LRs per sweep, training processes, and the data.
SWEEP: dict[str, dict[str, Any]] = {
    "quick": {"seeds": 2, "refine": 3, "workers": 2, "train_bytes": 4_000_000, "val_windows": 1024},
    "full": {"seeds": 2, "refine": 3, "workers": 8, "train_bytes": 16_000_000, "val_windows": 2048},
}
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DIVERGED_LOSS = math.log(256) + 1.0  # well above a uniform guess over bytes
LOST_INTERVALS = 3  # curve points in a row above DIVERGED_LOSS: the run is lost, stop it (spikes recover sooner)
BETAS = (0.9, 0.95)
VAL_BATCH = 64


# --------------------------------------------------------------------------------------------------- run record
def environment(device: str) -> dict[str, Any]:
    """Machine, versions, date and command line: what it takes to repeat a run."""
    import lightning
    import numpy

    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "git_commit": _git_commit(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def machine_label(env: Mapping[str, Any]) -> str:
    """Short machine name for figure titles and tables."""
    where = env.get("gpu") or f"{env['cpu_count']}-core CPU"
    return f"{where}, {env['date_utc'][:10]}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The checked-out commit, read from ``.git`` (no git command runs)."""
    head = REPO / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if not ref.startswith("ref: "):
            return ref
        name = ref[5:]
        loose = REPO / ".git" / name
        if loose.exists():
            return loose.read_text().strip()
        for line in (REPO / ".git" / "packed-refs").read_text().splitlines():
            if line.endswith(" " + name):
                return line.split()[0]
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------------- command line
def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every benchmark has: ``--quick``, ``--device``, ``--data``, ``--out``, ``--workers``, and the demo
    GPT's (``MODEL``). ``doc`` is the script's docstring; its first paragraph describes the command."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the CPU preset (2 cores, <= 30 min); default: GPU preset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--data", default=None, help="a text file or folder (default: the Python standard library)")
    parser.add_argument("--out", default=str(RESULTS), help="where the JSON and PNG go (default benchmarks/results)")
    parser.add_argument("--workers", type=int, default=None, help="training processes at once (default: by preset)")
    parser.add_argument("--base-width", type=int, help="muP base width: where init_std and readout_multiplier hold")
    parser.add_argument("--depth", type=int, help="transformer blocks")
    parser.add_argument("--head-dim", type=int, help="attention head size (fixed; width grows by heads)")
    parser.add_argument("--context-length", type=int, help="bytes per sequence")
    parser.add_argument("--init-std", type=float, help="init std of the weights at the base width")
    parser.add_argument("--readout-multiplier", type=float, help="alpha_out: scales the input of the output head")
    parser.add_argument("--val-windows", type=int, help="validation windows of context_length bytes")
    parser.add_argument(
        "--plan", action="store_true", help="check the settings and print the runs it would start with; train nothing"
    )
    return parser


def add_resume_flag(parser: argparse.ArgumentParser) -> None:
    """``--resume``, for the scripts whose runs :func:`replay_finished` can replay."""
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished runs of the result already in --out (same settings and machine); train the rest",
    )


def resolve(args: argparse.Namespace, preset: Mapping[str, Any]) -> dict[str, Any]:
    """The preset with every flag the user gave (not ``None``) on top; records which ones changed it."""
    config = dict(preset)
    overrides = {}
    for key, value in vars(args).items():
        if key in preset and value is not None and value != preset[key]:
            config[key] = value
            overrides[key] = value
    config["overrides"] = overrides
    return config


def check_args(config: Mapping[str, Any]) -> None:
    """Fail early, naming the flag, on values no run could use."""
    for key in ("workers", "steps", "batch_size", "context_length", "depth", "head_dim", "seeds", "refine"):
        if key in config and not (isinstance(config[key], int) and config[key] >= 1):
            raise SystemExit(f"--{key.replace('_', '-')} must be an integer >= 1, got {config[key]!r}")
    widths = config.get("widths") or [config["width"]]
    if any(width % config["head_dim"] for width in [*widths, config["base_width"]]):
        raise SystemExit(f"widths {widths} and --base-width must be multiples of --head-dim {config['head_dim']}")
    if min(widths) < config["base_width"]:
        raise SystemExit(f"--base-width {config['base_width']} must not exceed the narrowest width {min(widths)}")
    device = config.get("device", "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine; use --device cpu")


def check_cells(cells: Iterable[tuple[int, int]], config: Mapping[str, Any]) -> None:
    """Fail early on a (batch size, token budget) cell no schedule run could train: the budget must be whole steps
    of ``batch x context_length`` tokens, at least 4 of them, and more than the warmup's."""
    for batch, tokens in cells:
        batch_tokens = batch * config["context_length"]
        if tokens % batch_tokens or tokens // batch_tokens < 4:
            raise SystemExit(
                f"token budget {tokens} must be a multiple of batch {batch} x context {config['context_length']}, "
                "and at least 4 steps"
            )
        if max(1, round(config["warmup_tokens"] / batch_tokens)) >= tokens // batch_tokens:
            raise SystemExit(
                f"--warmup-tokens {config['warmup_tokens']} leaves no steps after warmup in the cell of batch {batch} "
                f"and {tokens} tokens; lower it or raise the budget"
            )


# --------------------------------------------------------------------------------------------------- writing
def write_json(path: Path, payload: Any) -> None:
    """Write strict JSON atomically (NaN and infinity become ``null``)."""
    write_atomically(path, json.dumps(_finite(payload), indent=1))


def save_figure(figure: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    save_png(figure, path)
    plt.close(figure)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def matplotlib_pyplot() -> Any:
    """pyplot on the non-interactive backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------------- data
@dataclass
class Corpus:
    """Training bytes (windows are drawn at random offsets) and fixed validation windows."""

    train: torch.Tensor  # uint8, 1-D
    val: torch.Tensor  # int64, (windows, context_length + 1)
    context_length: int

    def batch(self, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.train) - self.context_length - 1, (batch_size,), generator=generator)
        windows = self.train[starts[:, None] + torch.arange(self.context_length + 1)].long()
        return windows[:, :-1], windows[:, 1:]


_CORPUS_CACHE: dict[tuple, Corpus] = {}
VAL_SPREAD = 16  # validation windows are 1 in VAL_SPREAD of the held-out windows, evenly spaced over many files


def load_corpus(path: str | None, context_length: int, train_bytes: int, val_windows: int) -> Corpus:
    """The demo corpus split (``ByteCorpus``: by file, seed 0), cached per process.

    The ``val_windows`` validation windows are spread evenly over up to ``VAL_SPREAD`` times as many held-out bytes:
    windows from a single file or two made the final loss swing with whatever the model saw last (seed-to-seed
    spread 0.56% with 256 contiguous windows, 0.21% with 1024 spread ones, 6 seeds, benchmarks/README.md).
    """
    key = (path, context_length, train_bytes, val_windows)
    if key not in _CORPUS_CACHE:
        data = ByteCorpus(
            path=path,
            context_length=context_length,
            batch_size=1,
            max_bytes=train_bytes,
            max_val_bytes=VAL_SPREAD * val_windows * context_length + 1,
            seed=0,
        )
        data.setup("fit")
        held_out = len(data.val_set)
        picks = torch.linspace(0, held_out - 1, min(val_windows, held_out)).round().long()  # spacing >= 1: distinct
        val = torch.stack([torch.cat([x, y[-1:]]) for x, y in (data.val_set[i] for i in picks.tolist())])
        _CORPUS_CACHE[key] = Corpus(data.train_set.data, val, context_length)
    return _CORPUS_CACHE[key]


# --------------------------------------------------------------------------------------------------- model
def build_gpt(width: int, parametrization: str, config: Mapping[str, Any], seed: int) -> tuple[GPT, MuPPlan | None]:
    """The demo GPT (shape and base hyper-parameters from ``config``, see ``MODEL``) on the CPU, in standard
    parametrization (``"sp"``) or muP (``"mup"``, ``"mup_zero"``).

    muP is what a user sets up: ``MuPPlan.from_models`` against meta-device base and delta models at ``base_width``
    and ``2 * base_width``, ``apply_init`` (hidden init / sqrt(m)), ``attach_readouts`` (readout input / m), and later
    :func:`make_optimizer` with ``plan.param_groups`` (hidden LR / m); attention logits use 1/d_head. ``"mup_zero"``
    also zero-initialises the readout and the queries (Tensor Programs V, App. D.2). SP uses the same init_std and
    readout_multiplier at every width, with 1/sqrt(d_head) attention.
    """
    if parametrization not in ("sp", "mup", "mup_zero"):
        raise ValueError(f"parametrization must be 'sp', 'mup' or 'mup_zero', got {parametrization!r}")
    is_mup, zero = parametrization != "sp", parametrization == "mup_zero"
    knobs = {key: config[key] for key in ("depth", "head_dim", "context_length", "init_std", "readout_multiplier")}
    knobs |= {
        "attention_scale": "1/d_head" if is_mup else "1/sqrt(d_head)",
        "zero_init_readout": zero,
        "zero_init_query": zero,
    }
    torch.manual_seed(seed)
    model = GPT(width=width, **knobs)
    if not is_mup:
        return model, None
    with torch.device("meta"):
        base = GPT(width=config["base_width"], **knobs)
        delta = GPT(width=2 * config["base_width"], **knobs)
    plan = MuPPlan.from_models(model, base, delta, readout="head")
    plan.apply_init(model)
    plan.attach_readouts(model)
    return model, plan


def make_optimizer(model: torch.nn.Module, plan: MuPPlan | None, lr: float) -> torch.optim.AdamW:
    """AdamW, betas (0.9, 0.95), no weight decay; muP's param groups when there is a plan. Build it after the model
    moved to its device."""
    groups = plan.param_groups(model, lr=lr, weight_decay=0.0) if plan else [{"params": list(model.parameters())}]
    fused = next(model.parameters()).is_cuda  # one kernel per step instead of several per group: small models on GPUs
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, weight_decay=0.0, fused=fused or None)


# --------------------------------------------------------------------------------------------------- training
@dataclass
class RunResult:
    """Final validation loss (``inf`` when not finite) and a coarse train curve ``[tokens, loss, lr]``."""

    val_loss: float
    stopped_early: bool
    steps_done: int
    seconds: float
    curve: list[list[float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "val_loss": self.val_loss,
            "stopped_early": self.stopped_early,
            "steps_done": self.steps_done,
            "seconds": round(self.seconds, 3),
            "curve": self.curve,
        }


def train(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    corpus: Corpus,
    *,
    batch_size: int,
    steps: int,
    seed: int,
    device: str,
    grad_clip: float | None,
    curve_points: int = 40,
) -> RunResult:
    """Train ``steps`` optimizer steps on random windows (seeded), then evaluate on the fixed validation windows.

    Gradients are clipped to a global norm of ``grad_clip`` (``None``: no clipping), as the demo configs do. The
    scheduler steps once per optimizer step. On CUDA the forward runs under bf16 autocast. A run whose train
    loss turns non-finite, or stays above ``DIVERGED_LOSS`` for ``LOST_INTERVALS`` curve points, stops early
    (``stopped_early``); its validation loss is measured where it stopped (``inf`` if not finite).
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    every = max(1, steps // curve_points)
    tokens_per_step = batch_size * corpus.context_length
    curve, interval_loss, above = [], torch.zeros((), device=device), 0
    model.train()
    for step in range(steps):
        inputs, targets = (t.to(device, non_blocking=True) for t in corpus.batch(generator, batch_size))
        lr = optimizer.param_groups[0]["lr"]
        with autocast:
            loss = model.loss((inputs, targets))
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        interval_loss += loss.detach()
        if (step + 1) % every == 0 or step + 1 == steps:
            mean = interval_loss.item() / (step % every + 1)  # the one host sync per interval
            interval_loss.zero_()
            curve.append([(step + 1) * tokens_per_step, mean, lr])
            above = above + 1 if mean > DIVERGED_LOSS else 0
            if not math.isfinite(mean) or above == LOST_INTERVALS:
                break
    val_loss = evaluate(model, corpus, device)
    val_loss = val_loss if math.isfinite(val_loss) else math.inf
    return RunResult(val_loss, step + 1 < steps, step + 1, time.perf_counter() - start, curve)


def final_loss(record: Mapping[str, Any]) -> float:
    """The loss a sweep ranks a run by: its validation loss, or ``inf`` when it blew up (stopped early, not finite)."""
    loss = record["val_loss"]
    return math.inf if record["stopped_early"] or loss is None or not math.isfinite(loss) else loss


@torch.no_grad()
def evaluate(model: GPT, corpus: Corpus, device: str) -> float:
    """Mean next-byte cross-entropy (nats) over the fixed validation windows."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        for chunk in corpus.val.split(VAL_BATCH):
            chunk = chunk.to(device)
            total += model.loss((chunk[:, :-1], chunk[:, 1:])) * len(chunk)
            count += len(chunk)
    model.train()
    return total.item() / count


def make_scheduler(
    kind: str,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    batch_tokens: int,
    warmup_tokens: int,
    decay_fraction: float,
    decay_shape: str,
    power: Mapping[str, float] | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedules the benchmarks compare, all with the same warmup tokens:

    - ``"wsd"``: warmup, constant, then ``decay_shape`` to 0 over the last ``decay_fraction`` of the steps;
    - ``"cosine"``: warmup, then cosine to 0 over the rest (a WSD whose decay is everything after warmup);
    - ``"power"``: the Power scheduler with ``power = {"a", "b", "batch_exponent"}`` (``lr_max`` is the optimizer's
      LR; ``batch_exponent`` defaults to the paper's 1), in tokens,
      with the same final decay as WSD (arXiv 2408.13359, Eq. 8).
    """
    warmup = max(1, round(warmup_tokens / batch_tokens))
    if warmup >= steps:
        raise ValueError(f"warmup of {warmup_tokens} tokens is {warmup} steps, not fewer than the run's {steps} steps")
    if kind == "wsd":
        decay = round(decay_fraction * steps)
        return WSDScheduler(optimizer, warmup=warmup, total=steps, decay=decay, decay_shape=decay_shape)
    if kind == "cosine":
        return WSDScheduler(optimizer, warmup=warmup, total=steps, decay=steps - warmup, decay_shape="cosine")
    if kind == "power":
        total = steps * batch_tokens
        return PowerScheduler(
            optimizer,
            a=power["a"],
            b=power["b"],
            batch_exponent=power.get("batch_exponent", 1.0),
            tokens_per_step=batch_tokens,
            warmup_tokens=warmup * batch_tokens,
            total_tokens=total,
            decay_tokens=round(decay_fraction * steps) * batch_tokens,
            decay_shape=decay_shape,
        )
    raise ValueError(f"schedule must be 'wsd', 'cosine' or 'power', got {kind!r}")


def run_schedule_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train the muP demo GPT on one (schedule, batch size, tokens, LR, seed); runs in a worker process.

    ``job["config"]`` holds the model and data settings; the LR is ``2 ** job["log2_lr"]`` (for Power, its lr_max).
    """
    c = job["config"]
    corpus = load_corpus(c["data"], c["context_length"], c["train_bytes"], c["val_windows"])
    model, plan = build_gpt(c["width"], "mup", c, seed=job["seed"])
    model.to(c["device"])
    optimizer = make_optimizer(model, plan, 2.0 ** job["log2_lr"])
    power = job_power(job)
    batch_tokens = job["batch_size"] * c["context_length"]
    steps = job["tokens"] // batch_tokens
    scheduler = make_scheduler(
        job["schedule"],
        optimizer,
        steps=steps,
        batch_tokens=batch_tokens,
        warmup_tokens=c["warmup_tokens"],
        decay_fraction=c["decay_fraction"],
        decay_shape=c["decay_shape"],
        power=power,
    )
    result = train(
        model,
        optimizer,
        scheduler,
        corpus,
        batch_size=job["batch_size"],
        steps=steps,
        seed=job["seed"],
        device=c["device"],
        grad_clip=c["grad_clip"],
    )
    record = {key: job[key] for key in ("schedule", "batch_size", "tokens", "log2_lr", "seed")}
    if job["schedule"] == "power":
        record["power"] = dict(power)
    return {**record, "batch_tokens": batch_tokens, "lr": 2.0 ** job["log2_lr"], **result.to_dict()}


def run_outcome(record: Mapping[str, Any]) -> str:
    """The end of a run's progress line: its validation loss, its seconds, and whether ``--resume`` replayed it."""
    loss = math.inf if record["val_loss"] is None else record["val_loss"]  # a non-finite loss is null in the JSON
    return f"loss {loss:.4f} ({record['seconds']:.1f} s{', replayed' if record.get('replayed') else ''})"


def job_power(job: Mapping[str, Any]) -> Mapping[str, float] | None:
    """The Power law a job trains with: its own ``job["power"]`` (a search over a), else its config's."""
    return job.get("power") or job["config"].get("power")


# --------------------------------------------------------------------------------------------------- resuming
# What a schedule run's result depends on besides its job (schedule, cell, LR, seed, Power law): the model, the data,
# and the schedule's shared phases. Runs also repeat bit for bit only on the same software and hardware.
RUN_SETTINGS = (*MODEL, *SCHEDULE_RUN["quick"], "width", "train_bytes", "val_windows", "data", "device")
RUN_MACHINE = {"cpu": ("torch", "device", "cpu", "cpu_count"), "cuda": ("torch", "device", "gpu", "cuda")}
POWER_LAW = ("a", "b", "batch_exponent", "lr_max")


def schedule_run_key(run: Mapping[str, Any], config: Mapping[str, Any]) -> tuple:
    """What identifies a schedule run (a job or its record, with the config it ran under): schedule, cell, LR and
    seed, and for Power its law."""
    power = (run.get("power") or config.get("power")) if run["schedule"] == "power" else None
    law = tuple(power.get(key, 1.0 if key == "batch_exponent" else None) for key in POWER_LAW) if power else None
    return (run["schedule"], run["batch_size"], run["tokens"], run["log2_lr"], run["seed"], law)


def replay_finished(
    path: Path,
    config: Mapping[str, Any],
    device: str,
    *,
    run_key: Callable[[Mapping[str, Any], Mapping[str, Any]], tuple] = schedule_run_key,
    settings: Iterable[str] = RUN_SETTINGS,
    run_lists: Iterable[str] = ("runs",),
) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    """``--resume``: answer a job from an earlier result at ``path`` when that result holds the same run.

    The earlier result (this script's JSON, or another benchmark's whose runs have the same keys) must have the same
    ``settings`` (config keys) and machine (``RUN_MACHINE``: torch and the CPU, or torch, CUDA and the GPU), else
    ``SystemExit`` says what differs.
    ``run_key(run, config)`` identifies a run, given a job or a record and the config it ran under. Returns
    ``replay(job)``: a copy of the finished record (marked ``"replayed": True``), or ``None`` when the job must
    train. ``run_lists`` are the payload keys holding records.
    """
    try:
        previous = json.loads(path.read_text())
    except FileNotFoundError:
        print(f"--resume: {path} does not exist yet, so every run trains", file=sys.stderr)
        return lambda job: None
    except (OSError, ValueError) as error:
        raise SystemExit(f"--resume: cannot read {path} ({error})") from None
    before, machine = previous.get("config", {}), environment(device)
    changed = {key: (before.get(key), config.get(key)) for key in settings if before.get(key) != config.get(key)}
    if changed:
        raise SystemExit(f"--resume: {path} ran other settings (earlier, now): {changed}; drop --resume or --out")
    for key in RUN_MACHINE["cuda" if device.startswith("cuda") else "cpu"]:
        if previous.get("environment", {}).get(key) != machine.get(key):
            raise SystemExit(
                f"--resume: {path} ran on another machine ({key}: {previous['environment'].get(key)!r}, now "
                f"{machine.get(key)!r}); its runs would not repeat bit for bit here"
            )
    finished = {run_key(record, before): record for name in run_lists for record in previous.get(name) or []}
    print(f"--resume: {len(finished)} finished runs in {path}", file=sys.stderr)

    def replay(job: dict[str, Any]) -> dict[str, Any] | None:
        record = finished.get(run_key(job, job["config"]))
        return None if record is None else {**record, "replayed": True}

    return replay


# --------------------------------------------------------------------------------------------------- job pool
class Interrupted(Exception):
    """SIGTERM arrived (e.g. a time limit): finish writing what is done."""


def new_payload(name: str, config: Mapping[str, Any], device: str, **extra: Any) -> dict[str, Any]:
    """The JSON record a benchmark rewrites after every run: what it is, its settings, the machine, and whether it
    finished (``complete``)."""
    return {"benchmark": name, "complete": False, **extra, "config": config, "environment": environment(device)}


def print_plan(
    name: str,
    config: Mapping[str, Any],
    jobs: list[dict[str, Any]],
    group: tuple[str, ...],
    tokens_of: Callable[[dict[str, Any]], int] = lambda job: job["tokens"],
) -> None:
    """``--plan``: the first wave of runs, counted by ``group`` (job keys), with their training tokens; nothing trains.

    The settings were already checked, so a preset that cannot run fails here, before any device time is spent.
    """
    print(
        f"{name} --plan ({config['mode']} preset, device {config['device']}, {config['workers']} workers): "
        f"{len(jobs)} runs to start with, {sum(map(tokens_of, jobs)):,} training tokens"
    )
    counts = Counter(tuple(job[k] for k in group) for job in jobs)
    for key, count in sorted(counts.items()):
        print("  " + ", ".join(f"{k} {v}" for k, v in zip(group, key)) + f": {count} runs")
    print(
        f"More runs follow from the results: the grid grows past an edge optimum, and {config['seeds'] - 1} more "
        f"seed(s) run at the {config['refine']} LRs around each optimum."
    )


def run_sweep(
    jobs: list[dict[str, Any]],
    job_fn: Callable[[dict[str, Any]], dict[str, Any]],
    config: Mapping[str, Any],
    device: str,
    on_result: Callable[[dict[str, Any], dict[str, Any]], list[dict[str, Any]]],
    runs: list[dict],
    replay: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
) -> bool:
    """:func:`run_jobs` with the config's workers; True when every job ran, False when SIGTERM or Ctrl-C stopped it
    (``runs`` then holds what finished)."""
    try:
        run_jobs(jobs, job_fn, workers=config["workers"], device=device, on_result=on_result, replay=replay)
        return True
    except (KeyboardInterrupt, Interrupted):
        print(f"interrupted: writing the {len(runs)} finished runs", file=sys.stderr)
        return False


def run_jobs(
    jobs: Iterable[dict[str, Any]],
    worker: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    workers: int,
    device: str,
    on_result: Callable[[dict[str, Any], dict[str, Any]], Iterable[dict[str, Any]]],
    replay: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
) -> None:
    """Run ``worker(job)`` for every job in ``workers`` processes, costliest first (``job["cost"]``).

    ``on_result(job, result)`` runs in this process as each job finishes and may return follow-up jobs. A job that
    ``replay(job)`` answers with a result (``--resume``) goes to ``on_result`` at once and never trains. One worker
    runs in this process. Several share the CPU cores (one thread each, at least) or the one GPU. SIGTERM raises
    :class:`Interrupted` here after the workers are stopped, so the caller can save the partial results. Training
    flushes denormal floats to zero (Adam's second moments of tiny gradients would otherwise crawl on x86 CPUs).
    """
    pending: list[dict[str, Any]] = []

    def add(new_jobs: Iterable[dict[str, Any]]) -> None:
        """Queue new jobs costliest first; hand the replayed ones (and the follow-ups they lead to) on at once."""
        todo = list(new_jobs)
        while todo:
            job = todo.pop()
            result = replay(job) if replay is not None else None
            if result is None:
                pending.append(job)
            else:
                todo += on_result(job, result)
        pending.sort(key=lambda j: -j["cost"])

    add(jobs)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        if workers == 1:
            torch.set_flush_denormal(True)
            try:
                while pending:
                    job = pending.pop(0)
                    add(on_result(job, worker(job)))
            finally:
                torch.set_flush_denormal(False)  # back to PyTorch's default for the rest of this process
            return
        import multiprocessing

        threads = max(1, (os.cpu_count() or 1) // workers) if device == "cpu" else 1
        finished: queue.Queue = queue.Queue()
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(threads,))
        try:
            running = 0
            while pending or running:
                while pending and running < workers:
                    job = pending.pop(0)
                    pool.apply_async(
                        worker,
                        (job,),
                        callback=lambda result, job=job: finished.put((job, result, None)),
                        error_callback=lambda error, job=job: finished.put((job, None, error)),
                    )
                    running += 1
                job, result, error = _next(finished)
                running -= 1
                if error is not None:
                    raise RuntimeError(f"job {job} failed") from error
                add(on_result(job, result))
            pool.close()
        finally:
            pool.terminate()  # stops runs still in flight after an error or SIGTERM
            pool.join()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _next(finished: queue.Queue) -> tuple:
    while True:  # short timeouts keep the main thread responsive to signals
        try:
            return finished.get(timeout=0.2)
        except queue.Empty:
            continue


def _init_worker(threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops the pool
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # Adam's second moments of tiny gradients go denormal: 10-100x slower on x86


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


def log2_grid(first: float, last: float, step: float = 1.0) -> list[float]:
    """``first, first + step, ..., last`` (inclusive), for LR grids in log2 units."""
    count = round((last - first) / step) + 1
    if count < 1:
        raise SystemExit(f"empty log2 LR grid from {first} to {last}")
    return [first + i * step for i in range(count)]


class LRSweep:
    """Which (log2 LR, seed) runs an LR sweep needs next, per group (e.g. one width, or one batch x tokens cell).

    Seed 0 runs the starting grid. While its best LR is the grid's smallest or largest, one more LR past that edge
    follows (``max_extensions`` per group), so the optimum ends up bracketed. Then seeds ``1 .. seeds-1`` run at the
    ``refine`` LRs around seed 0's best, where the parabola is fitted and where seed noise matters most.
    """

    def __init__(self, seeds: int, refine: int, step: float = 1.0, max_extensions: int = 2) -> None:
        if seeds < 1 or refine < 1:
            raise ValueError(f"seeds and refine must be >= 1, got {seeds} and {refine}")
        self.seeds, self.refine, self.step, self.max_extensions = seeds, refine, step, max_extensions
        self._planned: dict[Any, set[float]] = {}
        self._losses: dict[Any, dict[float, float]] = {}
        self._extensions: dict[Any, int] = {}

    def start(self, key: Any, log2_lrs: Iterable[float]) -> list[tuple[float, int]]:
        self._planned[key], self._losses[key], self._extensions[key] = set(log2_lrs), {}, 0
        return [(x, 0) for x in sorted(self._planned[key])]

    def record(self, key: Any, log2_lr: float, seed: int, loss: float) -> list[tuple[float, int]]:
        """Note a finished run; return the runs to start now."""
        if seed != 0:
            return []
        losses = self._losses[key]
        losses[log2_lr] = loss
        if len(losses) < len(self._planned[key]):
            return []
        grid = sorted(losses)
        best = min(grid, key=lambda x: losses[x] if math.isfinite(losses[x]) else math.inf)
        if best in (grid[0], grid[-1]) and len(grid) > 1 and self._extensions[key] < self.max_extensions:
            self._extensions[key] += 1
            beyond = best - self.step if best == grid[0] else best + self.step
            self._planned[key].add(beyond)
            return [(beyond, 0)]
        index = grid.index(best)
        low = max(0, min(index - self.refine // 2, len(grid) - self.refine))
        near = [x for x in grid[low : low + self.refine] if math.isfinite(losses[x])]
        return [(x, seed) for x in near for seed in range(1, self.seeds)]
