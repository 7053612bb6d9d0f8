"""Relevance rules (RelP, AttnLRP's efficient form): a backward mode for one model instance.

Inside :func:`rules` the forward is the model's own, bit for bit, and the backward carries LRP's
propagation coefficients instead of the local gradient, so that ``(a_other - a_base) . grad`` (AtP's
formula, two forwards and one backward) becomes RelP:

- norms (LayerNorm, every RMSNorm, Gemma's extra norms, the final norm; not q/k norms): the scale
  ``1/sigma`` (``rsqrt``) is a constant, centring and the affine weights keep their gradient;
- the MLP activation (identity rule): ``act(x) = x * f(x)`` with ``f(x)`` constant, so the
  coefficient is ``f(x)`` (SiLU: ``sigmoid``; GELU: ``Phi`` or its tanh form; ReLU: ``x > 0``); an
  activation without a rule is refused;
- gated MLPs (half rule): each branch of ``g(x) * u(x)`` gets half the gradient;
- attention, one of :data:`ATTENTION`: ``plain`` (the published default: the ordinary gradient),
  ``attnlrp`` (the gradient into q and k scaled by 1/4, into v by 1/2) or ``cp`` (CP-LRP / the AH
  rule: the pattern held constant, q and k get none);
- linear maps and residual adds: the ordinary gradient.

Norms and activations run their own forward inside an autograd function whose backward recomputes
the rule's form (the published ``detach`` formulas) from the saved input; the half rule and the
attention rules scale or cut gradients with identity functions. With a :class:`Switch`, one graph
serves both: each backward follows the rules while ``switch.on`` and is the plain gradient
otherwise (one forward, a plain and a rules backward). Parameters get no gradient from a rule: use
it with :func:`causalscan.model.taps.frozen`, as attribution does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from causalscan.errors import InputError
from causalscan.model import attention, runner
from causalscan.model.adapters import Adapter

ATTENTION = ("plain", "attnlrp", "cp")
_SQRT_2_PI = math.sqrt(2.0 / math.pi)


def _tanh_gelu_factor(x):
    return 0.5 * (1.0 + torch.tanh(_SQRT_2_PI * (x + 0.044715 * x.pow(3))))


def _phi(x):
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


# act(x) = x * f(x): f by activation class name (transformers.activations and torch.nn)
FACTORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "SiLUActivation": torch.sigmoid,
    "SiLU": torch.sigmoid,
    "GELUActivation": _phi,
    "NewGELUActivation": _tanh_gelu_factor,
    "GELUTanh": _tanh_gelu_factor,
    "FastGELUActivation": _tanh_gelu_factor,
    "QuickGELUActivation": lambda x: torch.sigmoid(1.702 * x),
    "ReLU": lambda x: (x > 0).to(x.dtype),
}


def factor(act: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f`` with ``act(x) = x * f(x)``; an activation without a rule is an error."""
    name = type(act).__name__
    if name == "GELU":  # torch.nn.GELU
        return _tanh_gelu_factor if act.approximate == "tanh" else _phi
    if name not in FACTORS:
        raise InputError(
            f"no relevance rule for the activation {name}: the identity rule knows {', '.join(sorted(FACTORS))}, GELU",
            field="method",
        )
    return FACTORS[name]


def activation_rule(act: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The identity rule's form of ``act``: ``x * f(x).detach()``."""
    f = factor(act)
    return lambda x: x * f(x).detach()


def norm_rule(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm's form with its scale detached (computed in fp32 as the HF norms do, cast back)."""
    name = type(norm).__name__
    if isinstance(norm, nn.LayerNorm):

        def layer_norm(x):
            x32 = x.float()
            centred = x32 - x32.mean(-1, keepdim=True)
            scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps).detach()
            y = centred * scale
            if norm.weight is not None:
                y = y * norm.weight.float()
            if norm.bias is not None:
                y = y + norm.bias.float()
            return y.to(x.dtype)

        return layer_norm
    if name.endswith("RMSNorm"):
        gemma = name.startswith("Gemma")  # (1 + w), applied before the cast back
        eps = norm.eps if gemma else getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None:
            raise InputError(f"no relevance rule for the norm {name}: it has no eps", field="method")

        def rms_norm(x):
            x32 = x.float()
            y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps).detach()
            if gemma:
                return (y * (1.0 + norm.weight.float())).type_as(x)
            return norm.weight * y.to(x.dtype)

        return rms_norm
    raise InputError(f"no relevance rule for the norm {name} (LayerNorm and RMSNorm have one)", field="method")


class Switch:
    """Whether the backward running now follows the rules (``on``) or is the plain gradient."""

    def __init__(self, on: bool = True):
        self.on = on


