"""The per-layer update-sparsity heatmap (layers x checks) written at the end of a fit."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure


def heatmap(steps: Sequence[int], layers: Sequence[str], values: Sequence[Sequence[float]], title: str) -> Figure:
    """A figure of ``values[check][layer]`` (fractions unchanged): checks along x, layers along y.

    Built without ``pyplot``, so it never touches the user's matplotlib backend.
    """
    figure = Figure(figsize=(min(4 + 0.3 * len(steps), 16), 1.5 + 0.3 * len(layers)))
    axes = figure.add_subplot()
    image = axes.imshow(list(zip(*values)), aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    axes.set_yticks(range(len(layers)), labels=layers, fontsize=8)
    ticks = list(range(0, len(steps), max(1, len(steps) // 12)))
    axes.set_xticks(ticks, labels=[str(steps[i]) for i in ticks], fontsize=8)
    axes.set_xlabel("optimizer step")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="fraction unchanged")
    figure.tight_layout()
    return figure
