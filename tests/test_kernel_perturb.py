"""The perturb kernel (Triton's interpreter here, compiled on a GPU) against its pure-PyTorch reference:
every op, forward and backward, fp32 and fp16 (bf16 on a GPU), odd sizes, strided inputs, broadcast
parameters, stride-0 gradients, NaN-filled outputs, several programs per launch."""

import pytest
import torch

from causalscan.bindings import ops
from causalscan.kernels.perturb import perturb_ref

from kernel_inputs import BF16, DTYPES, GPU_SHAPES, OP_CASES, SHAPES, perturb_inputs, strided
from tolerance import FP32, assert_close


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-C{}-D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,params", OP_CASES, ids=lambda v: v.replace(" ", "+") or "-")
def test_perturb_forward(triton_backend, nan_empty, small_tiles, op, params, dtype, shape):
    for broadcast, layout in ((False, "contiguous"), (True, "strided")):
        x, mask, kw = perturb_inputs(shape, params, DTYPES[dtype], broadcast)
        if layout == "strided" and shape[1] > 1 and shape[2] > 1:
            x = strided(x)
        got = ops.perturb(x, op, mask, **kw)
        assert got.dtype == x.dtype and got.shape == x.shape
        ref = perturb_ref(x.float(), op, mask, **{k: v.float() for k, v in kw.items()})
        low = perturb_ref(x, op, mask, **kw) if dtype == "fp16" else None
        assert_close(got, ref, FP32 if dtype == "fp32" else 1e-3, low=low)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,params", OP_CASES, ids=lambda v: v.replace(" ", "+") or "-")
def test_perturb_backward(monkeypatch, nan_empty, small_tiles, op, params, backend):
    """Gradients in ``x`` and every parameter against autograd through the reference, for a dense
    non-contiguous output gradient and for the stride-0 gradient of ``y.sum()``; broadcast parameters too."""
    monkeypatch.setenv("CAUSALSCAN_BACKEND", backend)
    for broadcast in (False, True):
        x, mask, kw = perturb_inputs((2, 5, 3, 7), params, torch.float32, broadcast, seed=1)
        w = strided(torch.randn(x.shape))
        for reduce in (lambda y, w=w: (y * w).sum(), lambda y: y.sum()):
            leaves = {"x": x, **kw}
            mine = {n: v.clone().requires_grad_() for n, v in leaves.items()}
            theirs = {n: v.clone().requires_grad_() for n, v in leaves.items()}
            p_m = {n: v for n, v in mine.items() if n != "x"}
            p_t = {n: v for n, v in theirs.items() if n != "x"}
            reduce(ops.perturb(mine["x"], op, mask, **p_m)).backward()
            reduce(perturb_ref(theirs["x"], op, mask, **p_t)).backward()
            for n in leaves:
                assert_close(mine[n].grad, theirs[n].grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturb_backward_low_precision(triton_backend, nan_empty, dtype):
    x, mask, kw = perturb_inputs((2, 3, 4, 9), "alpha direction", DTYPES[dtype], False, seed=2)
    x = x.requires_grad_()
    g = torch.randn(x.shape).to(x.dtype)
    ops.perturb(x, "scale", mask, **kw).backward(g)
    x32 = x.detach().float().requires_grad_()
    perturb_ref(x32, "scale", mask, **{k: v.float() for k, v in kw.items()}).backward(g.float())
    assert x.grad.dtype == x.dtype
    assert_close(x.grad, x32.grad, FP32 if dtype == "fp32" else 2e-3)


def test_perturb_errors():
    x, mask = torch.zeros(1, 2, 1, 3), torch.ones(1, 2, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs source"):
        ops.perturb(x, "patch", mask)
    with pytest.raises(ValueError, match="needs alpha"):
        ops.perturb(x, "scale", mask)
    with pytest.raises(ValueError, match="unknown perturb op"):
        ops.perturb(x, "rotate", mask)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("op", ["patch", "add", "zero", "scale", "scale_dir", "project_out", "clamp_dir"])
def test_perturb_bf16(triton_backend, shape, op):
    b, t, c, d = GPU_SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, t, c, d, device="cuda", generator=g)
    mask = torch.rand(b, t, c, device="cuda", generator=g) < 0.5
    kw = {
        "patch": dict(source=torch.randn_like(x)),
        "add": dict(vector=torch.randn(b, c, d, device="cuda"), alpha=torch.randn(b, device="cuda")),
    }.get(op, {})
    name = op.removesuffix("_dir")
    if op in ("scale", "scale_dir", "clamp_dir"):
        kw["alpha"] = torch.randn(b, device="cuda")
    if op.endswith("_dir") or op == "project_out":
        kw["direction"] = torch.nn.functional.normalize(torch.randn(b, c, d, device="cuda"), dim=-1)
    ref = perturb_ref(x, name, mask, **kw)
    low_kw = {k: v.to(BF16) for k, v in kw.items()}
    assert_close(
        ops.perturb(x.to(BF16), name, mask, **low_kw), ref, 1e-6, low=perturb_ref(x.to(BF16), name, mask, **low_kw)
    )
    # the x-gradient, from a bf16 output gradient
    gy = torch.randn_like(x)
    xb = x.to(BF16).requires_grad_()
    ops.perturb(xb, name, mask, **low_kw).backward(gy.to(BF16))
    x32 = x.clone().requires_grad_()
    perturb_ref(x32, name, mask, **kw).backward(gy)
    xl = x.to(BF16).requires_grad_()
    perturb_ref(xl, name, mask, **low_kw).backward(gy.to(BF16))
    assert_close(xb.grad, x32.grad, 1e-6, low=xl.grad)
