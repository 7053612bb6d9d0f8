"""Perturbation injection: one primitive behind every intervention op.

Every op rewrites ``x`` (shape ``[B, T, C, D]``: batch row, position, component such as a head
or a neuron, and the component's own dims) only where ``mask`` (``[B, T, C]``) is set, with
parameters that may differ per batch row (leading dim ``B`` or ``1``):

    patch        x' = source                     source     [B, T, C, D]
    add          x' = x + alpha * vector         vector     [B, C, D], alpha [B]
    zero         x' = 0
    scale        x' = alpha * x                  (or along ``direction`` only)
    project_out  x' = x - (x . u) u              direction  [B, C, D], unit along D
    clamp        x' = x + (alpha - x . u) u      (without direction: every element to alpha)

``mean`` ablation is ``patch`` with a broadcast source. All ops are differentiable in ``x``,
``vector``, ``alpha`` and ``direction`` (steering vectors are trained through ``add``).
This file is the reference: the CPU path and the oracle of the Triton kernel.
"""

from __future__ import annotations

import torch

OPS = ("patch", "add", "zero", "scale", "project_out", "clamp")


def _rows(p: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-row parameter ``[B]`` or ``[1]`` -> broadcastable against ``[B, T, C, D]``."""
    return p.reshape(p.shape[0], *([1] * (ndim - 1)))


def perturb_ref(
    x: torch.Tensor,
    op: str,
    mask: torch.Tensor,
    source: torch.Tensor | None = None,
    vector: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    direction: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply ``op`` to ``x`` [B, T, C, D] where ``mask`` [B, T, C] is set; returns a new tensor.

    >>> x = torch.ones(1, 2, 1, 3)
    >>> m = torch.tensor([[[True], [False]]])
    >>> perturb_ref(x, "zero", m)[0, :, 0]
    tensor([[0., 0., 0.],
            [1., 1., 1.]])
    """
    if op not in OPS:
        raise ValueError(f"unknown perturb op {op!r}; expected one of {', '.join(OPS)}")
    if x.dim() != 4 or mask.dim() != 3:
        raise ValueError(f"x must be [B, T, C, D] and mask [B, T, C], got {tuple(x.shape)} and {tuple(mask.shape)}")
    m = mask.to(x.dtype).unsqueeze(-1)  # [B, T, C, 1]
    if op == "patch":
        return x + m * (source.to(x.dtype) - x)
    if op == "zero":
        return x - m * x
    if op == "add":
        v = vector.to(x.dtype).unsqueeze(1)  # [B, 1, C, D]
        a = _rows(alpha, 4).to(x.dtype) if alpha is not None else 1.0
        return x + m * (a * v)
    a = _rows(alpha, 4).to(x.dtype) if alpha is not None else None
    if direction is None:
        if op == "scale":
            return x + m * ((a - 1) * x)
        if op == "clamp":
            return x + m * (a - x)
        raise ValueError("project_out needs a direction")
    u = direction.to(x.dtype).unsqueeze(1)  # [B, 1, C, D]
    coef = (x * u).sum(-1, keepdim=True)  # [B, T, C, 1]
    if op == "project_out":
        return x - m * (coef * u)
    if op == "scale":
        return x + m * ((a - 1) * coef * u)
    return x + m * ((a - coef) * u)  # clamp
