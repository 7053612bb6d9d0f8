"""The qk_fix kernels against their reference: GQA, softcap, sliding-window and per-batch masks, q-only,
k-only and both; a saturated key against an fp64 brute force; bf16 on a GPU."""

import pytest
import torch

from causalscan.bindings import ops
from causalscan.kernels.qk_fix import qk_fix_ref

from kernel_inputs import BF16, DTYPES, QK_CASES, causal, qk_inputs
from tolerance import assert_close


@pytest.mark.parametrize("case", QK_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("patch", ["q+k", "q", "k"])
def test_qk_fix(triton_backend, nan_empty, small_tiles, case, dtype, patch):
    b, h, hkv, t, dh, softcap, window, per_batch = QK_CASES[case]
    (q, k, v, dz), bias, q_other, k_other = qk_inputs(b, h, hkv, t, dh, window, per_batch, DTYPES[dtype])
    kw = dict(q_other=q_other if "q" in patch else None, k_other=k_other if "k" in patch else None)
    got = ops.qk_fix(q, k, v, dz, bias, 0.35, softcap, **kw)
    ref = qk_fix_ref(q, k, v, dz, bias, 0.35, softcap, **kw)  # fp32 math on the same inputs
    assert set(got) == set(ref) == ({"q"} if patch == "q" else {"k", "k_all"} | ({"q"} if "q" in patch else set()))
    for name in ref:
        assert got[name].shape == ref[name].shape
        assert_close(got[name], ref[name], 2e-5)


def test_qk_fix_saturated_key(triton_backend, nan_empty, small_tiles):
    """Rows whose largest weight is ~1 - 1e-9 (where ``1 - A`` cancels in fp32) and a patch that
    pushes that key down: the kernel keeps the rest-sum form, like the reference, and both match
    an fp64 brute force that patches each key and recomputes the softmax."""
    b, h, t, dh = 1, 2, 19, 4
    g = torch.Generator().manual_seed(5)
    u = torch.nn.functional.normalize(torch.randn(b, h, 1, dh, generator=g), dim=-1)
    q = u + 0.1 * torch.randn(b, h, t, dh, generator=g)
    k = torch.randn(b, h, t, dh, generator=g)
    k[..., 3, :] = 40 * u[..., 0, :]  # key 3 dominates every later row
    v, dz = torch.randn(b, h, t, dh, generator=g), torch.randn(b, t, h, dh, generator=g)
    k_other = k.clone()
    k_other[..., 3, :] = 0.0
    bias = causal(t)
    got = ops.qk_fix(q, k, v, dz, bias, 1.0, None, k_other=k_other)["k"]
    ref = qk_fix_ref(q, k, v, dz, bias, 1.0, None, k_other=k_other)["k"]
    qd, kd, vd, dzd, bd = (x.double() for x in (q, k, v, dz, bias))
    gmat = dzd.transpose(1, 2) @ vd.transpose(-1, -2)
    a = torch.softmax(qd @ kd.transpose(-1, -2) + bd, -1)
    brute = torch.zeros(b, t, h, dtype=torch.float64)
    for s in range(t):
        kp = kd.clone()
        kp[..., s, :] = k_other.double()[..., s, :]
        brute[:, s] = ((torch.softmax(qd @ kp.transpose(-1, -2) + bd, -1) - a) * gmat).sum((-1, -2))
    assert a[..., 3:, 3].min() > 1 - 1e-7  # saturated: 1 - A is below fp32's resolution
    assert brute[:, 3].abs().min() > 0.1  # and the patch of that key matters
    assert_close(got, brute, 1e-4)
    assert_close(got, ref)


@pytest.mark.gpu
def test_qk_fix_bf16(triton_backend):
    b, h, hkv, t, dh = 2, 8, 2, 384, 64
    g = torch.Generator(device="cuda").manual_seed(2)
    q, q_other = (torch.randn(b, h, t, dh, device="cuda", generator=g) for _ in range(2))
    k, k_other, v = (torch.randn(b, hkv, t, dh, device="cuda", generator=g) for _ in range(3))
    dz = torch.randn(b, t, h, dh, device="cuda", generator=g)
    i = torch.arange(t, device="cuda")
    bias = torch.zeros(t, t, device="cuda").masked_fill(i[None] > i[:, None], float("-inf"))
    ref = qk_fix_ref(q, k, v, dz, bias, dh**-0.5, None, q_other, k_other)
    low_in = [x.to(BF16) for x in (q, k, v, dz)]
    got = ops.qk_fix(*low_in, bias, dh**-0.5, None, q_other.to(BF16), k_other.to(BF16))
    low = qk_fix_ref(*low_in, bias, dh**-0.5, None, q_other.to(BF16), k_other.to(BF16))
    for name in ref:  # the bf16 rounding of the inputs dominates both; fp32 math after it
        assert_close(got[name], ref[name], 1e-4, low=low[name])
