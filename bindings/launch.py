"""Launchers: tensors in, Triton grids and strides out. Shapes as in :mod:`causalscan.kernels`.

Every input is addressed through its strides (a broadcast parameter is expanded to stride 0, a
non-contiguous view is read in place); outputs are new contiguous tensors, or the caller's
``out``. Tiles are larger under the interpreter, which runs one program at a time.
"""

from __future__ import annotations

import torch
import triton

from causalscan.kernels.attribute import attribute_fwd_kernel
from causalscan.kernels.perturb import OPS, perturb_fwd_kernel
from causalscan.kernels.qk_fix import qk_fix_keys_kernel, qk_fix_rows_kernel


def interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(perturb_fwd_kernel, InterpretedFunction)


# Elements per program (a GPU wants many small programs, the interpreter few large ones), and the
# query/key block of qk_fix. Tests shrink them to exercise every loop and boundary.
# ``programs``: how many programs a launch should have at least (the GPU's SMs several times over)
# before a reduction over positions is split into chunks.
TILE = {"gpu": 2048, "interpreter": 1 << 16, "qk": 64, "programs_gpu": 1024, "programs_interpreter": 1}


def _tile(what: str = "") -> int:
    return TILE[what + ("interpreter" if interpreting() else "gpu")]


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def perturb_fwd(x, op, mask, source=None, vector=None, alpha=None, direction=None) -> torch.Tensor:
    """``x`` [B, T, C, D] -> new contiguous [B, T, C, D]; parameters as in ``perturb_ref``."""
    b, t, c, d = x.shape
    y = torch.empty((b, t, c, d), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    mask = mask.expand(b, t, c)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    dummy = x  # never read: the constexpr branches that would read it are compiled out
    src = source.expand(b, t, c, d) if source is not None else dummy
    vec = vector.expand(b, c, d) if vector is not None else dummy[:, 0]
    a = alpha.reshape(-1).expand(b) if alpha is not None else dummy[:, 0, 0, 0]
    u = direction.expand(b, c, d) if direction is not None else dummy[:, 0]
    bd = min(_p2(d), 1024)
    br = max(1, min(_tile() // bd, _p2(b * t * c)))
    grid = (triton.cdiv(b * t * c, br),)
    perturb_fwd_kernel[grid](
        y,
        x,
        mask,
        src,
        vec,
        a,
        u,
        b * t * c,
        t,
        c,
        d,
        *x.stride(),
        *mask.stride(),
        *src.stride(),
        *vec.stride(),
        a.stride(0),
        *u.stride(),
        OP=OPS.index(op),
        HAS_ALPHA=alpha is not None,
        HAS_DIR=direction is not None,
        BR=br,
        BD=bd,
    )
    return y


def attribute_fwd(base, other, grad, by_pos=True, abs=False, out=None) -> torch.Tensor:
    """``sum_D (other - base) * grad`` -> fp32 [B, T, C] or [B, C], into ``out`` when given."""
    b, t, c, d = other.shape
    accum = out is not None
    if out is None:
        out = torch.empty((b, t, c) if by_pos else (b, c), dtype=torch.float32, device=other.device)
    if out.numel() == 0:
        return out
    if t == 0 or d == 0:
        return out if accum else out.zero_()
    bd = min(_p2(d), 256)
    br = min(_p2(b * c), max(1, _tile() // bd))
    bt = min(_p2(t), max(1, _tile() // (bd * br)))
    row_programs = triton.cdiv(b * c, br)
    base_ = other if base is None else base
    strides = (*base_.stride(), *other.stride(), *grad.stride())
    flags = dict(HAS_BASE=base is not None, BT=bt, BR=br, BD=bd)
    if by_pos:
        attribute_fwd_kernel[(row_programs, triton.cdiv(t, bt))](
            out,
            base_,
            other,
            grad,
            b * c,
            t,
            c,
            d,
            bt,
            *out.stride(),
            0,
            *strides,
            BY_POS=True,
            ABS=abs,
            ACCUM=accum,
            **flags,
        )
        return out
    # summed over positions: split T into chunks when the rows alone give too few programs
    chunks = max(1, min(_tile("programs_") // row_programs, triton.cdiv(t, bt)))
    t_per = triton.cdiv(triton.cdiv(t, chunks), bt) * bt
    chunks = triton.cdiv(t, t_per)
    if chunks == 1:
        attribute_fwd_kernel[(row_programs, 1)](
            out,
            base_,
            other,
            grad,
            b * c,
            t,
            c,
            d,
            t_per,
            out.stride(0),
            0,
            out.stride(1),
            0,
            *strides,
            BY_POS=False,
            ABS=abs,
            ACCUM=accum,
            **flags,
        )
        return out
    part = torch.empty(chunks, b, c, dtype=torch.float32, device=other.device)  # [K, B, C]
    attribute_fwd_kernel[(row_programs, chunks)](
        part,
        base_,
        other,
        grad,
        b * c,
        t,
        c,
        d,
        t_per,
        c,
        0,
        1,
        b * c,
        *strides,
        BY_POS=False,
        ABS=False,
        ACCUM=False,
        **flags,
    )
    s = part.sum(0)
    s = s.abs() if abs else s
    return out.add_(s) if accum else out.copy_(s)
    return out


def qk_fix_fwd(q, k, v, dz, bias, scaling, softcap=None, q_other=None, k_other=None):
    """``(iq [B, T, H], ik [B, T, Hkv], k_all [B, Hkv])`` fp32; an absent patch gives an empty tensor."""
    b, h, tq, dh = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    grp = h // hkv
    dev = q.device
    bias = bias.expand(b, h, tq, tk)
    if q_other is not None and q_other.stride() != q.stride():  # the kernels read both through one stride set
        q, q_other = q.contiguous(), q_other.contiguous()
    if k_other is not None and k_other.stride() != k.stride():
        k, k_other = k.contiguous(), k_other.contiguous()
    f32 = dict(dtype=torch.float32, device=dev)
    rows = [torch.empty(b, h, tq, **f32) for _ in range(6)]
    iq, iall, mx, lrest, grest, srow = rows
    top = torch.empty(b, h, tq, dtype=torch.int64, device=dev)
    f32_dot = q.dtype == torch.float32 or interpreting()
    # tl.dot wants >= 16; an fp32 (ieee) dot unrolls to FMAs, so GPU blocks are halved for it
    block = TILE["qk"] // 2 if f32_dot and not interpreting() else TILE["qk"]
    bt = bs = min(block, max(16, _p2(max(tq, tk))))
    bdh = max(16, _p2(dh))
    strides = (*q.stride(), *k.stride(), *v.stride(), *dz.stride(), *bias.stride())
    common = dict(SOFTCAP=bool(softcap), F32_DOT=f32_dot, BT=bt, BS=bs, BDH=bdh)
    has_q, has_k = q_other is not None, k_other is not None
    qo = q_other if has_q else q
    ko = k_other if has_k else k
    qk_fix_rows_kernel[(b * h, triton.cdiv(tq, bt))](
        iq,
        iall,
        mx,
        top,
        lrest,
        grest,
        srow,
        q,
        k,
        v,
        dz,
        bias,
        qo,
        ko,
        tq,
        tk,
        h,
        grp,
        dh,
        float(scaling),
        float(softcap or 0.0),
        *strides,
        HAS_Q=has_q,
        HAS_K=has_k,
        **common,
    )
    ik = k_all = None
    if has_k:
        ik = torch.empty(b, tk, hkv, **f32)
        qk_fix_keys_kernel[(b * hkv, triton.cdiv(tk, bs))](
            ik,
            mx,
            top,
            lrest,
            grest,
            srow,
            q,
            k,
            v,
            dz,
            bias,
            ko,
            tq,
            tk,
            h,
            hkv,
            grp,
            dh,
            float(scaling),
            float(softcap or 0.0),
            *strides,
            **common,
        )
        k_all = iall.sum(-1).unflatten(1, (hkv, grp)).sum(2)
    iq = iq.transpose(1, 2).contiguous() if has_q else None
    return tuple(torch.empty(0, **f32) if r is None else r for r in (iq, ik, k_all))  # outputs never alias
