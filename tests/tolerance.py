"""Tolerances that scale with what is compared.

An absolute tolerance near fp32 epsilon passes on one CPU and fails on the next: another BLAS path
(AVX-512, AMX, a different thread count) sums in another order, and an element where large terms
cancel moves by a few ulps *of the terms*, not of itself. So every comparison here is relative to
the largest entry of the reference (or of an explicit ``scale``: the magnitude of the terms that
cancel), and at low precision at most twice torch's own error against an fp32 reference.
"""

from __future__ import annotations

import torch

FP32 = 1e-5  # relative to the largest entry: ~100 ulps, room for any summation order


def assert_close(got, ref, rtol: float = FP32, *, low=None, scale=None, msg: str = "") -> None:
    """``max |got - ref| <= rtol * scale (+ 2 max |low - ref|)``.

    ``scale``: the magnitude the error is measured against (default ``max |ref|``; give the size of
    the terms when ``ref`` is ~0 by cancellation). ``low``: torch's own result at ``got``'s low
    precision; the kernel may then be at most twice as far from the fp32 ``ref`` as torch is.
    """
    got = torch.as_tensor(got).detach().float()
    ref = torch.as_tensor(ref).detach().float().to(got.device)
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != {tuple(ref.shape)} {msg}"
    assert not got.isnan().any() or torch.equal(got.isnan(), ref.isnan()), f"NaN where the reference has none {msg}"
    live = ~ref.isnan()
    s = ref[live].abs().max() if scale is None else torch.as_tensor(float(scale))
    allowed = rtol * float(s) + (0.0 if low is None else 2 * (low.detach().float() - ref).abs().max().item())
    err = (got[live] - ref[live]).abs().max().item() if live.any() else 0.0
    assert err <= allowed, f"max error {err:.3g} > {allowed:.3g} (rtol {rtol:g} x scale {float(s):.3g}) {msg}"


def assert_identical(a: dict, b: dict) -> None:
    """Two result dicts of tensors equal bit for bit (NaN where NaN): runs that must add the same
    numbers in the same order (Ray actors against one process, a split model against the whole)."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)
