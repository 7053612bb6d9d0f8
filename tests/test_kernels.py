"""Triton kernels (run by Triton's CPU interpreter here) against their pure-PyTorch references:
forward and backward, fp32 and fp16, odd sizes, non-contiguous inputs, stride-0 gradients,
broadcast parameters, several programs per launch; outputs come from a NaN-filled ``torch.empty``,
so anything a kernel forgets to write fails. Also: the custom-op registrations (opcheck,
``torch.compile``), the backend choice, and a whole scan through the Triton path."""

import pytest
import torch

import causalscan
from causalscan import zoo
from causalscan.bindings import launch, ops
from causalscan.kernels.attribute import attribute_ref
from causalscan.kernels.perturb import perturb_ref
from causalscan.kernels.qk_fix import qk_fix_ref

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("CAUSALSCAN_BACKEND", "triton")


@pytest.fixture
def nan_empty(monkeypatch):
    """``torch.empty`` (as the launchers call it) returns NaN, or -7 for integers."""
    real = torch.empty

    def empty(*args, **kw):
        t = real(*args, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles small enough that every launch runs several programs and every loop several steps."""
    monkeypatch.setitem(launch.TILE, "interpreter", 64)
    monkeypatch.setitem(launch.TILE, "qk", 16)
    monkeypatch.setitem(launch.TILE, "programs_interpreter", 8)  # sums over positions split into chunks


def assert_as_good(got, ref, low=None, rtol=2e-5):
    """``got`` is within ``rtol`` of the fp32 ``ref`` (relative to its largest entry), or, when ``low``
    (torch at ``got``'s dtype) is given, at most twice as far from ``ref`` as ``low`` is, plus that."""
    got, ref = got.float(), ref.float()
    assert not got.isnan().any()
    scale = ref.abs().max().clamp_min(1.0)
    err = (got - ref).abs().max()
    allowed = rtol * scale + (0.0 if low is None else 2 * (low.float() - ref).abs().max())
    assert err <= allowed, f"error {err:.3g} > {allowed:.3g}"


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every second element of a wider buffer, dims 1, 2 swapped)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    out = wide.transpose(1, 2).contiguous().transpose(1, 2)[..., ::2] if t.dim() == 4 else wide[..., ::2]
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


# ---- perturb -------------------------------------------------------------------------------------

OP_CASES = [("patch", "source"), ("add", "vector alpha"), ("add", "vector"), ("zero", ""), ("scale", "alpha"),
            ("scale", "alpha direction"), ("project_out", "direction"), ("clamp", "alpha"),
            ("clamp", "alpha direction")]
SHAPES = [(2, 5, 3, 7), (3, 1, 1, 33), (1, 4, 37, 1)]


def _perturb_inputs(shape, params, dtype, broadcast, seed=0):
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


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-C{}-D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,params", OP_CASES, ids=lambda v: v.replace(" ", "+") or "-")
def test_perturb_forward(triton_backend, nan_empty, small_tiles, op, params, dtype, shape):
    for broadcast, layout in ((False, "contiguous"), (True, "strided")):
        x, mask, kw = _perturb_inputs(shape, params, DTYPES[dtype], broadcast)
        if layout == "strided" and shape[1] > 1 and shape[2] > 1:
            x = strided(x)
        got = ops.perturb(x, op, mask, **kw)
        assert got.dtype == x.dtype and got.shape == x.shape
        ref = perturb_ref(x.float(), op, mask, **{k: v.float() for k, v in kw.items()})
        low = perturb_ref(x, op, mask, **kw) if dtype == "fp16" else None
        assert_as_good(got, ref, low, rtol=2e-6 if dtype == "fp32" else 1e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,params", OP_CASES, ids=lambda v: v.replace(" ", "+") or "-")
def test_perturb_backward(monkeypatch, nan_empty, small_tiles, op, params, backend):
    """Gradients in ``x`` and every parameter against autograd through the reference, for a dense
    non-contiguous output gradient and for the stride-0 gradient of ``y.sum()``; broadcast parameters too."""
    monkeypatch.setenv("CAUSALSCAN_BACKEND", backend)
    for broadcast in (False, True):
        x, mask, kw = _perturb_inputs((2, 5, 3, 7), params, torch.float32, broadcast, seed=1)
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
                assert_as_good(mine[n].grad, theirs[n].grad, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturb_backward_low_precision(triton_backend, nan_empty, dtype):
    x, mask, kw = _perturb_inputs((2, 3, 4, 9), "alpha direction", DTYPES[dtype], False, seed=2)
    x = x.requires_grad_()
    g = torch.randn(x.shape).to(x.dtype)
    ops.perturb(x, "scale", mask, **kw).backward(g)
    x32 = x.detach().float().requires_grad_()
    perturb_ref(x32, "scale", mask, **{k: v.float() for k, v in kw.items()}).backward(g.float())
    assert x.grad.dtype == x.dtype
    assert_as_good(x.grad, x32.grad, rtol=2e-6 if dtype == "fp32" else 2e-3)


def test_perturb_errors():
    x, mask = torch.zeros(1, 2, 1, 3), torch.ones(1, 2, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs source"):
        ops.perturb(x, "patch", mask)
    with pytest.raises(ValueError, match="needs alpha"):
        ops.perturb(x, "scale", mask)
    with pytest.raises(ValueError, match="unknown perturb op"):
        ops.perturb(x, "rotate", mask)


# ---- attribute -----------------------------------------------------------------------------------

ATTR_SHAPES = [(2, 5, 3, 7), (3, 9, 1, 33), (2, 4, 37, 1), (1, 3, 2, 300)]


@pytest.mark.parametrize("shape", ATTR_SHAPES, ids=lambda s: "B{}-T{}-C{}-D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("by_pos", [True, False], ids=["by_pos", "all_pos"])
def test_attribute(triton_backend, nan_empty, small_tiles, shape, dtype, by_pos):
    g = torch.Generator().manual_seed(3)
    base, other, grad = (torch.randn(shape, generator=g).to(DTYPES[dtype]) for _ in range(3))
    rtol = 2e-6 if dtype == "fp32" else 1e-3
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
            assert_as_good(ops.attribute(b_, o_, g_, by_pos, abs=abs_), ref,
                           None if low is None else (low.abs() if abs_ else low), rtol)
        # accumulate into a strided slice, as a scan accumulates a layer of [P, L, ...]
        buf = torch.randn(shape[0], 3, *((shape[1], shape[2]) if by_pos else (shape[2],)), generator=g)
        want = buf[:, 1] + attribute_ref(*f32, by_pos, abs=True)
        got = ops.attribute(b_, o_, g_, by_pos, abs=True, out=buf[:, 1])
        assert got.data_ptr() == buf[:, 1].data_ptr()
        assert_as_good(buf[:, 1], want, rtol=max(rtol, 1e-6))


def test_attribute_errors():
    x = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="share"):
        ops.attribute(None, x, x[..., :2])
    with pytest.raises(ValueError, match="out must be fp32"):
        ops.attribute(None, x, x, by_pos=False, out=torch.zeros(1, 2, 3))


# ---- qk_fix --------------------------------------------------------------------------------------

def _causal(t, window=None):
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    ok = (j <= i) & ((j > i - window) if window else True)
    return torch.zeros(t, t).masked_fill(~ok, float("-inf"))


QK_CASES = {  # B, H, Hkv, T, Dh, softcap, window, per-batch bias
    "B2-H4-Hkv2-T13-Dh8": (2, 4, 2, 13, 8, None, None, False),
    "B1-H2-Hkv2-T37-Dh5-softcap": (1, 2, 2, 37, 5, 20.0, None, False),
    "B2-H3-Hkv1-T21-Dh16-window": (2, 3, 1, 21, 16, None, 6, True),
}


def _qk_inputs(b, h, hkv, t, dh, window, per_batch, dtype, seed=4):
    g = torch.Generator().manual_seed(seed)
    # q and k come transposed out of [B, T, H, Dh], as HF models make them
    q = torch.randn(b, t, h, dh, generator=g).transpose(1, 2)
    k = torch.randn(b, t, hkv, dh, generator=g).transpose(1, 2)
    v = torch.randn(b, hkv, t, dh, generator=g)
    dz = torch.randn(b, t, h, dh, generator=g)
    q_other = q + torch.randn(q.shape, generator=g)
    k_other = (k + torch.randn(k.shape, generator=g)).contiguous()
    bias = _causal(t, window)
    if per_batch:  # [B, 1, T, T]: the second row also masks its first key
        bias = bias.expand(b, 1, t, t).clone()
        bias[1, :, 1:, 0] = float("-inf")
    return [x.to(dtype) for x in (q, k, v, dz)], bias, q_other.to(dtype), k_other.to(dtype)


@pytest.mark.parametrize("case", QK_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("patch", ["q+k", "q", "k"])
def test_qk_fix(triton_backend, nan_empty, small_tiles, case, dtype, patch):
    b, h, hkv, t, dh, softcap, window, per_batch = QK_CASES[case]
    (q, k, v, dz), bias, q_other, k_other = _qk_inputs(b, h, hkv, t, dh, window, per_batch, DTYPES[dtype])
    kw = dict(q_other=q_other if "q" in patch else None, k_other=k_other if "k" in patch else None)
    got = ops.qk_fix(q, k, v, dz, bias, 0.35, softcap, **kw)
    ref = qk_fix_ref(q, k, v, dz, bias, 0.35, softcap, **kw)  # fp32 math on the same inputs
    assert set(got) == set(ref) == ({"q"} if patch == "q" else {"k", "k_all"} | ({"q"} if "q" in patch else set()))
    for name in ref:
        assert got[name].shape == ref[name].shape
        assert_as_good(got[name], ref[name], rtol=2e-5)


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
    bias = _causal(t)
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
    assert_as_good(got, brute, rtol=1e-4)
    assert_as_good(got, ref, rtol=1e-5)


# ---- custom ops, backend choice ------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_ops_pass_opcheck(monkeypatch, backend):
    monkeypatch.setenv("CAUSALSCAN_BACKEND", backend)
    x, mask, kw = _perturb_inputs((2, 3, 2, 5), "alpha direction", torch.float32, False)
    x.requires_grad_()
    torch.library.opcheck(torch.ops.causalscan.perturb.default, (x, "scale", mask, None, None, kw["alpha"],
                                                                 kw["direction"]))
    o, gr = torch.randn(2, 3, 2, 5), torch.randn(2, 3, 2, 5)
    torch.library.opcheck(torch.ops.causalscan.attribute.default, (None, o, gr, False, True))
    torch.library.opcheck(torch.ops.causalscan.attribute_.default, (torch.zeros(2, 3, 2), o, o, gr, True, False))
    (q, k, v, dz), bias, q_other, k_other = _qk_inputs(1, 2, 1, 5, 4, None, False, torch.float32)
    torch.library.opcheck(torch.ops.causalscan.qk_fix.default, (q, k, v, dz, bias, 0.5, None, q_other, k_other))


def test_ops_compile_fullgraph(triton_backend):
    """``torch.compile`` traces through the ops by their fake-tensor rules, forward and backward."""
    x, mask, kw = _perturb_inputs((2, 3, 2, 5), "vector alpha", torch.float32, False)

    def f(x, vec):
        y = ops.perturb(x, "add", mask, vector=vec, alpha=kw["alpha"])
        return (y * y).sum() + ops.attribute(None, y.detach(), y.detach(), by_pos=False).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [x.clone().requires_grad_(), kw["vector"].clone().requires_grad_()]
    ref_args = [x.clone().requires_grad_(), kw["vector"].clone().requires_grad_()]
    compiled(*args).backward()
    f(*ref_args).backward()
    for a, r in zip(args, ref_args, strict=True):
        torch.testing.assert_close(a.grad, r.grad)


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
    res = subprocess.run([sys.executable, str(script), "--arch", "90"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert res.stdout.count("ok   sm_90") == 16, res.stdout


# ---- the whole scan ------------------------------------------------------------------------------

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
    kw = dict(sites=["head", "q:pos", "k", "neuron", "resid_pre:pos"], method="atp*", confirm=3, confirm_random=2)
    tol = dict(rtol=1e-4, atol=1e-6) if device == "cpu" else dict(rtol=1e-3, atol=1e-5)  # GPU: reduction order
    ds = zoo.dataset_path("induction", "previous")
    res = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("CAUSALSCAN_BACKEND", backend)
        res[backend] = causalscan.scan(model, ds, **kw)
        assert (backend == "torch") == (not calls)
    assert set(calls) == {"perturb_fwd", "attribute_fwd", "qk_fix_fwd"}
    a, b = res["torch"], res["triton"]
    for name in ("signed", "graddrop", "score"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), **tol)
    assert torch.equal(a.confirmed, b.confirmed)
    torch.testing.assert_close(b.exact, a.exact, **tol)
