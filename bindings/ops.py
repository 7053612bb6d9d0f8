"""The one entry point per op that the engine calls: torch custom ops with a backend choice.

Each op is registered with ``torch.library`` (``causalscan::perturb``, ``causalscan::attribute``,
``causalscan::attribute_`` (accumulating into ``out``), ``causalscan::qk_fix``) with a fake-tensor
rule, so ``torch.compile`` and other tools can call it; ``perturb`` has an autograd formula.
The backend is chosen per call: Triton on CUDA tensors or under Triton's interpreter
(``TRITON_INTERPRET=1`` set before import), the pure-PyTorch reference otherwise;
``CAUSALSCAN_BACKEND=torch|triton`` overrides.
"""

from __future__ import annotations

import os

import torch

from causalscan.bindings import launch
from causalscan.kernels.attribute import attribute_ref, check_attribute
from causalscan.kernels.perturb import OPS, perturb_ref
from causalscan.kernels.qk_fix import qk_fix_ref

__all__ = ["BACKENDS", "OPS", "attribute", "backend", "perturb", "qk_fix"]

BACKENDS = ("torch", "triton")
Tensor = torch.Tensor


def backend(device: torch.device | str) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device`` (see the module docstring)."""
    env = os.environ.get("CAUSALSCAN_BACKEND", "")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"CAUSALSCAN_BACKEND must be one of {', '.join(BACKENDS)}, not {env!r}")
        if env == "triton" and torch.device(device).type != "cuda" and not launch.interpreting():
            raise RuntimeError(
                "CAUSALSCAN_BACKEND=triton needs CUDA tensors, or TRITON_INTERPRET=1 set before causalscan is imported"
            )
        return env
    return "triton" if torch.device(device).type == "cuda" or launch.interpreting() else "torch"


# ---- perturb -------------------------------------------------------------------------------------

_NEEDS = {
    "patch": ("source",),
    "add": ("vector",),
    "zero": (),
    "scale": ("alpha",),
    "project_out": ("direction",),
    "clamp": ("alpha",),
}


def perturb(
    x: Tensor,
    op: str,
    mask: Tensor,
    source: Tensor | None = None,
    vector: Tensor | None = None,
    alpha: Tensor | None = None,
    direction: Tensor | None = None,
) -> Tensor:
    """Apply intervention ``op`` to ``x`` [B, T, C, D] where ``mask`` [B|1, T, C] is set; a new tensor.

    ``source`` broadcastable to [B, T, C, D]; ``vector``, ``direction`` [B|1, C, D]; ``alpha``
    [B|1]. Differentiable in ``x`` and every parameter. See :mod:`causalscan.kernels.perturb`.
    """
    if op not in OPS:
        raise ValueError(f"unknown perturb op {op!r}; expected one of {', '.join(OPS)}")
    if x.dim() != 4 or mask.dim() != 3:
        raise ValueError(f"x must be [B, T, C, D] and mask [B, T, C], got {tuple(x.shape)} and {tuple(mask.shape)}")
    given = {"source": source, "vector": vector, "alpha": alpha, "direction": direction}
    missing = [n for n in _NEEDS[op] if given[n] is None]
    if missing:
        raise ValueError(f"perturb op {op!r} needs {', '.join(missing)}")
    return torch.ops.causalscan.perturb(x, op, mask, source, vector, alpha, direction)


@torch.library.custom_op("causalscan::perturb", mutates_args=())
def _perturb_op(
    x: Tensor,
    op: str,
    mask: Tensor,
    source: Tensor | None,
    vector: Tensor | None,
    alpha: Tensor | None,
    direction: Tensor | None,
) -> Tensor:
    if backend(x.device) == "triton":
        return launch.perturb_fwd(x, op, mask, source, vector, alpha, direction)
    return perturb_ref(x, op, mask, source, vector, alpha, direction).contiguous()


@_perturb_op.register_fake
def _(x, op, mask, source, vector, alpha, direction):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _perturb_setup(ctx, inputs, output):
    x, op, mask, source, vector, alpha, direction = inputs
    ctx.op = op
    ctx.source_shape = None if source is None else source.shape
    ctx.source_dtype = None if source is None else source.dtype
    need_x = any(p is not None and p.requires_grad for p in (alpha, direction))
    ctx.save_for_backward(x if need_x else None, mask, vector, alpha, direction)
    ctx.x_shape = x.shape


def _perturb_backward(ctx, gy):
    x, mask, vector, alpha, direction = ctx.saved_tensors
    op, needs = ctx.op, ctx.needs_input_grad
    gx = gsrc = gvec = ga = gu = None
    if needs[0]:  # d x' / d x is symmetric: the same op's linear part applied to gy
        lin = {
            "patch": "zero",
            "zero": "zero",
            "add": None,
            "scale": "scale",
            "project_out": "project_out",
            "clamp": "zero" if direction is None else "project_out",
        }[op]
        gx = (
            gy
            if lin is None
            else torch.ops.causalscan.perturb(gy, lin, mask, None, None, alpha if lin == "scale" else None, direction)
        )
    if not any(needs[3:]):
        return gx, None, None, gsrc, gvec, ga, gu
    b, t, c, d = ctx.x_shape
    m = mask.expand(b, t, c).to(torch.float32)[..., None]  # [B, T, C, 1]
    g = gy.float()
    a = 1.0 if alpha is None else alpha.float().reshape(-1, 1, 1, 1)
    if op == "patch" and needs[3]:
        gsrc = (m * g).sum_to_size(ctx.source_shape)
    elif op == "add":
        v = vector.float().unsqueeze(1)  # [B, 1, C, D]
        gvec = (m * a * g).sum(1).sum_to_size(vector.shape).to(vector.dtype) if needs[4] else None
        ga = (m * g * v).sum((1, 2, 3)) if needs[5] else None
    elif direction is None:  # scale / clamp, every element
        ga = (m * g * (x.float() if op == "scale" else 1.0)).sum((1, 2, 3)) if needs[5] else None
    else:
        u = direction.float().unsqueeze(1)
        xf = x.float() if x is not None else None  # saved when alpha or direction needs a gradient
        xu = (xf * u).sum(-1, keepdim=True) if xf is not None else None  # [B, T, C, 1]
        gu_ = (g * u).sum(-1, keepdim=True)
        if needs[6]:
            both = m * (xu * g + gu_ * xf)
            gdir = {
                "project_out": lambda: -both,
                "scale": lambda: (a - 1) * both,
                "clamp": lambda: m * ((a - xu) * g - gu_ * xf),
            }[op]()
            gu = gdir.sum(1).sum_to_size(direction.shape).to(direction.dtype)
        if needs[5] and op != "project_out":
            ga = (m * gu_ * (xu if op == "scale" else 1.0)).sum((1, 2, 3))
    if ga is not None and alpha is not None:
        ga = ga.sum_to_size(alpha.shape).to(alpha.dtype)
    if gsrc is not None:
        gsrc = gsrc.to(ctx.source_dtype)
    return gx, None, None, gsrc, gvec, ga, gu


_perturb_op.register_autograd(_perturb_backward, setup_context=_perturb_setup)


# ---- attribute -----------------------------------------------------------------------------------


def attribute(
    base: Tensor | None, other: Tensor, grad: Tensor, by_pos: bool = True, abs: bool = False, out: Tensor | None = None
) -> Tensor:
    """``sum_D (other - base) * grad`` of ``[B, T, C, D]`` tensors -> ``[B, T, C]`` or ``[B, C]`` (fp32);
    ``base=None``: ``other`` is the difference already; ``abs``: per-row ``|.|`` after the reduction;
    ``out``: accumulate into it (and return it). See :mod:`causalscan.kernels.attribute`.
    """
    check_attribute(base, other, grad, by_pos, out)
    if out is None:
        return torch.ops.causalscan.attribute(base, other, grad, by_pos, abs)
    torch.ops.causalscan.attribute_(out, base, other, grad, by_pos, abs)
    return out


@torch.library.custom_op("causalscan::attribute", mutates_args=())
def _attribute_op(base: Tensor | None, other: Tensor, grad: Tensor, by_pos: bool, abs: bool) -> Tensor:
    if backend(other.device) == "triton":
        return launch.attribute_fwd(base, other, grad, by_pos, abs)
    return attribute_ref(base, other, grad, by_pos, abs)


@_attribute_op.register_fake
def _(base, other, grad, by_pos, abs):
    b, t, c, _ = other.shape
    return other.new_empty((b, t, c) if by_pos else (b, c), dtype=torch.float32)


@torch.library.custom_op("causalscan::attribute_", mutates_args=("out",))
def _attribute_acc_op(out: Tensor, base: Tensor | None, other: Tensor, grad: Tensor, by_pos: bool, abs: bool) -> None:
    if backend(other.device) == "triton":
        launch.attribute_fwd(base, other, grad, by_pos, abs, out=out)
    else:
        attribute_ref(base, other, grad, by_pos, abs, out=out)


@_attribute_acc_op.register_fake
def _(out, base, other, grad, by_pos, abs):
    return None


# ---- qk_fix --------------------------------------------------------------------------------------


def qk_fix(q, k, v, dz, bias, scaling, softcap=None, q_other=None, k_other=None) -> dict[str, Tensor]:
    """Exact-pattern effects of patched queries/keys: ``{"q": [B, T, H]}`` and/or ``{"k": [B, T, Hkv],
    "k_all": [B, Hkv]}`` (fp32) for the patches given. See :mod:`causalscan.kernels.qk_fix`."""
    iq, ik, k_all = torch.ops.causalscan.qk_fix(
        q, k, v, dz, bias, float(scaling), None if softcap is None else float(softcap), q_other, k_other
    )
    out = {}
    if q_other is not None:
        out["q"] = iq
    if k_other is not None:
        out["k"], out["k_all"] = ik, k_all
    return out


@torch.library.custom_op("causalscan::qk_fix", mutates_args=())
def _qk_fix_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dz: Tensor,
    bias: Tensor,
    scaling: float,
    softcap: float | None,
    q_other: Tensor | None,
    k_other: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    if backend(q.device) == "triton":
        return launch.qk_fix_fwd(q, k, v, dz, bias, scaling, softcap, q_other, k_other)
    res = qk_fix_ref(q, k, v, dz, bias, scaling, softcap, q_other, k_other)
    return tuple(
        res[n].contiguous() if n in res else q.new_empty(0, dtype=torch.float32)  # outputs never alias
        for n in ("q", "k", "k_all")
    )


@_qk_fix_op.register_fake
def _(q, k, v, dz, bias, scaling, softcap, q_other, k_other):
    b, h, t, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    f32 = dict(dtype=torch.float32, device=q.device)
    return (
        torch.empty(b, t, h, **f32) if q_other is not None else torch.empty(0, **f32),
        torch.empty(b, tk, hkv, **f32) if k_other is not None else torch.empty(0, **f32),
        torch.empty(b, hkv, **f32) if k_other is not None else torch.empty(0, **f32),
    )
