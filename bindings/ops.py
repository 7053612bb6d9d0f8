"""The one entry point per op that the engine calls.

Today every op runs its pure-PyTorch reference from ``causalscan.kernels``; the Triton kernels
slot in here, behind the same signatures, with the backend choice (``CAUSALSCAN_BACKEND``).
"""

from __future__ import annotations

import torch

from causalscan.kernels.attribute import attribute_ref
from causalscan.kernels.perturb import OPS, perturb_ref
from causalscan.kernels.qk_fix import qk_fix_ref

__all__ = ["OPS", "attribute", "perturb", "qk_fix"]


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


def attribute(base: torch.Tensor | None, other: torch.Tensor, grad: torch.Tensor, by_pos: bool = True
              ) -> torch.Tensor:
    """``sum_D (other - base) * grad`` of ``[B, T, C, D]`` tensors -> ``[B, T, C]`` or ``[B, C]`` (fp32);
    ``base=None``: ``other`` is the difference already.

    See :mod:`causalscan.kernels.attribute`.
    """
    return attribute_ref(base, other, grad, by_pos)


def qk_fix(q, k, v, dz, bias, scaling, softcap=None, q_other=None, k_other=None) -> dict[str, torch.Tensor]:
    """Exact-pattern effects of patched queries/keys; see :mod:`causalscan.kernels.qk_fix`."""
    return qk_fix_ref(q, k, v, dz, bias, scaling, softcap, q_other, k_other)
