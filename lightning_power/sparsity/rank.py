"""Rank of an update matrix, as a fraction of full rank, and its stable rank."""

from __future__ import annotations

import math

import torch


def update_rank(delta: torch.Tensor) -> tuple[float, float]:
    """``(rank(delta) / min(m, n), ||delta||_F^2 / sigma_1^2)`` of a 2-D update ``delta = W - W_ref``.

    The rank counts singular values above ``sigma_1 * max(m, n) * eps`` (float32), ``torch.linalg.matrix_rank``'s
    default and the choice of Mukherjee et al. (arXiv 2505.11711, §3, Table 2), who report 99.2-99.8 %. The stable rank
    ``sum(sigma_i^2) / sigma_1^2`` (Rudelson & Vershynin, 2007) says how many directions carry the update's energy.
    Both are 0 for a zero update, and NaN for an update with a NaN or infinite element (which ``svdvals`` cannot
    take). One ``svdvals`` serves both.
    """
    if delta.dim() != 2:
        raise ValueError(f"delta must be a matrix, got shape {tuple(delta.shape)}")
    matrix = delta.float()
    if not bool(matrix.isfinite().all()):
        return math.nan, math.nan
    sigma = torch.linalg.svdvals(matrix)
    top = sigma[0]
    if top == 0:
        return 0.0, 0.0
    threshold = top * max(delta.shape) * torch.finfo(torch.float32).eps
    rank = int((sigma > threshold).sum())
    return rank / min(delta.shape), float(sigma.square().sum() / top.square())
