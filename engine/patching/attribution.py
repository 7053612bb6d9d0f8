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

RelP (``rules``): the same passes with the relevance rules of :mod:`causalscan.model.relevance`
in the base run's backward (the forward is unchanged), so the gradient is LRP's coefficient. With
``plain_sites`` as well, one base forward serves two backwards: the plain one scores those sites
(AtP), the rules one every other site (RelP).

AtP-IG (``ig_steps``): :mod:`causalscan.patching.ig`. The score store: :mod:`causalscan.patching.scores`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from causalscan.data.sweeps import Sweep
from causalscan.model import attention, relevance, runner
from causalscan.model.adapters import Adapter
from causalscan.model.taps import frozen, graph_forward
from causalscan.patching import ig
from causalscan.patching.scores import QK, Scores, first_affected, other_run

RESID = ("resid_pre", "resid_mid", "resid_post")


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
    """Identity in the forward; zero gradient in the backward while ``scores.drop == layer``."""

    @staticmethod
    def forward(ctx, x, scores, layer):
        ctx.scores, ctx.layer = scores, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (torch.zeros_like(grad) if ctx.scores.drop == ctx.layer else grad), None, None


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
    role_pos: torch.Tensor | None = None,
    keep: int = 1,
    ig_steps: int = 0,
    ig_path: str = "inputs",
    rules: str | None = None,
    plain_sites: frozenset[str] = frozenset(),
) -> dict:
    """Scores of every sweep for pairs ``base_ids``/``other_ids`` [P, T].

    ``metric(logits [P, keep, V], clean_logprobs [P, keep, V]) -> [P]`` at the last ``keep``
    positions; the clean run is the base run when noising (``base_is_clean``), the other run when
    denoising.
    ``base_noise``/``other_noise``: Gaussian corruption ``[P, T, d_embed]`` added to the embeddings.
    ``role_pos``: ``[P, R]`` token positions of the roles that sweeps with ``roles`` run over.
    Returns ``{"signed": {name: [P, *shape]}, "graddrop": {name: [P, *shape]} (if graddrop),
    "base": [P], "other": [P]}``: ``signed`` is AtP (with the QK fix for q/k nodes if asked).
    ``ig_steps`` > 0: ``signed`` is AtP-IG over that many steps of ``ig_path`` (``inputs``: one path
    for all sites; ``activations``: each site's own), without QK fix or GradDrop.
    ``rules``: an attention rule of :data:`causalscan.model.relevance.ATTENTION` for RelP (the
    relevance rules in the backward), or None for the plain gradient; ``plain_sites``: with
    ``rules``, the sites scored by a plain backward of the same graph (AtP) instead.
    """
    if ig_steps and rules:
        raise ValueError("relevance rules take one step, not integrated gradients")
    if rules == "cp" and qk_fix and {sw.site for sw in sweeps} & set(QK):
        raise ValueError("the cp rule holds the pattern constant: the QK fix would score what it removes")
    if ig_steps:
        along = ig.along_inputs if ig_path == "inputs" else ig.along_activations
        return along(
            ad, base_ids, other_ids, metric, sweeps, base_is_clean, base_noise, other_noise, role_pos, keep, ig_steps
        )
    sites = {sw.site for sw in sweeps}
    fixed = sites & set(QK) if qk_fix else set()
    tapped = [(s, layer) for s in sorted(sites - fixed) for layer in ad.layers(s)]
    attn_layers = range(ad.n_layers) if fixed else range(0)

    other_logits, other_acts, other_rec = other_run(ad, other_ids, tapped, attn_layers, other_noise, keep)
    scores = Scores(sweeps, base_ids.shape[0], base_ids.device, graddrop, role_pos)  # on the device: no sync
    base_rec: dict = {}
    switch = relevance.Switch() if rules and plain_sites else None
    taps = _base_taps(
        ad, scores, tapped, other_acts, attn_layers, base_rec, other_rec, fixed, graddrop, switch, plain_sites
    )
    with relevance.rules(ad, rules, switch or relevance.ALWAYS) if rules else nullcontext():
        base_m, clean_logprobs = _base_run_and_backwards(
            ad,
            base_ids,
            taps,
            metric,
            attn_layers,
            base_rec,
            scores,
            other_logits,
            base_is_clean,
            base_noise,
            keep,
            switch,
        )
    other_acts.clear()
    with torch.no_grad():
        other_m = metric(other_logits, clean_logprobs)
    signed = {name: v.cpu() for name, v in scores.signed.items()}
    out = {"signed": signed, "base": base_m.detach().float().cpu(), "other": other_m.float().cpu()}
    if graddrop:
        out["graddrop"] = {
            sw.name: _graddrop_mean(sw, signed[sw.name], scores.graddrop[sw.name].cpu(), ad.n_layers) for sw in sweeps
        }
    return out


