"""AtP* QK fix: the exact attention pattern under a patched query or key, linearised downstream.

For one attention layer, with ``A`` the clean pattern ``[B, H, T, T]``, ``dz`` the metric's gradient
at the per-head output and ``g_tj = dz_t . v_j`` (the gradient at ``A_tj``):

- patched queries: ``A' = softmax(score(q_other, k))``; only row ``t`` depends on ``q_t``, so one
  softmax gives every position's effect ``I_Q(t) = sum_j (A'_tj - A_tj) g_tj``;
- a patched key at position ``s`` (closed form, no loop over keys), with ``D_ts`` the shift of
  the score of query ``t`` on key ``s``:
  ``I_K(s) = sum_t A_ts expm1(D_ts) / (1 + A_ts expm1(D_ts)) * (g_ts - S_t)``, ``S_t = sum_j A_tj g_tj``;
- the key patched at every position: ``A' = softmax(score(q, k_other))``, ``sum_tj (A' - A) g``.

``score`` is the model's own: ``q k^T * scaling``, then ``softcap * tanh(. / softcap)``, then the
additive ``bias`` (0 or a large negative: causal mask, sliding window). Query and key enter after
rotary embeddings and any q/k norm. GQA: ``H = G * H_kv``; key effects sum over the group's heads.
All in fp32, in the equivalent form ``(A'_ts - A_ts) (g_ts - m_ts)`` with ``m_ts`` the weighted mean
of ``g`` over the other keys and ``A'_ts - A_ts = A (1 - A) expm1(D) / ((1 - A) + A exp(D))``
(numerator and denominator divided by ``exp(D)`` when ``D > 0``, so nothing overflows);
for each row's largest weight, ``1 - A`` and ``m`` are summed over the other keys instead of
subtracted (a saturated key pushed down is the case the fix exists for, and ``1 - A`` cancels
there).

``qk_fix_ref`` is the reference: the CPU path and the oracle of the two Triton kernels, which never
hold a ``[T, T]`` matrix. ``qk_fix_rows_kernel`` streams key blocks past a block of queries with
online softmaxes (clean, patched query, every key patched) and keeps, per query row, the max
score, the argmax key, ``sum_{j != top} exp(s_j - max)`` and the same weighted by ``g``: enough
for ``I_Q``, the every-key effect and the row terms of the key form. ``qk_fix_keys_kernel`` then
streams query blocks past a block of keys, rebuilds ``A``, ``g`` and ``D`` tile by tile and sums
``I_K`` over the queries and the GQA group. Scores accumulate in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _scores(q, k, scaling: float, softcap: float | None) -> torch.Tensor:
    s = (q @ k.transpose(-1, -2)) * scaling  # [B, H, T, T]
    return softcap * torch.tanh(s / softcap) if softcap else s


def qk_fix_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dz: torch.Tensor,
    bias: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    q_other: torch.Tensor | None = None,
    k_other: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Exact-pattern effects of patched queries and keys.

    ``q``/``q_other`` [B, H, T, Dh]; ``k``/``k_other``/``v`` [B, Hkv, T, Dh]; ``dz`` [B, T, H, Dh];
    ``bias`` broadcastable to [B, H, T, T]. Returns (for the inputs given):
    ``"q"`` [B, T, H] (query patched at one position), ``"k"`` [B, T, Hkv] (key patched at one
    position), ``"k_all"`` [B, Hkv] (key patched at every position).
    """
    h, hkv = q.shape[1], k.shape[1]
    grp = h // hkv
    q, k, v, dz, bias = q.float(), k.float(), v.float(), dz.float(), bias.float()
    kr, vr = k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1)  # [B, H, T, Dh]
    raw = _scores(q, kr, scaling, softcap)
    a = torch.softmax(raw + bias, -1)  # [B, H, T, T]
    g = dz.transpose(1, 2) @ vr.transpose(-1, -2)  # [B, H, T, T]: dL/dA
    out = {}
    if q_other is not None:
        a_q = torch.softmax(_scores(q_other.float(), kr, scaling, softcap) + bias, -1)
        out["q"] = ((a_q - a) * g).sum(-1).transpose(1, 2)  # [B, T, H]
    if k_other is not None:
        raw_k = _scores(q, k_other.float().repeat_interleave(grp, 1), scaling, softcap)
        d = raw_k - raw  # [B, H, T, T]: D_ts
        s_t = (a * g).sum(-1, keepdim=True)  # [B, H, T, 1]
        # rest_ts = 1 - A_ts and m_ts = the A-weighted mean of g over keys j != s. For the row's
        # argmax key (the only one that can be near 1) both are summed explicitly, not cancelled.
        top = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, a.argmax(-1, keepdim=True), True)
        a_rest = a.masked_fill(top, 0.0)
        rest_top = a_rest.sum(-1, keepdim=True)
        m_top = (a_rest * g).sum(-1, keepdim=True) / rest_top.clamp_min(1e-30)
        rest = torch.where(top, rest_top, 1 - a)
        m = torch.where(top, m_top, (s_t - a * g) / (1 - a).clamp_min(1e-30))
        e = torch.exp(-d.abs())  # <= 1: the form below never overflows
        delta = torch.where(
            d <= 0, a * rest * torch.expm1(d) / (rest + a * e), a * rest * -torch.expm1(-d) / (rest * e + a)
        )  # A'_ts - A_ts
        ik = torch.where((rest > 0) & (a > 0), delta * (g - m), 0.0).sum(-2)  # [B, H, T(key)]
        out["k"] = ik.unflatten(1, (hkv, grp)).sum(2).transpose(1, 2)  # [B, T, Hkv]
        a_k = torch.softmax(raw_k + bias, -1)
        out["k_all"] = ((a_k - a) * g).sum((-1, -2)).unflatten(1, (hkv, grp)).sum(2)  # [B, Hkv]
    return out


