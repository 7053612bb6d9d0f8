"""The one entry point per op that the engine calls.

Today every op runs its pure-PyTorch reference from ``causalscan.kernels``; the Triton kernels
slot in here, behind the same signatures, with the backend choice (``CAUSALSCAN_BACKEND``).
"""

from __future__ import annotations

import torch

from causalscan.kernels.perturb import OPS, perturb_ref

__all__ = ["OPS", "perturb"]


def perturb(
    x: torch.Tensor,
    op: str,
    mask: torch.Tensor,
    source: torch.Tensor | None = None,
    vector: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    direction: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply intervention ``op`` to ``x`` [B, T, C, D] where ``mask`` [B, T, C] is set.

    See :mod:`causalscan.kernels.perturb` for the ops and parameter shapes.
    """
    return perturb_ref(x, op, mask, source=source, vector=vector, alpha=alpha, direction=direction)
