"""Attribution reduction: ``(a_other - a_base) . grad`` per component, summed over its dims.

Shapes: ``base``, ``other``, ``grad`` are ``[B, T, C, D]`` (batch row, position, component such as a
head or a neuron, the component's own dims); ``base=None`` means ``other`` already holds the
difference ``a_other - a_base`` (what a scan keeps between its forward and backward). The result
is ``[B, T, C]`` (``by_pos``) or ``[B, C]`` (summed over positions: the component patched at every
position), accumulated in fp32. ``abs`` takes each row's absolute value after the reduction (the
per-pair ``|I|`` that GradDrop sums); ``out`` accumulates into an existing fp32 tensor of the
result's shape (any strides) instead of allocating one.

``attribute_ref`` is the reference: the CPU path and the oracle of ``attribute_fwd_kernel``, which
reads each input once in ``[BT, BR, BD]`` tiles (``BR`` rows ``(b, c)``) and keeps the sums in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def attribute_ref(
    base: torch.Tensor | None,
    other: torch.Tensor,
    grad: torch.Tensor,
    by_pos: bool = True,
    abs: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """First-order effect of replacing ``base`` by ``other``: ``sum_D (other - base) * grad``.

    >>> b, o, g = torch.zeros(1, 2, 1, 3), torch.ones(1, 2, 1, 3), torch.full((1, 2, 1, 3), 2.0)
    >>> attribute_ref(b, o, g, by_pos=False)
    tensor([[12.]])
    """
    check_attribute(base, other, grad, by_pos, out)
    delta = other.float() if base is None else other.float() - base.float()
    s = (delta * grad.float()).sum(-1)  # [B, T, C]
    s = s if by_pos else s.sum(1)
    s = s.abs() if abs else s
    return s if out is None else out.add_(s)


def check_attribute(base, other, grad, by_pos, out) -> None:
    base_shape = other.shape if base is None else base.shape
    if not base_shape == other.shape == grad.shape or other.dim() != 4:
        raise ValueError(
            f"base, other, grad must share a [B, T, C, D] shape, got {tuple(base_shape)}, "
            f"{tuple(other.shape)}, {tuple(grad.shape)}"
        )
    b, t, c, _ = other.shape
    want = (b, t, c) if by_pos else (b, c)
    if out is not None and (tuple(out.shape) != want or out.dtype != torch.float32):
        raise ValueError(f"out must be fp32 {want}, got {out.dtype} {tuple(out.shape)}")


@triton.jit
def attribute_fwd_kernel(
    out_ptr,
    base_ptr,
    other_ptr,
    grad_ptr,
    n_rows,
    T,
    C,
    D,
    T_PER,
    so_b,
    so_t,
    so_c,
    so_k,
    sb_b,
    sb_t,
    sb_c,
    sb_d,
    sx_b,
    sx_t,
    sx_c,
    sx_d,
    sg_b,
    sg_t,
    sg_c,
    sg_d,
    HAS_BASE: tl.constexpr,
    BY_POS: tl.constexpr,
    ABS: tl.constexpr,
    ACCUM: tl.constexpr,
    BT: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    """Grid ``(cdiv(B * C, BR), cdiv(T, T_PER))``: a program owns ``BR`` rows ``(b, c)`` and the positions
    ``[k T_PER, (k + 1) T_PER)``, looping over them and ``D`` in [BT, BR, BD] tiles. ``BY_POS``
    (``T_PER == BT``) writes per position; otherwise chunk ``k`` writes its sum at ``out + k so_k``."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)  # [BR]
    rok = r < n_rows
    b = r // C
    c = r % C
    xr = (b * sx_b + c * sx_c)[None, :, None]  # [1, BR, 1]
    gr = (b * sg_b + c * sg_c)[None, :, None]
    br = (b * sb_b + c * sb_c)[None, :, None]
    k = tl.program_id(1).to(tl.int64)
    t_lo = k * T_PER
    t_hi = tl.minimum(t_lo + T_PER, T)
    acc = tl.zeros([BT, BR], tl.float32)
    for t0 in range(t_lo, t_hi, BT):
        t = t0 + tl.arange(0, BT).to(tl.int64)  # [BT]
        tr = ((t < t_hi)[:, None] & rok[None, :])[:, :, None]  # [BT, BR, 1]
        t3 = t[:, None, None]
        for d0 in range(0, D, BD):
            d = (d0 + tl.arange(0, BD).to(tl.int64))[None, None, :]  # [1, 1, BD]
            ok = tr & (d < D)  # [BT, BR, BD]
            x = tl.load(other_ptr + xr + t3 * sx_t + d * sx_d, mask=ok, other=0.0).to(tl.float32)
            if HAS_BASE:
                x -= tl.load(base_ptr + br + t3 * sb_t + d * sb_d, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(grad_ptr + gr + t3 * sg_t + d * sg_d, mask=ok, other=0.0).to(tl.float32)
            acc += tl.sum(x * g, 2)
    orow = b * so_b + c * so_c  # [BR]
    if BY_POS:
        t = t_lo + tl.arange(0, BT).to(tl.int64)
        ok = (t < T)[:, None] & rok[None, :]
        o = out_ptr + t[:, None] * so_t + orow[None, :]  # [BT, BR]
        s = tl.abs(acc) if ABS else acc
        if ACCUM:
            s += tl.load(o, mask=ok, other=0.0)
        tl.store(o, s, mask=ok)
    else:
        s = tl.sum(acc, 0)  # [BR]
        s = tl.abs(s) if ABS else s
        o = out_ptr + k * so_k + orow
        if ACCUM:
            s += tl.load(o, mask=rok, other=0.0)
        tl.store(o, s, mask=rok)