@triton.jit
def _tl_expm1_neg(x):
    """``expm1(x)`` for ``x <= 0`` without the cancellation of ``exp(x) - 1`` near 0."""
    small = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0)))))
    return tl.where(x > -0.1, small, tl.exp(x) - 1.0)


@triton.jit
def _tl_scores(q, k, scaling, softcap, F32_DOT: tl.constexpr, SOFTCAP: tl.constexpr):
    """``q`` [BT, BDH] . ``k`` [BS, BDH] -> [BT, BS] fp32, the model's score before the bias."""
    if F32_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scaling
    if SOFTCAP:
        e = tl.exp(-2.0 * tl.abs(s / softcap))
        th = (1.0 - e) / (1.0 + e)
        s = softcap * tl.where(s < 0, -th, th)
    return s


@triton.jit
def _tl_g(dz, v, F32_DOT: tl.constexpr):
    """``g_tj = dz_t . v_j``: [BT, BDH] x [BS, BDH] -> [BT, BS] fp32."""
    if F32_DOT:
        return tl.dot(dz.to(tl.float32), tl.trans(v.to(tl.float32)), input_precision="ieee")
    return tl.dot(dz, tl.trans(v))


@triton.jit
def _tl_online(m, total, acc, sc, g):
    """One key block of an online softmax: running max ``m``, sum ``total`` and ``sum e g`` [BT] updated
    with scores ``sc`` and weights ``g`` [BT, BS]."""
    mn = tl.maximum(m, tl.max(sc, 1))
    base = tl.where(mn == float("-inf"), 0.0, mn)
    scale = tl.where(m == float("-inf"), 0.0, tl.exp(m - base))
    e = tl.exp(sc - base[:, None])
    return mn, total * scale + tl.sum(e, 1), acc * scale + tl.sum(e * g, 1)


