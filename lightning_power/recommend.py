"""``lightning-power recommend``: the Step Law optimum and the matching PowerScheduler settings.

Step Law (arXiv 2503.04715) gives the optimal peak LR eta* and batch B* for N non-embedding parameters and D tokens.
The Power paper's law (arXiv 2408.13359, Eq. 6) says the optimal LR of a D-token run at batch beta (in 4096-token
sequences) is beta * a * D^b. The matching PowerScheduler keeps the paper's b and lr_max and picks a so that both laws
agree at (D, B*): a = eta* / (beta* * D^b). The paper's defaults are printed next to it for comparison.

Example::

    lightning-power recommend --params 1.2e8 --tokens 2e10 --sequence-length 2048
"""

from __future__ import annotations

import argparse
import math

from lightning_power.calibrate import optimizer_yaml, yaml_float
from lightning_power.schedules import power_lr, step_law_batch_tokens, step_law_lr

PAPER_A, PAPER_B, PAPER_LR_MAX = 4.0, -0.51, 0.02  # arXiv 2408.13359, section 4
PAPER_WARMUP_TOKENS = 1_000_000_000  # the paper's 1B-token warmup
PAPER_DECAY_FRACTION = 0.1  # the paper's WSD runs decay over the last 10 % of tokens
REFERENCE_SEQUENCE_LENGTH = 4096


def _positive(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-power recommend",
        description="Print the Step Law (arXiv 2503.04715) optimal LR and batch, and the matching PowerScheduler YAML.",
    )
    parser.add_argument("--params", type=_positive, required=True, help="N: non-embedding parameters, e.g. 1.2e8")
    parser.add_argument("--tokens", type=_positive, required=True, help="D: training tokens, e.g. 2e10")
    parser.add_argument(
        "--sequence-length", type=int, default=REFERENCE_SEQUENCE_LENGTH, help="tokens per sequence (default 4096)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lightning-power recommend``; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.sequence_length <= 0:
        parser.error(f"--sequence-length must be > 0, got {args.sequence_length}")
    if args.tokens < args.sequence_length:
        parser.error(f"--tokens must be at least one sequence ({args.sequence_length} tokens), got {args.tokens:g}")
    params, tokens, seq_len = args.params, args.tokens, args.sequence_length

    lr_opt = step_law_lr(params, tokens)
    batch_opt = step_law_batch_tokens(tokens)
    sequences = max(1, round(batch_opt / seq_len))
    tokens_per_step = sequences * seq_len
    beta = tokens_per_step / REFERENCE_SEQUENCE_LENGTH
    a = lr_opt / (beta * tokens**PAPER_B)
    total = int(tokens)
    decay = int(PAPER_DECAY_FRACTION * total)
    warmup = min(PAPER_WARMUP_TOKENS, decay)
    # The cap must not stop the matched law from reaching eta* at D: above the paper's 0.02, it is eta* itself.
    matched_lr_max = max(PAPER_LR_MAX, lr_opt)
    paper_lr = power_lr(tokens, batch_tokens=tokens_per_step, a=PAPER_A, b=PAPER_B, lr_max=PAPER_LR_MAX)
    matched_lr = power_lr(tokens, batch_tokens=tokens_per_step, a=a, b=PAPER_B, lr_max=matched_lr_max)

    print(f"# Step Law (arXiv 2503.04715) for N = {params:.4g} non-embedding parameters, D = {tokens:.4g} tokens")
    print(f"#   optimal LR     eta* = 1.79 N^-0.713 D^0.307 = {lr_opt:.4g}")
    print(f"#   optimal batch  B*   = 0.58 D^0.571 = {batch_opt:.4g} tokens", end="")
    print(f" -> {sequences} x {seq_len} = {tokens_per_step}")
    print("#")
    print(f"# {'':34}{'Step Law match':>16}{'Power paper':>16}")
    print(f"# {'a':34}{a:>16.4g}{PAPER_A:>16.4g}")
    print(f"# {'b':34}{PAPER_B:>16.4g}{PAPER_B:>16.4g}")
    print(f"# {'lr_max':34}{matched_lr_max:>16.4g}{PAPER_LR_MAX:>16.4g}")
    print(f"# {'LR law at D, batch B*: beta a D^b':34}{matched_lr:>16.4g}{paper_lr:>16.4g}")
    print("#")
    print("# lr_max caps the early LR; 0.02 is the paper's value under muP. Lower it without muP.")
    if matched_lr_max > PAPER_LR_MAX:
        print(f"# eta* = {lr_opt:.4g} is above 0.02: the matched lr_max is eta*, held until the decay.")
    print(f"# Train for {math.ceil(tokens / tokens_per_step)} optimizer steps of {tokens_per_step} tokens.")
    print("\n".join(optimizer_yaml(matched_lr_max)))
    print("lr_scheduler:")
    print("  class_path: lightning_power.PowerScheduler")
    print("  init_args:")
    print(f"    a: {yaml_float(a)}")
    print(f"    b: {PAPER_B}")
    print(f"    lr_max: {yaml_float(matched_lr_max)}")
    print(f"    tokens_per_step: {tokens_per_step}")
    print(f"    warmup_tokens: {warmup}")
    print(f"    decay_tokens: {decay}")
    print(f"    total_tokens: {total}")
    print("    decay_shape: exponential")
    return 0
