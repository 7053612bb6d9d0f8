"""The custom-op registrations (opcheck, ``torch.compile``), the backend choice, the ahead-of-time
compile of every kernel for an H100, and a whole AtP* scan through the Triton path against the reference."""

from functools import partial

import pytest
import torch

import causalscan
from causalscan import zoo
from causalscan.bindings import launch, ops

from kernel_inputs import perturb_inputs, qk_inputs
from tolerance import FP32, assert_close

estimated = partial(causalscan.scan, exact_budget=0)  # scans that estimate every sweep


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_ops_pass_opcheck(monkeypatch, backend):
    monkeypatch.setenv("CAUSALSCAN_BACKEND", backend)
    x, mask, kw = perturb_inputs((2, 3, 2, 5), "alpha direction", torch.float32, False)
    x.requires_grad_()
    torch.library.opcheck(
        torch.ops.causalscan.perturb.default, (x, "scale", mask, None, None, kw["alpha"], kw["direction"])
    )
    o, gr = torch.randn(2, 3, 2, 5), torch.randn(2, 3, 2, 5)
    torch.library.opcheck(torch.ops.causalscan.attribute.default, (None, o, gr, False, True))
    torch.library.opcheck(torch.ops.causalscan.attribute_.default, (torch.zeros(2, 3, 2), o, o, gr, True, False))
    (q, k, v, dz), bias, q_other, k_other = qk_inputs(1, 2, 1, 5, 4, None, False, torch.float32)
    torch.library.opcheck(torch.ops.causalscan.qk_fix.default, (q, k, v, dz, bias, 0.5, None, q_other, k_other))


def test_ops_compile_fullgraph(triton_backend):
    """``torch.compile`` traces through the ops by their fake-tensor rules, forward and backward."""
    x, mask, kw = perturb_inputs((2, 3, 2, 5), "vector alpha", torch.float32, False)

    def f(x, vec):
        y = ops.perturb(x, "add", mask, vector=vec, alpha=kw["alpha"])
        return (y * y).sum() + ops.attribute(None, y.detach(), y.detach(), by_pos=False).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [x.clone().requires_grad_(), kw["vector"].clone().requires_grad_()]
    ref_args = [x.clone().requires_grad_(), kw["vector"].clone().requires_grad_()]
    compiled(*args).backward()
    f(*ref_args).backward()
    for a, r in zip(args, ref_args, strict=True):
        assert_close(a.grad, r.grad)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("CAUSALSCAN_BACKEND", raising=False)
    assert ops.backend("cpu") == "triton"  # this process runs the interpreter
    monkeypatch.setenv("CAUSALSCAN_BACKEND", "torch")
    assert ops.backend("cpu") == "torch"
    monkeypatch.setenv("CAUSALSCAN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="CAUSALSCAN_BACKEND"):
        ops.backend("cpu")
    monkeypatch.setattr(launch, "interpreting", lambda: False)  # a CPU process without the interpreter
    monkeypatch.delenv("CAUSALSCAN_BACKEND")
    assert ops.backend("cpu") == "torch"
    assert ops.backend("cuda") == "triton"
    monkeypatch.setenv("CAUSALSCAN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.backend("cpu")


def test_kernels_compile_for_an_h100():
    """Every kernel, in the specializations a GPU launch uses (bf16, fp16, fp32 dots, softcap, all
    perturb ops), compiles down to an sm_90 cubin: the GPU compiler rejects programs the
    interpreter runs. Needs Triton's NVIDIA backend (its ptxas ships in the wheel), not a GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if "nvidia" not in __import__("triton").backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parent / "aot_compile.py"
    res = subprocess.run(
        [sys.executable, str(script), "--arch", "90"], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert res.stdout.count("ok   sm_90") == 16, res.stdout


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_scan_through_triton_equals_reference(monkeypatch, device):
    """AtP* with the QK fix and GradDrop, then confirmation by exact patching, on the induction
    model: the Triton path (every kernel launched, counted) gives the reference path's numbers
    (interpreted on the CPU, compiled on a GPU)."""
    calls = {}
    for name in ("perturb_fwd", "attribute_fwd", "qk_fix_fwd"):
        real = getattr(launch, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **kw)

        monkeypatch.setattr(launch, name, counted)
    model = causalscan.load("induction", device=device)
    kw = dict(
        sites=["head", "q:pos", "k", "neuron", "resid_pre:pos"],
        method="atp*",
        graddrop=True,
        confirm=3,
        confirm_random=2,
    )
    rtol = FP32 if device == "cpu" else 1e-3  # GPU: tf32-free but another reduction order
    ds = zoo.dataset_path("induction", "previous")
    res = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("CAUSALSCAN_BACKEND", backend)
        res[backend] = estimated(model, ds, **kw)
        assert (backend == "torch") == (not calls)
    assert set(calls) == {"perturb_fwd", "attribute_fwd", "qk_fix_fwd"}
    a, b = res["torch"], res["triton"]
    for name in ("signed", "graddrop", "score"):
        # against the scan's magnitude: q nodes (~1e-3 here) are sums of terms of the size of the rest
        assert_close(getattr(b, name), getattr(a, name), rtol, msg=name)
    # the pooled sample (top 3 + 2 random) is the same; a sweep's own top may differ where its scores
    # tie to the last bit (q nodes ~0): compare the exact effects of every node both confirmed
    assert torch.equal(a.confirmed[:5], b.confirmed[:5])
    col_b = {j: c for c, j in enumerate(b.confirmed.tolist())}
    both = [(c, col_b[j]) for c, j in enumerate(a.confirmed.tolist()) if j in col_b]
    assert len(both) >= 5
    assert_close(b.exact[:, [c for _, c in both]], a.exact[:, [c for c, _ in both]], rtol)