@triton.jit
def qk_fix_rows_kernel(
    iq_ptr,
    iall_ptr,
    mx_ptr,
    top_ptr,
    lrest_ptr,
    grest_ptr,
    srow_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    dz_ptr,
    bias_ptr,
    qo_ptr,
    ko_ptr,
    TQ,
    TK,
    H,
    G,
    DH,
    scaling,
    softcap,
    sq_b,
    sq_h,
    sq_t,
    sq_d,
    sk_b,
    sk_h,
    sk_t,
    sk_d,
    sv_b,
    sv_h,
    sv_t,
    sv_d,
    sz_b,
    sz_t,
    sz_h,
    sz_d,
    sB_b,
    sB_h,
    sB_t,
    sB_s,
    HAS_Q: tl.constexpr,
    HAS_K: tl.constexpr,
    SOFTCAP: tl.constexpr,
    F32_DOT: tl.constexpr,
    BT: tl.constexpr,
    BS: tl.constexpr,
    BDH: tl.constexpr,
):
    """Grid ``(B * H, cdiv(TQ, BT))``. Row outputs ``[B, H, TQ]`` fp32 (contiguous): ``iq`` (query
    patched), ``iall`` (every key patched), and the clean row's ``mx``, ``top``, ``lrest``,
    ``grest``, ``srow`` (``S_t``). ``q``/``qo`` share strides, as do ``k``/``ko``."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // G
    t = tl.program_id(1).to(tl.int64) * BT + tl.arange(0, BT).to(tl.int64)  # [BT]
    tok = t < TQ
    dd = tl.arange(0, BDH).to(tl.int64)
    qm = tok[:, None] & (dd < DH)[None, :]
    q_off = b * sq_b + h * sq_h + t[:, None] * sq_t + dd[None, :] * sq_d
    q = tl.load(q_ptr + q_off, mask=qm, other=0.0)  # [BT, BDH]
    dz = tl.load(dz_ptr + b * sz_b + t[:, None] * sz_t + h * sz_h + dd[None, :] * sz_d, mask=qm, other=0.0)
    if HAS_Q:
        qo = tl.load(qo_ptr + q_off, mask=qm, other=0.0)
    ninf = float("-inf")
    mx = tl.full([BT], ninf, tl.float32)  # clean: running max, argmax, rest sums, g at the max
    top = tl.zeros([BT], tl.int64)
    lrest = tl.zeros([BT], tl.float32)
    grest = tl.zeros([BT], tl.float32)
    gtop = tl.zeros([BT], tl.float32)
    mq = tl.full([BT], ninf, tl.float32)  # patched query / every key patched: plain online softmax
    lq = tl.zeros([BT], tl.float32)
    aq = tl.zeros([BT], tl.float32)
    mk = tl.full([BT], ninf, tl.float32)
    lk = tl.zeros([BT], tl.float32)
    ak = tl.zeros([BT], tl.float32)
    for s0 in range(0, TK, BS):
        s = s0 + tl.arange(0, BS).to(tl.int64)  # [BS]
        sok = s < TK
        km = sok[:, None] & (dd < DH)[None, :]
        k_off = b * sk_b + hk * sk_h + s[:, None] * sk_t + dd[None, :] * sk_d
        k = tl.load(k_ptr + k_off, mask=km, other=0.0)  # [BS, BDH]
        v = tl.load(v_ptr + b * sv_b + hk * sv_h + s[:, None] * sv_t + dd[None, :] * sv_d, mask=km, other=0.0)
        ok = tok[:, None] & sok[None, :]
        bias = tl.load(
            bias_ptr + b * sB_b + h * sB_h + t[:, None] * sB_t + s[None, :] * sB_s, mask=ok, other=ninf
        )  # [BT, BS]
        g = _tl_g(dz, v, F32_DOT)
        sc = _tl_scores(q, k, scaling, softcap, F32_DOT, SOFTCAP) + bias
        bm = tl.max(sc, 1)
        bi = tl.argmax(sc, 1)  # first max of the block
        mn = tl.maximum(mx, bm)
        new = bm > mx
        base = tl.where(mn == ninf, 0.0, mn)
        e = tl.exp(sc - base[:, None])
        at_bi = s[None, :] == (s0 + bi)[:, None]
        e_ex = tl.where(new[:, None] & at_bi, 0.0, e)
        scale = tl.where(mx == ninf, 0.0, tl.exp(mx - base))
        lrest = tl.where(new, (lrest + 1.0) * scale, lrest) + tl.sum(e_ex, 1)
        grest = tl.where(new, (grest + gtop) * scale, grest) + tl.sum(e_ex * g, 1)
        gtop = tl.where(new, tl.sum(tl.where(at_bi, g, 0.0), 1), gtop)
        top = tl.where(new, s0 + bi, top)
        mx = mn
        if HAS_Q:
            mq, lq, aq = _tl_online(mq, lq, aq, _tl_scores(qo, k, scaling, softcap, F32_DOT, SOFTCAP) + bias, g)
        if HAS_K:
            ko = tl.load(ko_ptr + k_off, mask=km, other=0.0)
            mk, lk, ak = _tl_online(mk, lk, ak, _tl_scores(q, ko, scaling, softcap, F32_DOT, SOFTCAP) + bias, g)
    srow = (gtop + grest) / (1.0 + lrest)  # S_t = sum_j A_tj g_tj
    o = bh * TQ + t
    if HAS_Q:
        tl.store(iq_ptr + o, aq / tl.where(lq > 0, lq, 1.0) - srow, mask=tok)
    if HAS_K:
        tl.store(iall_ptr + o, ak / tl.where(lk > 0, lk, 1.0) - srow, mask=tok)
        tl.store(mx_ptr + o, mx, mask=tok)
        tl.store(top_ptr + o, top, mask=tok)
        tl.store(lrest_ptr + o, lrest, mask=tok)
        tl.store(grest_ptr + o, grest, mask=tok)
        tl.store(srow_ptr + o, srow, mask=tok)


@triton.jit
def qk_fix_keys_kernel(
    ik_ptr,
    mx_ptr,
    top_ptr,
    lrest_ptr,
    grest_ptr,
    srow_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    dz_ptr,
    bias_ptr,
    ko_ptr,
    TQ,
    TK,
    H,
    HKV,
    G,
    DH,
    scaling,
    softcap,
    sq_b,
    sq_h,
    sq_t,
    sq_d,
    sk_b,
    sk_h,
    sk_t,
    sk_d,
    sv_b,
    sv_h,
    sv_t,
    sv_d,
    sz_b,
    sz_t,
    sz_h,
    sz_d,
    sB_b,
    sB_h,
    sB_t,
    sB_s,
    SOFTCAP: tl.constexpr,
    F32_DOT: tl.constexpr,
    BT: tl.constexpr,
    BS: tl.constexpr,
    BDH: tl.constexpr,
):
    """Grid ``(B * HKV, cdiv(TK, BS))``: ``ik`` [B, TK, HKV] fp32, the key patched at one position,
    summed over the queries and the ``G`` query heads that share the key head."""
    bk = tl.program_id(0).to(tl.int64)
    b = bk // HKV
    hk = bk % HKV
    s = tl.program_id(1).to(tl.int64) * BS + tl.arange(0, BS).to(tl.int64)  # [BS]
    sok = s < TK
    dd = tl.arange(0, BDH).to(tl.int64)
    km = sok[:, None] & (dd < DH)[None, :]
    k_off = b * sk_b + hk * sk_h + s[:, None] * sk_t + dd[None, :] * sk_d
    k = tl.load(k_ptr + k_off, mask=km, other=0.0)  # [BS, BDH]
    ko = tl.load(ko_ptr + k_off, mask=km, other=0.0)
    v = tl.load(v_ptr + b * sv_b + hk * sv_h + s[:, None] * sv_t + dd[None, :] * sv_d, mask=km, other=0.0)
    acc = tl.zeros([BS], tl.float32)
    for gi in range(0, G):
        h = hk * G + gi
        for t0 in range(0, TQ, BT):
            t = t0 + tl.arange(0, BT).to(tl.int64)  # [BT]
            tok = t < TQ
            qm = tok[:, None] & (dd < DH)[None, :]
            q = tl.load(q_ptr + b * sq_b + h * sq_h + t[:, None] * sq_t + dd[None, :] * sq_d, mask=qm, other=0.0)
            dz = tl.load(dz_ptr + b * sz_b + t[:, None] * sz_t + h * sz_h + dd[None, :] * sz_d, mask=qm, other=0.0)
            o = (b * H + h) * TQ + t
            mx = tl.load(mx_ptr + o, mask=tok, other=0.0)
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            top = tl.load(top_ptr + o, mask=tok, other=-1)
            lrest = tl.load(lrest_ptr + o, mask=tok, other=0.0)
            grest = tl.load(grest_ptr + o, mask=tok, other=0.0)
            srow = tl.load(srow_ptr + o, mask=tok, other=0.0)
            ok = tok[:, None] & sok[None, :]
            bias = tl.load(
                bias_ptr + b * sB_b + h * sB_h + t[:, None] * sB_t + s[None, :] * sB_s, mask=ok, other=float("-inf")
            )
            raw = _tl_scores(q, k, scaling, softcap, F32_DOT, SOFTCAP)  # [BT, BS]
            d = _tl_scores(q, ko, scaling, softcap, F32_DOT, SOFTCAP) - raw  # D_ts
            g = _tl_g(dz, v, F32_DOT)
            a = tl.exp(raw + bias - mx[:, None]) / (1.0 + lrest)[:, None]  # A_ts
            is_top = s[None, :] == top[:, None]
            rest_top = lrest / (1.0 + lrest)
            m_top = grest / tl.where(lrest > 0, lrest, 1.0)
            rest = tl.where(is_top, rest_top[:, None], 1.0 - a)
            m = tl.where(is_top, m_top[:, None], (srow[:, None] - a * g) / tl.maximum(1.0 - a, 1e-30))
            e = tl.exp(-tl.abs(d))
            em = _tl_expm1_neg(-tl.abs(d))  # expm1(-|D|)
            den = tl.where(d <= 0, rest + a * e, rest * e + a)
            delta = tl.where(d <= 0, 1.0, -1.0) * a * rest * em / tl.where(den > 0, den, 1.0)
            acc += tl.sum(tl.where((rest > 0) & (a > 0), delta * (g - m), 0.0), 0)
    tl.store(ik_ptr + (b * TK + s) * HKV + hk, acc, mask=sok)
