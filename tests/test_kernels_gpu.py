"""The Triton kernels compiled for a GPU (skipped without CUDA), at scan-sized shapes.

bf16 is the dtype that matters there and the interpreter cannot run it. A kernel may be at most
twice as wrong as PyTorch at the same dtype, both measured against an fp32 reference. (The whole
scan on CUDA is the ``cuda`` case of ``test_kernels.py::test_scan_through_triton_equals_reference``.)"""

import pytest
import torch

from causalscan.bindings import ops
from causalscan.kernels.attribute import attribute_ref
from causalscan.kernels.perturb import perturb_ref
from causalscan.kernels.qk_fix import qk_fix_ref

from tolerance import assert_close

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("CAUSALSCAN_BACKEND", "triton")


SHAPES = {"heads": (4, 256, 32, 64), "resid": (4, 256, 1, 2048), "neurons": (4, 256, 8192, 1)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", ["patch", "add", "zero", "scale", "scale_dir", "project_out", "clamp_dir"])
def test_perturb_bf16(shape, op):
    b, t, c, d = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, t, c, d, device="cuda", generator=g)
    mask = torch.rand(b, t, c, device="cuda", generator=g) < 0.5
    kw = {"patch": dict(source=torch.randn_like(x)), "add": dict(vector=torch.randn(b, c, d, device="cuda"),
                                                                 alpha=torch.randn(b, device="cuda"))}.get(op, {})
    name = op.removesuffix("_dir")
    if op in ("scale", "scale_dir", "clamp_dir"):
        kw["alpha"] = torch.randn(b, device="cuda")
    if op.endswith("_dir") or op == "project_out":
        kw["direction"] = torch.nn.functional.normalize(torch.randn(b, c, d, device="cuda"), dim=-1)
    ref = perturb_ref(x, name, mask, **kw)
    low_kw = {k: v.to(BF16) for k, v in kw.items()}
    assert_close(ops.perturb(x.to(BF16), name, mask, **low_kw), ref, 1e-6,
                 low=perturb_ref(x.to(BF16), name, mask, **low_kw))
    # the x-gradient, from a bf16 output gradient
    gy = torch.randn_like(x)
    xb = x.to(BF16).requires_grad_()
    ops.perturb(xb, name, mask, **low_kw).backward(gy.to(BF16))
    x32 = x.clone().requires_grad_()
    perturb_ref(x32, name, mask, **kw).backward(gy)
    xl = x.to(BF16).requires_grad_()
    perturb_ref(xl, name, mask, **low_kw).backward(gy.to(BF16))
    assert_close(xb.grad, x32.grad, 1e-6, low=xl.grad)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("by_pos", [True, False])
def test_attribute_bf16(shape, by_pos):
    g = torch.Generator(device="cuda").manual_seed(1)
    delta, grad = (torch.randn(SHAPES[shape], device="cuda", generator=g) for _ in range(2))
    ref = attribute_ref(None, delta, grad, by_pos)
    low = ((delta.to(BF16) * grad.to(BF16)).sum(-1)).float()  # torch in bf16, as a TL-style cache would
    low = low if by_pos else low.sum(1)
    assert_close(ops.attribute(None, delta.to(BF16), grad.to(BF16), by_pos), ref, 1e-5, low=low)


def test_qk_fix_bf16():
    b, h, hkv, t, dh = 2, 8, 2, 384, 64
    g = torch.Generator(device="cuda").manual_seed(2)
    q, q_other = (torch.randn(b, h, t, dh, device="cuda", generator=g) for _ in range(2))
    k, k_other, v = (torch.randn(b, hkv, t, dh, device="cuda", generator=g) for _ in range(3))
    dz = torch.randn(b, t, h, dh, device="cuda", generator=g)
    i = torch.arange(t, device="cuda")
    bias = torch.zeros(t, t, device="cuda").masked_fill(i[None] > i[:, None], float("-inf"))
    ref = qk_fix_ref(q, k, v, dz, bias, dh ** -0.5, None, q_other, k_other)
    low_in = [x.to(BF16) for x in (q, k, v, dz)]
    got = ops.qk_fix(*low_in, bias, dh ** -0.5, None, q_other.to(BF16), k_other.to(BF16))
    low = qk_fix_ref(*low_in, bias, dh ** -0.5, None, q_other.to(BF16), k_other.to(BF16))
    for name in ref:  # the bf16 rounding of the inputs dominates both; fp32 math after it
        assert_close(got[name], ref[name], 1e-4, low=low[name])
