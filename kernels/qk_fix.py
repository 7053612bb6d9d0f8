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
there). This file is the reference: the CPU path and the oracle of the Triton kernel.
"""

from __future__ import annotations

import torch


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
        delta = torch.where(d <= 0, a * rest * torch.expm1(d) / (rest + a * e),
                            a * rest * -torch.expm1(-d) / (rest * e + a))  # A'_ts - A_ts
        ik = torch.where((rest > 0) & (a > 0), delta * (g - m), 0.0).sum(-2)  # [B, H, T(key)]
        out["k"] = ik.unflatten(1, (hkv, grp)).sum(2).transpose(1, 2)  # [B, T, Hkv]
        a_k = torch.softmax(raw_k + bias, -1)
        out["k_all"] = ((a_k - a) * g).sum((-1, -2)).unflatten(1, (hkv, grp)).sum(2)  # [B, Hkv]
    return out