ALWAYS = Switch()


class _Rule(torch.autograd.Function):
    """``own(x)`` in the forward (the module's own computation, untouched); in the backward the
    vector-Jacobian product of ``rule`` at the saved ``x`` (of ``own`` itself while the switch is off)."""

    @staticmethod
    def forward(ctx, x, own, rule, switch=ALWAYS):
        ctx.own, ctx.rule, ctx.switch = own, rule, switch
        ctx.save_for_backward(x)
        return own(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xr = x.detach().requires_grad_()
            (gx,) = torch.autograd.grad((ctx.rule if ctx.switch.on else ctx.own)(xr), xr, grad)
        return gx, None, None, None


class _Scale(torch.autograd.Function):
    """Identity in the forward; the gradient times ``c`` in the backward while the switch is on."""

    @staticmethod
    def forward(ctx, x, c, switch=ALWAYS):
        ctx.c, ctx.switch = c, switch
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad * ctx.c if ctx.switch.on else grad), None, None


def scale_grad(x: torch.Tensor, c: float, switch: Switch = ALWAYS) -> torch.Tensor:
    """``x``, whose gradient is scaled by ``c`` (while ``switch`` is on)."""
    return _Scale.apply(x, c, switch)


def norms(ad: Adapter) -> list[nn.Module]:
    """Every norm a rule applies to: each block's (not q/k norms) and the final norm."""
    found = [
        m
        for blk in ad.blocks
        for name, m in blk.named_modules()
        if "Norm" in type(m).__name__ and name.rsplit(".", 1)[-1] not in ("q_norm", "k_norm")
    ]
    return [*found, ad.model.get_submodule(ad.family.final_norm)]


def _replace_forward(stack: ExitStack, module: nn.Module, rule, switch: Switch) -> None:
    """``module.forward`` becomes the rule's autograd function around the current forward (which
    may be accelerate's hook); the instance's own attribute comes back on exit."""
    own_attr = module.__dict__.get("forward")
    own = module.forward

    def forward(x, *args, **kwargs):
        if args or kwargs or not torch.is_grad_enabled():
            return own(x, *args, **kwargs)
        return _Rule.apply(x, own, rule, switch)

    module.forward = forward
    stack.callback(runner.restore_forward, module, own_attr)


def _attention_rule(name: str, switch: Switch):
    def attnlrp(inner, layer, module, q, k, v, *args, **kwargs):
        q, k, v = scale_grad(q, 0.25, switch), scale_grad(k, 0.25, switch), scale_grad(v, 0.5, switch)
        return inner(module, q, k, v, *args, **kwargs)

    def cp(inner, layer, module, q, k, v, *args, **kwargs):  # the pattern a constant: no gradient into q, k
        return inner(module, scale_grad(q, 0.0, switch), scale_grad(k, 0.0, switch), v, *args, **kwargs)

    return {"attnlrp": attnlrp, "cp": cp}[name]


def check_attention(name: str) -> None:
    if name not in ATTENTION:
        raise InputError(f"attention rule must be one of {', '.join(ATTENTION)}, not {name!r}", field="relp_attention")


def attention_for(method: str, name: str, methods: tuple[str, ...], default: str = "plain") -> str | None:
    """The attention rule ``method`` runs the rules with (None: a method in none of ``methods``, the
    ones that use them), checked; a rule other than ``default`` given to another method is refused."""
    if method in methods:
        check_attention(name)
        return name
    if name != default:
        raise InputError(f"relp_attention needs method {' or '.join(methods)}, not {method!r}", field="relp_attention")
    return None


@contextmanager
def rules(ad: Adapter, attention_rule: str = "plain", switch: Switch = ALWAYS):
    """The relevance rules on ``ad``'s model for the duration (every rule is checked before any is
    installed; all are removed on exit), in force in the backwards that run while ``switch.on``.
    The forward is unchanged bit for bit."""
    check_attention(attention_rule)
    norm_list = [(m, norm_rule(m)) for m in norms(ad)]
    acts = [(m, activation_rule(m)) for m in (blk.get_submodule(ad.family.act) for blk in ad.blocks)]
    gates = [blk.get_submodule(path) for blk in ad.blocks for path in ad.family.gates]
    with ExitStack() as stack:
        for module, rule in norm_list + acts:
            _replace_forward(stack, module, rule, switch)
        for gate in gates:
            handle = gate.register_forward_hook(lambda mod, args, out: scale_grad(out, 0.5, switch))
            stack.callback(handle.remove)
        if attention_rule != "plain":
            stack.enter_context(attention.interposed(ad, _attention_rule(attention_rule, switch)))
        yield
