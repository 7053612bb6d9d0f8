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

``perturb_ref`` is the reference: the CPU path and the oracle of ``perturb_fwd_kernel``, which
does the same in one pass over ``x`` (two over a row's ``D`` for the ``direction`` forms), with
every tensor addressed through its strides (stride 0 for a broadcast parameter). The gradient
with respect to ``x`` is the same kernel applied to the output gradient: every op is affine in
``x`` with a symmetric linear part (``I``, ``0``, ``alpha I``, ``I - m u u^T``, ``I + m (alpha-1) u u^T``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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


@triton.jit
def perturb_fwd_kernel(
    y_ptr,
    x_ptr,
    mask_ptr,
    src_ptr,
    vec_ptr,
    alpha_ptr,
    dir_ptr,
    n_rows,
    T,
    C,
    D,
    sx_b,
    sx_t,
    sx_c,
    sx_d,
    sm_b,
    sm_t,
    sm_c,
    ss_b,
    ss_t,
    ss_c,
    ss_d,
    sv_b,
    sv_c,
    sv_d,
    sa_b,
    su_b,
    su_c,
    su_d,
    OP: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    HAS_DIR: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    """One program: ``BR`` rows ``(b, t, c)`` of ``y`` [B, T, C, D] (contiguous), ``BD`` dims at a time.

    ``OP`` is the index in ``OPS``; every input is read through its strides."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)  # [BR]
    rok = r < n_rows
    c = r % C
    t = (r // C) % T
    b = r // (C * T)
    m = tl.load(mask_ptr + b * sm_b + t * sm_t + c * sm_c, mask=rok, other=0) != 0  # [BR]
    on = rok & m
    if HAS_ALPHA:
        a = tl.load(alpha_ptr + b * sa_b, mask=on, other=1.0).to(tl.float32)  # [BR]
    else:
        a = tl.full([BR], 1.0, tl.float32)
    xo = b * sx_b + t * sx_t + c * sx_c  # [BR]
    uo = b * su_b + c * su_c
    if HAS_DIR:
        coef = tl.zeros([BR], tl.float32)  # x . u
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD).to(tl.int64)
            ok = on[:, None] & (d < D)[None, :]
            x = tl.load(x_ptr + xo[:, None] + d[None, :] * sx_d, mask=ok, other=0.0).to(tl.float32)  # [BR, BD]
            u = tl.load(dir_ptr + uo[:, None] + d[None, :] * su_d, mask=ok, other=0.0).to(tl.float32)
            coef += tl.sum(x * u, 1)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD).to(tl.int64)
        dok = (d < D)[None, :]
        ok = rok[:, None] & dok
        sel = on[:, None] & dok  # [BR, BD]: the rewritten elements
        x = tl.load(x_ptr + xo[:, None] + d[None, :] * sx_d, mask=ok, other=0.0).to(tl.float32)
        if OP == 0:  # patch
            s = tl.load(src_ptr + (b * ss_b + t * ss_t + c * ss_c)[:, None] + d[None, :] * ss_d, mask=sel, other=0.0)
            y = tl.where(sel, s.to(tl.float32), x)
        elif OP == 1:  # add
            v = tl.load(vec_ptr + (b * sv_b + c * sv_c)[:, None] + d[None, :] * sv_d, mask=sel, other=0.0)
            y = x + tl.where(sel, a[:, None] * v.to(tl.float32), 0.0)
        elif OP == 2:  # zero
            y = tl.where(sel, 0.0, x)
        elif HAS_DIR:  # scale / project_out / clamp along u
            u = tl.load(dir_ptr + uo[:, None] + d[None, :] * su_d, mask=sel, other=0.0).to(tl.float32)
            if OP == 3:
                k = (a - 1.0) * coef
            elif OP == 4:
                k = -coef
            else:
                k = a - coef
            y = x + tl.where(sel, k[:, None] * u, 0.0)
        elif OP == 3:  # scale
            y = tl.where(sel, a[:, None] * x, x)
        else:  # clamp every element
            y = tl.where(sel, a[:, None], x)
        tl.store(y_ptr + r[:, None] * D + d[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
