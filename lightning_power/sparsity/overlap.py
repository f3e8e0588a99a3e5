"""Overlap of the parameters updated in two runs, with chance baselines: ``lightning-power sparsity-overlap A B``.

For the changed sets ``A`` and ``B`` of two masks files of the same model (``masks.py``), Mukherjee et al. (arXiv
2505.11711, §5, Table 4) report the one-sided overlaps ``|A∩B| / |A|`` and ``|A∩B| / |B|`` against a chance baseline
(about 60 % observed for two seeds, against 36.7 % by chance). We add the IoU ``|A∩B| / |A∪B|`` and two baselines, both
the expected value under random masks of the same sizes:

- global (the paper's): ``E|A∩B| = |A| |B| / n``, so ``E[|A∩B| / |A|] = |B| / n``;
- per layer (stratified): ``E|A∩B| = sum_l |A_l| |B_l| / n_l``, which removes the overlap that merely comes from both
  runs updating the same layers more.

The IoU baseline is ``E|A∩B| / (|A| + |B| - E|A∩B|)``, a ratio of expectations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass

from lightning_power.sparsity.layers import group_by_layer
from lightning_power.sparsity.masks import MaskFile, popcount


@dataclass(frozen=True)
class Ratios:
    """``|A∩B| / |A|``, ``|A∩B| / |B|`` and IoU (``None`` where a denominator is 0)."""

    overlap_a: float | None
    overlap_b: float | None
    iou: float | None

    @classmethod
    def of(cls, changed_a: float, changed_b: float, intersection: float) -> Ratios:
        union = changed_a + changed_b - intersection
        return cls(_ratio(intersection, changed_a), _ratio(intersection, changed_b), _ratio(intersection, union))


@dataclass(frozen=True)
class LayerOverlap:
    numel: int
    changed_a: int
    changed_b: int
    intersection: int
    observed: Ratios


@dataclass(frozen=True)
class Overlap:
    """The overlap report; ``observed`` against ``chance_global`` and ``chance_per_layer``."""

    numel: int
    changed_a: int
    changed_b: int
    intersection: int
    observed: Ratios
    chance_global: Ratios
    chance_per_layer: Ratios
    layers: dict[str, LayerOverlap]


def overlap(a: str | os.PathLike | MaskFile, b: str | os.PathLike | MaskFile) -> Overlap:
    """Compare two masks files of the same model; ``ValueError`` if their parameters differ (names or shapes)."""
    a, b = (m if isinstance(m, MaskFile) else MaskFile.open(m) for m in (a, b))
    _check_same_model(a, b)
    for key in ("compare_as", "atol"):
        if a.metadata.get(key) != b.metadata.get(key):
            warnings.warn(
                f"the masks were made with different {key}: {a.metadata.get(key)!r} vs {b.metadata.get(key)!r}",
                stacklevel=2,
            )
    names = [p["name"] for p in a.parameters]  # B may list the parameters in another order
    numels = [math.prod(p["shape"]) for p in a.parameters]
    changed_a, changed_b, both = [], [], []
    for name in names:  # every count from the bits (which reading checks against the metadata): ratios stay <= 1
        (bits_a, count_a), (bits_b, count_b) = a.read(name), b.read(name)
        changed_a.append(count_a)
        changed_b.append(count_b)
        both.append(popcount(bits_a, bits_b))
    layers = {}
    for layer, indices in group_by_layer(names).items():
        n, ca, cb, ab = (sum(values[i] for i in indices) for values in (numels, changed_a, changed_b, both))
        layers[layer] = LayerOverlap(n, ca, cb, ab, Ratios.of(ca, cb, ab))
    n, ca, cb, ab = sum(numels), sum(changed_a), sum(changed_b), sum(both)
    expected_global = ca * cb / n if n else 0.0
    expected_per_layer = sum(lo.changed_a * lo.changed_b / lo.numel for lo in layers.values() if lo.numel)
    return Overlap(
        n,
        ca,
        cb,
        ab,
        Ratios.of(ca, cb, ab),
        Ratios.of(ca, cb, expected_global),
        Ratios.of(ca, cb, expected_per_layer),
        layers,
    )


def _check_same_model(a: MaskFile, b: MaskFile, limit: int = 20) -> None:
    shapes_a = {p["name"]: p["shape"] for p in a.parameters}
    shapes_b = {p["name"]: p["shape"] for p in b.parameters}
    problems = [f"{name!r} only in {str(a.path)!r}" for name in shapes_a if name not in shapes_b]
    problems += [f"{name!r} only in {str(b.path)!r}" for name in shapes_b if name not in shapes_a]
    problems += [
        f"{name!r}: shape {shape} vs {shapes_b[name]}"
        for name, shape in shapes_a.items()
        if name in shapes_b and shape != shapes_b[name]
    ]
    if problems:
        more = [f"... and {len(problems) - limit} more"] if len(problems) > limit else []
        raise ValueError("the masks are of different models:\n  " + "\n  ".join(problems[:limit] + more))


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def format_report(report: Overlap, a: str, b: str) -> str:
    """The human-readable table printed by the command."""
    density_a, density_b = _ratio(report.changed_a, report.numel), _ratio(report.changed_b, report.numel)
    lines = [
        f"A: {a}  changed {report.changed_a:,} of {report.numel:,} ({_percent(density_a)})",
        f"B: {b}  changed {report.changed_b:,} of {report.numel:,} ({_percent(density_b)})",
        f"|A∩B| = {report.intersection:,}",
        "",
        f"{'':<12}{'observed':>12}{'chance':>12}{'chance/layer':>14}",
    ]
    for label, field in (("|A∩B|/|A|", "overlap_a"), ("|A∩B|/|B|", "overlap_b"), ("IoU", "iou")):
        values = [getattr(r, field) for r in (report.observed, report.chance_global, report.chance_per_layer)]
        lines.append(f"{label:<12}{_percent(values[0]):>12}{_percent(values[1]):>12}{_percent(values[2]):>14}")
    width = max([5] + [len(layer) for layer in report.layers])
    lines += ["", f"{'layer':<{width}}{'numel':>14}{'A':>10}{'B':>10}{'|A∩B|/|A|':>11}{'|A∩B|/|B|':>11}{'IoU':>9}"]
    for layer, row in report.layers.items():
        lines.append(
            f"{layer:<{width}}{row.numel:>14,}{_percent(_ratio(row.changed_a, row.numel)):>10}"
            f"{_percent(_ratio(row.changed_b, row.numel)):>10}{_percent(row.observed.overlap_a):>11}"
            f"{_percent(row.observed.overlap_b):>11}{_percent(row.observed.iou):>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``lightning-power sparsity-overlap A B [--json]``: 0 on success, 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="lightning-power sparsity-overlap",
        description="Overlap of the parameters updated in two runs (masks files written by UpdateSparsityMonitor "
        "with save_masks=True), with global and per-layer chance baselines.",
    )
    parser.add_argument("a", help="masks file of run A (.npz)")
    parser.add_argument("b", help="masks file of run B (.npz)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = overlap(args.a, args.b)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, **dataclasses.asdict(report)}, indent=2))
    else:
        print(format_report(report, args.a, args.b))
    return 0
