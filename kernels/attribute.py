"""Attribution reduction: ``(a_other - a_base) . grad`` per component, summed over its dims.

Shapes: ``base``, ``other``, ``grad`` are ``[B, T, C, D]`` (batch row, position, component such as a
head or a neuron, the component's own dims); ``base=None`` means ``other`` already holds the
difference ``a_other - a_base`` (what a scan keeps between its forward and backward). The result
is ``[B, T, C]`` (``by_pos``) or ``[B, C]`` (summed over positions: the component patched at every
position), accumulated in fp32.
Per-pair ``abs`` is taken by the caller on the returned per-row scores, after any reduction.
This file is the reference: the CPU path and the oracle of the Triton kernel.
"""

from __future__ import annotations

import torch


def attribute_ref(base: torch.Tensor | None, other: torch.Tensor, grad: torch.Tensor, by_pos: bool = True
                  ) -> torch.Tensor:
    """First-order effect of replacing ``base`` by ``other``: ``sum_D (other - base) * grad``.

    >>> b, o, g = torch.zeros(1, 2, 1, 3), torch.ones(1, 2, 1, 3), torch.full((1, 2, 1, 3), 2.0)
    >>> attribute_ref(b, o, g, by_pos=False)
    tensor([[12.]])
    """
    base_shape = other.shape if base is None else base.shape
    if not base_shape == other.shape == grad.shape or other.dim() != 4:
        raise ValueError(f"base, other, grad must share a [B, T, C, D] shape, got {tuple(base_shape)}, "
                         f"{tuple(other.shape)}, {tuple(grad.shape)}")
    delta = other.float() if base is None else other.float() - base.float()
    s = (delta * grad.float()).sum(-1)  # [B, T, C]
    return s if by_pos else s.sum(1)
