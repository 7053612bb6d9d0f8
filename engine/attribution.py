"""Attribution patching (AtP) and AtP* for whole sweeps, in a fixed number of passes.

One no-grad forward of the *other* prompts (corrupt when noising, clean when denoising) keeps
the activations of the scanned sites; one forward of the *base* prompts builds the graph, with an
identity autograd function at every scanned site, which keeps ``a_other - a_base`` (the other
run's activation is freed as soon as the base run passes the site); one backward of the metric
(summed over pairs) then reduces ``(a_other - a_base) . grad`` to per-component scores inside
each site's backward (``ops.attribute``), so no gradient tensor outlives its layer and no
gradient cache is kept. Parameters are frozen for the duration: the backward computes activation gradients only.

AtP* adds
- the QK fix: scores of ``q`` and ``k`` nodes come from the exact attention pattern under the
  patch (``ops.qk_fix``), computed in the backward of the layer's head output, where
  ``dL/dz`` is at hand;
- GradDrop: ``L`` more backwards over the same graph; in backward ``l`` the gradient through
  block ``l``'s residual writes (``attn_out``, ``mlp_out``) is zero. A node's score is
  ``sum_l |I_l| / (L - 1)`` for nodes inside a block (the pass that drops their own block gives
  0), and ``mean_l |I_l|`` for residual-stream nodes; passes that drop a block upstream of the
  node leave its gradient unchanged and count ``|AtP|`` without recomputing. A node with a
  direct effect only scores ``|AtP|``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from causalscan import attention, runner
from causalscan.adapters import Adapter
from causalscan.bindings import ops

RESID = ("resid_pre", "resid_mid", "resid_post")


@dataclass(frozen=True)
class Sweep:
    """A scanned sweep: ``site`` at every layer, per position or not; result ``[L, (T), (C)]``."""

    name: str
    site: str
    by_pos: bool
    shape: tuple


class _Tap(torch.autograd.Function):
    """Identity in the forward; hands ``(keep, grad)`` to ``hook`` in the backward, where ``keep`` is
    ``other - x`` (or ``x`` itself when ``other`` is None): the one tensor kept for the backward."""

    @staticmethod
    def forward(ctx, x, other, hook):
        ctx.hook = hook
        if other is None:
            ctx.save_for_backward(x)
        else:
            ctx.delta = other - x
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        keep = ctx.saved_tensors[0] if ctx.saved_tensors else ctx.delta
        ctx.hook(keep, grad)
        return grad, None, None


class _Drop(torch.autograd.Function):
    """Identity in the forward; zero gradient in the backward while ``state["drop"] == layer``."""

    @staticmethod
    def forward(ctx, x, state, layer):
        ctx.state, ctx.layer = state, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (torch.zeros_like(grad) if ctx.state["drop"] == ctx.layer else grad), None, None


def first_affected(site: str, layer: int) -> int:
    """The first GradDrop pass that changes the gradient at ``site`` of ``layer``."""
    return layer + 1 if site == "resid_post" else layer


@contextmanager
def frozen(model: torch.nn.Module):
    """Parameters without ``requires_grad`` for the duration: backwards compute activation gradients only."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def attribute(
    ad: Adapter,
    base_ids: torch.Tensor,
    other_ids: torch.Tensor,
    metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sweeps: list[Sweep],
    base_is_clean: bool = True,
    qk_fix: bool = False,
    graddrop: bool = False,
    base_noise: torch.Tensor | None = None,
    other_noise: torch.Tensor | None = None,
) -> dict:
    """Scores of every sweep for pairs ``base_ids``/``other_ids`` [P, T].

    ``metric(logits [P, V], clean_logprobs [P, V]) -> [P]`` at the last position; the clean run is
    the base run when noising (``base_is_clean``), the other run when denoising.
    ``base_noise``/``other_noise``: Gaussian corruption ``[P, T, d_embed]`` added to the embeddings.
    Returns ``{"signed": {name: [P, *shape]}, "graddrop": {name: [P, *shape]} (if graddrop),
    "base": [P], "other": [P]}``: ``signed`` is AtP (with the QK fix for q/k nodes if asked).
    """
    n_layers = ad.n_layers
    p, seq = base_ids.shape
    fixed = {"q", "k"} if qk_fix else set()
    sites = {sw.site for sw in sweeps}
    tapped = [(s, layer) for s in sorted(sites - fixed) for layer in range(n_layers)]
    attn_layers = range(n_layers) if sites & fixed else []

    other_acts: dict = {}
    other_rec: dict = {}
    with torch.no_grad(), attention.recording(ad, attn_layers, other_rec):
        other_logits = runner.forward(ad, other_ids, [runner.capture(ad, s, layer, other_acts) for s, layer in tapped],
                                      noise=other_noise)
    other_logits = other_logits[:, -1]

    dev = base_ids.device  # scores stay on the device until the passes are done: no sync per layer
    signed = {sw.name: torch.zeros(p, *sw.shape, device=dev) for sw in sweeps}
    gd = {sw.name: torch.zeros(p, *sw.shape, device=dev) for sw in sweeps} if graddrop else None
    state = {"drop": None}

    def store(site: str, layer: int, by_pos: bool, score: torch.Tensor) -> None:
        """``score`` [P, T, C] or [P, C] of one layer into every sweep of ``site`` with ``by_pos``."""
        for sw in sweeps:
            if sw.site != site or sw.by_pos != by_pos:
                continue
            val = score.float().reshape(p, *sw.shape[1:])
            if state["drop"] is None:
                signed[sw.name][:, layer] = val
            else:
                gd[sw.name][:, layer] += val.abs()

    def wanted(site: str, layer: int) -> bool:
        return state["drop"] is None or first_affected(site, layer) <= state["drop"]

    def site_hook(site: str, layer: int):
        modes = {sw.by_pos for sw in sweeps if sw.site == site}

        def hook(delta, grad):  # [P, T, C, D] each
            if not wanted(site, layer):
                return
            for by_pos in modes:
                if state["drop"] is None:
                    store(site, layer, by_pos, ops.attribute(None, delta, grad, by_pos))
                    continue
                # a GradDrop pass: |I| accumulated in place by the kernel, into each sweep's layer slice
                shape = delta.shape[:3] if by_pos else (delta.shape[0], delta.shape[2])
                for sw in sweeps:
                    if sw.site == site and sw.by_pos == by_pos:
                        ops.attribute(None, delta, grad, by_pos, abs=True, out=gd[sw.name][:, layer].view(shape))
        return hook

    base_rec: dict = {}

    def qk_hook(layer: int):
        def hook(z, dz):
            if not wanted("q", layer):
                return
            rec, oth = base_rec[layer], other_rec[layer]
            res = ops.qk_fix(rec.q, rec.k, rec.v, dz, rec.bias(), rec.scaling, rec.softcap,
                             q_other=oth.q if "q" in sites else None, k_other=oth.k if "k" in sites else None)
            for site in sites & fixed:
                for sw in sweeps:
                    if sw.site == site:
                        val = res[site] if sw.by_pos else (res["q"].sum(1) if site == "q" else res["k_all"])
                        store(site, layer, sw.by_pos, val)
        return hook

    def tap(hook, key=None):
        """The other run's activation at ``key`` is dropped once the base run has taken its difference."""
        return lambda x: _Tap.apply(x, None if key is None else other_acts.pop(key), hook)

    taps = [(s, layer, tap(site_hook(s, layer), (s, layer))) for s, layer in tapped]
    taps += [("head", layer, tap(qk_hook(layer))) for layer in attn_layers]
    if graddrop:
        taps += [(s, layer, lambda x, layer=layer: _Drop.apply(x, state, layer))
                 for layer in range(n_layers) for s in ("attn_out", "mlp_out")]

    def leaf(mod, args, out):
        return out.detach().requires_grad_()

    with frozen(ad.model), torch.enable_grad(), attention.recording(ad, attn_layers, base_rec):
        handle = ad.model.get_input_embeddings().register_forward_hook(leaf)
        try:
            base_logits = runner.forward(ad, base_ids, taps, noise=base_noise)[:, -1]
        finally:
            handle.remove()
        clean = (base_logits.detach() if base_is_clean else other_logits).float().log_softmax(-1)
        base_m = metric(base_logits, clean)
        base_m.sum().backward(retain_graph=graddrop)
        if graddrop:
            for layer in range(n_layers):
                state["drop"] = layer
                base_m.sum().backward(retain_graph=layer < n_layers - 1)
    other_acts.clear()
    with torch.no_grad():
        other_m = metric(other_logits, clean)
    signed = {name: v.cpu() for name, v in signed.items()}
    out = {"signed": signed, "base": base_m.detach().float().cpu(), "other": other_m.float().cpu()}
    if graddrop:
        for sw in sweeps:
            out.setdefault("graddrop", {})[sw.name] = _graddrop_mean(sw, signed[sw.name], gd[sw.name].cpu(), n_layers)
    return out


def _graddrop_mean(sw: Sweep, signed: torch.Tensor, acc: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Add ``|AtP|`` for the passes upstream of each layer's nodes and take the mean."""
    if n_layers == 1:
        return signed.abs()
    upstream = torch.tensor([first_affected(sw.site, layer) for layer in range(n_layers)], dtype=torch.float32)
    upstream = upstream.reshape(1, n_layers, *([1] * (signed.dim() - 2)))
    denom = n_layers if sw.site in RESID else n_layers - 1
    return (acc + upstream * signed.abs()) / denom
