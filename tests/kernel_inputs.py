"""Inputs shared by the kernel tests: dtypes, non-contiguous layouts, perturb and qk_fix arguments."""

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
BF16 = torch.bfloat16
# scan-sized shapes of the GPU (bf16) cases [B, T, C, D]
GPU_SHAPES = {"heads": (4, 256, 32, 64), "resid": (4, 256, 1, 2048), "neurons": (4, 256, 8192, 1)}


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every second element of a wider buffer, dims 1, 2 swapped)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    out = wide.transpose(1, 2).contiguous().transpose(1, 2)[..., ::2] if t.dim() == 4 else wide[..., ::2]
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


OP_CASES = [
    ("patch", "source"),
    ("add", "vector alpha"),
    ("add", "vector"),
    ("zero", ""),
    ("scale", "alpha"),
    ("scale", "alpha direction"),
    ("project_out", "direction"),
    ("clamp", "alpha"),
    ("clamp", "alpha direction"),
]
SHAPES = [(2, 5, 3, 7), (3, 1, 1, 33), (1, 4, 37, 1)]


def perturb_inputs(shape, params, dtype, broadcast, seed=0):
    b, t, c, d = shape
    g = torch.Generator().manual_seed(seed)
    rb = 1 if broadcast else b  # per-row parameters, or one row for all
    x = torch.randn(shape, generator=g).to(dtype)
    mask = torch.rand(rb, t, c, generator=g) < 0.6
    kw = {}
    if "source" in params:
        kw["source"] = torch.randn(1 if broadcast else b, 1 if broadcast else t, c, d, generator=g).to(dtype)
    if "vector" in params:
        kw["vector"] = torch.randn(rb, c, d, generator=g).to(dtype)
    if "alpha" in params:
        kw["alpha"] = torch.randn(rb, generator=g).to(dtype)
    if "direction" in params:
        kw["direction"] = torch.nn.functional.normalize(torch.randn(rb, c, d, generator=g), dim=-1).to(dtype)
    return x, mask, kw


def causal(t, window=None):
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    ok = (j <= i) & ((j > i - window) if window else True)
    return torch.zeros(t, t).masked_fill(~ok, float("-inf"))


QK_CASES = {  # B, H, Hkv, T, Dh, softcap, window, per-batch bias
    "B2-H4-Hkv2-T13-Dh8": (2, 4, 2, 13, 8, None, None, False),
    "B1-H2-Hkv2-T37-Dh5-softcap": (1, 2, 2, 37, 5, 20.0, None, False),
    "B2-H3-Hkv1-T21-Dh16-window": (2, 3, 1, 21, 16, None, 6, True),
}


def qk_inputs(b, h, hkv, t, dh, window, per_batch, dtype, seed=4):
    g = torch.Generator().manual_seed(seed)
    # q and k come transposed out of [B, T, H, Dh], as HF models make them
    q = torch.randn(b, t, h, dh, generator=g).transpose(1, 2)
    k = torch.randn(b, t, hkv, dh, generator=g).transpose(1, 2)
    v = torch.randn(b, hkv, t, dh, generator=g)
    dz = torch.randn(b, t, h, dh, generator=g)
    q_other = q + torch.randn(q.shape, generator=g)
    k_other = (k + torch.randn(k.shape, generator=g)).contiguous()
    bias = causal(t, window)
    if per_batch:  # [B, 1, T, T]: the second row also masks its first key
        bias = bias.expand(b, 1, t, t).clone()
        bias[1, :, 1:, 0] = float("-inf")
    return [x.to(dtype) for x in (q, k, v, dz)], bias, q_other.to(dtype), k_other.to(dtype)