def _base_taps(
    ad: Adapter,
    scores: Scores,
    tapped,
    other_acts: dict,
    attn_layers,
    base_rec: dict,
    other_rec: dict,
    fixed: set[str],
    graddrop: bool,
    switch: relevance.Switch | None = None,
    plain_sites: frozenset[str] = frozenset(),
) -> list[runner.TapSpec]:
    """The base run's taps: one per scanned site (keeping ``a_other - a_base``; the other run's
    activation is dropped once taken), one per head output for the QK fix, and GradDrop's cuts.
    With a ``switch``, a site's hook runs in the plain backward if it is one of ``plain_sites``, in
    the rules backward otherwise."""

    def tap(hook, key=None, site=None):
        if switch is not None:
            hook = _gated(hook, switch, rules_on=site not in plain_sites)
        return lambda x: _Tap.apply(x, None if key is None else other_acts.pop(key), hook)

    taps = [(s, layer, tap(scores.site_hook(s, layer), (s, layer), s)) for s, layer in tapped]
    taps += [("head", layer, tap(scores.qk_hook(layer, base_rec, other_rec, fixed))) for layer in attn_layers]
    if graddrop:
        taps += [
            (s, layer, lambda x, layer=layer: _Drop.apply(x, scores, layer))
            for layer in range(ad.n_layers)
            for s in ("attn_out", "mlp_out")
        ]
    return taps


def _gated(hook, switch: relevance.Switch, rules_on: bool):
    """``hook`` only in the backward whose rules state is ``rules_on``."""

    def gated(keep, grad):
        if switch.on == rules_on:
            hook(keep, grad)

    return gated


def _base_run_and_backwards(
    ad: Adapter,
    ids: torch.Tensor,
    taps,
    metric,
    attn_layers,
    base_rec: dict,
    scores: Scores,
    other_logits: torch.Tensor,
    base_is_clean: bool,
    noise,
    keep: int,
    switch: relevance.Switch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base run with its graph (from the embeddings, parameters frozen), one backward of the
    summed metric, and with GradDrop one more per block over the same graph; with a ``switch``, a
    plain backward first and then the rules one. Returns the base metric [P] and the clean
    log-probabilities [P, keep, V]."""
    with frozen(ad.model), torch.enable_grad(), attention.recording(ad, attn_layers, base_rec):
        logits = graph_forward(ad, ids, taps, noise, keep)
        clean_logprobs = (logits.detach() if base_is_clean else other_logits).float().log_softmax(-1)
        base_m = metric(logits, clean_logprobs)
        graddrop = scores.graddrop is not None
        if switch is not None:
            switch.on = False
            base_m.sum().backward(retain_graph=True)
            switch.on = True
        base_m.sum().backward(retain_graph=graddrop)
        if graddrop:
            for layer in range(ad.n_layers):
                scores.drop = layer
                base_m.sum().backward(retain_graph=layer < ad.n_layers - 1)
    return base_m, clean_logprobs


def _graddrop_mean(sw: Sweep, signed: torch.Tensor, acc: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Add ``|AtP|`` for the passes upstream of each layer's nodes and take the mean."""
    if n_layers == 1:
        return signed.abs()
    layers = sw.layers if sw.layers is not None else range(n_layers)
    upstream = torch.tensor([first_affected(sw.site, layer) for layer in layers], dtype=torch.float32)
    upstream = upstream.reshape(1, len(layers), *([1] * (signed.dim() - 2)))
    denom = n_layers if sw.site in RESID else n_layers - 1
    return (acc + upstream * signed.abs()) / denom
