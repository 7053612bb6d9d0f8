"""The attribute kernel against its reference: per-position and all-position reductions, from both
activations or the kept difference, abs, accumulation into a strided slice; fp32 and fp16 (bf16 on a GPU)."""

import pytest
import torch

from causalscan.bindings import ops
from causalscan.kernels.attribute import attribute_ref

from kernel_inputs import BF16, DTYPES, GPU_SHAPES, strided
from tolerance import FP32, assert_close

ATTR_SHAPES = [(2, 5, 3, 7), (3, 9, 1, 33), (2, 4, 37, 1), (1, 3, 2, 300)]


@pytest.mark.parametrize("shape", ATTR_SHAPES, ids=lambda s: "B{}-T{}-C{}-D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("by_pos", [True, False], ids=["by_pos", "all_pos"])
def test_attribute(triton_backend, nan_empty, small_tiles, shape, dtype, by_pos):
    g = torch.Generator().manual_seed(3)
    base, other, grad = (torch.randn(shape, generator=g).to(DTYPES[dtype]) for _ in range(3))
    rtol = FP32 if dtype == "fp32" else 1e-3
    for with_base, layout in ((True, "contiguous"), (False, "strided"), (True, "stride-0 grad")):
        b_, o_, g_ = base, other, grad
        if layout == "strided":
            o_, g_ = strided(other), strided(grad)
        if layout == "stride-0 grad":
            g_ = torch.full((1,), 0.5, dtype=grad.dtype).expand(shape)
        b_ = b_ if with_base else None
        f32 = [None if t is None else t.float() for t in (b_, o_, g_)]
        low = attribute_ref(b_, o_, g_, by_pos) if dtype == "fp16" else None
        for abs_ in (False, True):
            ref = attribute_ref(*f32, by_pos, abs=abs_)
            assert_close(
                ops.attribute(b_, o_, g_, by_pos, abs=abs_),
                ref,
                rtol,
                low=None if low is None else (low.abs() if abs_ else low),
            )
        # accumulate into a strided slice, as a scan accumulates a layer of [P, L, ...]
        buf = torch.randn(shape[0], 3, *((shape[1], shape[2]) if by_pos else (shape[2],)), generator=g)
        want = buf[:, 1] + attribute_ref(*f32, by_pos, abs=True)
        got = ops.attribute(b_, o_, g_, by_pos, abs=True, out=buf[:, 1])
        assert got.data_ptr() == buf[:, 1].data_ptr()
        assert_close(buf[:, 1], want, rtol)


def test_attribute_errors():
    x = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="share"):
        ops.attribute(None, x, x[..., :2])
    with pytest.raises(ValueError, match="out must be fp32"):
        ops.attribute(None, x, x, by_pos=False, out=torch.zeros(1, 2, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("by_pos", [True, False])
def test_attribute_bf16(triton_backend, shape, by_pos):
    g = torch.Generator(device="cuda").manual_seed(1)
    delta, grad = (torch.randn(GPU_SHAPES[shape], device="cuda", generator=g) for _ in range(2))
    ref = attribute_ref(None, delta, grad, by_pos)
    low = ((delta.to(BF16) * grad.to(BF16)).sum(-1)).float()  # torch in bf16, as a TL-style cache would
    low = low if by_pos else low.sum(1)
    assert_close(ops.attribute(None, delta.to(BF16), grad.to(BF16), by_pos), ref, 1e-5, low=low)
