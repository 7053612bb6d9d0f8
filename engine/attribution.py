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

AtP-IG (integrated gradients along the input path; Hanna et al. 2024, "Have Faith in
Faithfulness"): ``ig_steps`` = N forwards and backwards of the base run whose token embeddings are
``e_base + (k / N) (e_other - e_base)``, k = 0..N-1 (a left Riemann sum: N = 1 is AtP); each site's
backward adds ``(a_other - a_base) . grad / N`` into the same per-site store, so memory stays that
of AtP plus the base run's activations at the scanned sites. The other path the paper compares
(``ig_path="activations"``) interpolates each site on its own: for every scanned (site, layer), N
forwards from that layer of the base run with the site's activation set to
``a_base + (k / N) (a_other - a_base)`` (everything upstream is the base run's), each backward
adding ``(a_other - a_base) . grad / N`` for that site only. A site's attributions then sum to the
exact effect of patching the whole site (completeness), up to the quadrature error; the cost is N
passes per site and layer instead of N in all.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from causalscan import attention, runner
from causalscan.adapters import Adapter
from causalscan.bindings import ops
from causalscan.sweeps import Sweep

RESID = ("resid_pre", "resid_mid", "resid_post")
QK = ("q", "k")
IG_PATHS = ("inputs", "activations")


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


class _Grad(torch.autograd.Function):
    """Identity in the forward; hands ``grad`` to ``hook`` in the backward (AtP-IG: the differences
    ``a_other - a_base`` are taken once, outside the interpolated runs)."""

    @staticmethod
    def forward(ctx, x, hook):
        ctx.hook = hook
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.hook(grad)
        return grad, None

    @classmethod
    def tap(cls, hook):
        return lambda x: cls.apply(x, hook)


class _Drop(torch.autograd.Function):
    """Identity in the forward; zero gradient in the backward while ``scores.drop == layer``."""

    @staticmethod
    def forward(ctx, x, scores, layer):
        ctx.scores, ctx.layer = scores, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (torch.zeros_like(grad) if ctx.scores.drop == ctx.layer else grad), None, None


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


class _Scores:
    """The score stores of one batch, filled by the backward hooks of the base run's taps.

    ``signed[name]`` ``[P, *shape]``: AtP from the plain backward; ``graddrop[name]``: the sum of
    ``|I_l|`` over GradDrop backwards. ``drop``: the block whose residual writes the running backward
    cuts (None: the plain backward).
    """

    def __init__(self, sweeps: list[Sweep], n_pairs: int, device, graddrop: bool, role_pos: torch.Tensor | None = None):
        self.sweeps, self.n_pairs, self.drop, self.role_pos = sweeps, n_pairs, None, role_pos
        self.weight: float | None = None  # AtP-IG: each step's scores are added with this weight
        self.signed = {sw.name: torch.zeros(n_pairs, *sw.shape, device=device) for sw in sweeps}
        self.graddrop = {sw.name: torch.zeros(n_pairs, *sw.shape, device=device) for sw in sweeps} if graddrop else None

    def of(self, site: str, by_pos: bool | None = None) -> list[Sweep]:
        return [sw for sw in self.sweeps if sw.site == site and by_pos in (None, sw.by_pos)]

    def wanted(self, site: str, layer: int) -> bool:
        """Does the running backward change the gradient at ``site`` of ``layer``?"""
        return self.drop is None or first_affected(site, layer) <= self.drop

    def store(self, site: str, layer: int, by_pos: bool, score: torch.Tensor) -> None:
        """``score`` [P, T, C] or [P, C] of one layer into every sweep of ``site`` with ``by_pos``."""
        for sw in self.of(site, by_pos):
            val = self.at_positions(score, sw).float().reshape(self.n_pairs, *sw.shape[1:])
            val = val.to(self.signed[sw.name].device)  # the layer's block may sit on another device
            if self.weight is not None:
                self.signed[sw.name][:, layer] += self.weight * val
            elif self.drop is None:
                self.signed[sw.name][:, layer] = val
            else:
                self.graddrop[sw.name][:, layer] += val.abs()

    def at_positions(self, score: torch.Tensor, sw: Sweep) -> torch.Tensor:
        """A by-position score ``[P, T', C]`` at the sweep's positions: each pair's role positions
        ``[P, R, C]`` for a sweep over roles, else the prompt's first ``T`` (rows of multi-token
        answers run on past the prompt)."""
        if not sw.by_pos:
            return score
        if sw.roles is None:
            return score[:, : sw.shape[1]]
        idx = self.role_pos.to(score.device)[:, :, None].expand(-1, -1, score.shape[-1])
        return score.gather(1, idx)

    def site_hook(self, site: str, layer: int):
        """The backward hook of a site's tap: ``(a_other - a_base) . grad`` for each of its sweeps."""
        modes = {sw.by_pos for sw in self.of(site)}

        def hook(delta, grad):  # [P, T, C, D] each
            if not self.wanted(site, layer):
                return
            for by_pos in modes:
                if self.drop is None:
                    self.store(site, layer, by_pos, ops.attribute(None, delta, grad, by_pos))
                    continue
                # a GradDrop pass: |I| accumulated in place by the kernel, into each sweep's layer slice
                shape = delta.shape[:3] if by_pos else (delta.shape[0], delta.shape[2])
                for sw in self.of(site, by_pos):
                    acc = self.graddrop[sw.name][:, layer]
                    if acc.device == delta.device and (not by_pos or sw.roles is None and shape[1] == sw.shape[1]):
                        ops.attribute(None, delta, grad, by_pos, abs=True, out=acc.view(shape))
                    else:  # per-pair or prompt positions, or another device: taken, then added
                        score = ops.attribute(None, delta, grad, by_pos)
                        acc += self.at_positions(score, sw).abs().reshape(acc.shape).to(acc.device)

        return hook

    def qk_hook(
        self, layer: int, base: dict[int, attention.Record], other: dict[int, attention.Record], sites: set[str]
    ):
        """The backward hook of a layer's head output: the QK fix of its q and k nodes, where
        ``dL/dz`` is at hand."""

        def hook(z, dz):
            if not self.wanted("q", layer):
                return
            rec, oth = base[layer], other[layer]
            res = ops.qk_fix(
                rec.q,
                rec.k,
                rec.v,
                dz,
                rec.bias(),
                rec.scaling,
                rec.softcap,
                q_other=oth.q if "q" in sites else None,
                k_other=oth.k if "k" in sites else None,
            )
            for site in sites & set(QK):
                for sw in self.of(site):
                    val = res[site] if sw.by_pos else (res["q"].sum(1) if site == "q" else res["k_all"])
                    self.store(site, layer, sw.by_pos, val)

        return hook


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
    """
    if ig_steps:
        ig = _attribute_ig if ig_path == "inputs" else _attribute_ig_activations
        return ig(
            ad, base_ids, other_ids, metric, sweeps, base_is_clean, base_noise, other_noise, role_pos, keep, ig_steps
        )
    sites = {sw.site for sw in sweeps}
    fixed = sites & set(QK) if qk_fix else set()
    tapped = [(s, layer) for s in sorted(sites - fixed) for layer in range(ad.n_layers)]
    attn_layers = range(ad.n_layers) if fixed else range(0)

    other_logits, other_acts, other_rec = _other_run(ad, other_ids, tapped, attn_layers, other_noise, keep)
    scores = _Scores(sweeps, base_ids.shape[0], base_ids.device, graddrop, role_pos)  # on the device: no sync
    base_rec: dict = {}
    taps = _base_taps(ad, scores, tapped, other_acts, attn_layers, base_rec, other_rec, fixed, graddrop)
    base_m, clean_logprobs = _base_run_and_backwards(
        ad, base_ids, taps, metric, attn_layers, base_rec, scores, other_logits, base_is_clean, base_noise, keep
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


def _attribute_ig(
    ad: Adapter,
    base_ids,
    other_ids,
    metric,
    sweeps: list[Sweep],
    base_is_clean: bool,
    base_noise,
    other_noise,
    role_pos,
    keep: int,
    steps: int,
) -> dict:
    """AtP-IG along the input path (see the module docstring); returns as :func:`attribute`."""
    tapped = [(s, layer) for s in sorted({sw.site for sw in sweeps}) for layer in range(ad.n_layers)]
    other_logits, other_acts, _ = _other_run(ad, other_ids, tapped, range(0), other_noise, keep)
    _, delta, _ = _other_run(ad, base_ids, tapped, range(0), base_noise, keep)
    for key, a in other_acts.items():
        delta[key] = a - delta[key]  # a_other - a_base, in place of the base activation
    other_acts.clear()
    scores = _Scores(sweeps, base_ids.shape[0], base_ids.device, False, role_pos)
    scores.weight = 1.0 / steps

    taps = [(s, layer, _Grad.tap(_ig_hook(scores, delta, s, layer))) for s, layer in tapped]
    with frozen(ad.model), torch.enable_grad():
        for k, noise in enumerate(input_path(ad, base_ids, other_ids, base_noise, other_noise, steps)):
            logits = graph_forward(ad, base_ids, taps, noise, keep)
            if k == 0:
                clean_logprobs = (logits.detach() if base_is_clean else other_logits).float().log_softmax(-1)
            m = metric(logits, clean_logprobs)
            m.sum().backward()
            if k == 0:
                base_m = m.detach()
    delta.clear()
    with torch.no_grad():
        other_m = metric(other_logits, clean_logprobs)
    return {
        "signed": {name: v.cpu() for name, v in scores.signed.items()},
        "base": base_m.float().cpu(),
        "other": other_m.float().cpu(),
    }


def _ig_hook(scores: _Scores, delta: dict, site: str, layer: int):
    """The backward hook of an IG step at ``site`` of ``layer``: ``delta . grad`` into its sweeps (weighted)."""
    d, modes = delta[(site, layer)], {sw.by_pos for sw in scores.of(site)}

    def hook(grad):
        for by_pos in modes:
            scores.store(site, layer, by_pos, ops.attribute(None, d, grad, by_pos))

    return hook


def _leaf(mod, args, out):
    """A forward hook making a module's output a graph leaf (the base run's graph starts there)."""
    return out.detach().requires_grad_()


def graph_forward(ad: Adapter, ids: torch.Tensor, taps, noise: torch.Tensor | None, keep: int) -> torch.Tensor:
    """``runner.forward`` whose autograd graph starts at the input embeddings (no parameter or
    embedding-table gradient); logits [B, keep, V]."""
    handle = ad.model.get_input_embeddings().register_forward_hook(_leaf)
    try:
        return runner.forward(ad, ids, taps, noise=noise, logits_to_keep=keep)
    finally:
        handle.remove()


def input_path(
    ad: Adapter,
    base_ids: torch.Tensor,
    other_ids: torch.Tensor,
    base_noise: torch.Tensor | None,
    other_noise: torch.Tensor | None,
    steps: int,
):
    """The embedding noise of each IG step ``k = 0 .. steps - 1`` on the base run: the base run's own
    noise plus ``(k / steps) (e_other + other_noise - e_base - base_noise)`` ``[B, T, d]``."""
    embed = ad.model.get_input_embeddings()
    with torch.no_grad():
        step = embed(other_ids) - embed(base_ids)
        step = step + (0 if other_noise is None else other_noise) - (0 if base_noise is None else base_noise)
    for k in range(steps):
        yield step * (k / steps) if base_noise is None else base_noise + step * (k / steps)


def _attribute_ig_activations(
    ad: Adapter,
    base_ids,
    other_ids,
    metric,
    sweeps: list[Sweep],
    base_is_clean: bool,
    base_noise,
    other_noise,
    role_pos,
    keep: int,
    steps: int,
) -> dict:
    """AtP-IG along each site's own path (see the module docstring); returns as :func:`attribute`."""
    tapped = [(s, layer) for s in sorted({sw.site for sw in sweeps}) for layer in range(ad.n_layers)]
    other_logits, other_acts, _ = _other_run(ad, other_ids, tapped, range(0), other_noise, keep)
    resid_in = [("resid_pre", layer) for layer in range(ad.n_layers)]
    base_logits, base_acts, _ = _other_run(ad, base_ids, sorted(set(tapped + resid_in)), range(0), base_noise, keep)
    resid = [base_acts[key][:, :, 0] for key in resid_in]  # [P, T, d_model] entering each block
    delta = {key: other_acts.pop(key) - base_acts.pop(key) for key in tapped}  # a_other - a_base
    base_acts.clear()
    clean_logprobs = (base_logits if base_is_clean else other_logits).float().log_softmax(-1)
    scores = _Scores(sweeps, base_ids.shape[0], base_ids.device, False, role_pos)
    scores.weight = 1.0 / steps
    with frozen(ad.model), torch.enable_grad():
        for site, layer in tapped:
            hook = _ig_hook(scores, delta, site, layer)
            for k in range(steps):

                def tap(x, alpha=k / steps, d=delta[(site, layer)], hook=hook):
                    return _Grad.apply((x.detach() + alpha * d).requires_grad_(), hook)

                logits = runner.forward(
                    ad, base_ids, [(site, layer, tap)], start_layer=layer, resid=resid[layer], logits_to_keep=keep
                )
                metric(logits, clean_logprobs).sum().backward()
    delta.clear()
    with torch.no_grad():
        base_m, other_m = metric(base_logits, clean_logprobs), metric(other_logits, clean_logprobs)
    return {
        "signed": {name: v.cpu() for name, v in scores.signed.items()},
        "base": base_m.float().cpu(),
        "other": other_m.float().cpu(),
    }


@torch.no_grad()
def _other_run(
    ad: Adapter, ids: torch.Tensor, tapped, attn_layers, noise, keep: int
) -> tuple[torch.Tensor, dict, dict]:
    """The other run without a graph: the last ``keep`` positions' logits [P, keep, V], activations
    at the tapped sites, and the attention inputs of ``attn_layers``."""
    acts: dict = {}
    rec: dict = {}
    with attention.recording(ad, attn_layers, rec):
        logits = runner.forward(
            ad, ids, [runner.capture(ad, s, layer, acts) for s, layer in tapped], noise=noise, logits_to_keep=keep
        )
    return logits, acts, rec


def _base_taps(
    ad: Adapter,
    scores: _Scores,
    tapped,
    other_acts: dict,
    attn_layers,
    base_rec: dict,
    other_rec: dict,
    fixed: set[str],
    graddrop: bool,
) -> list[runner.TapSpec]:
    """The base run's taps: one per scanned site (keeping ``a_other - a_base``; the other run's
    activation is dropped once taken), one per head output for the QK fix, and GradDrop's cuts."""

    def tap(hook, key=None):
        return lambda x: _Tap.apply(x, None if key is None else other_acts.pop(key), hook)

    taps = [(s, layer, tap(scores.site_hook(s, layer), (s, layer))) for s, layer in tapped]
    taps += [("head", layer, tap(scores.qk_hook(layer, base_rec, other_rec, fixed))) for layer in attn_layers]
    if graddrop:
        taps += [
            (s, layer, lambda x, layer=layer: _Drop.apply(x, scores, layer))
            for layer in range(ad.n_layers)
            for s in ("attn_out", "mlp_out")
        ]
    return taps


def _base_run_and_backwards(
    ad: Adapter,
    ids: torch.Tensor,
    taps,
    metric,
    attn_layers,
    base_rec: dict,
    scores: _Scores,
    other_logits: torch.Tensor,
    base_is_clean: bool,
    noise,
    keep: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base run with its graph (from the embeddings, parameters frozen), one backward of the
    summed metric, and with GradDrop one more per block over the same graph. Returns the base
    metric [P] and the clean log-probabilities [P, keep, V]."""
    with frozen(ad.model), torch.enable_grad(), attention.recording(ad, attn_layers, base_rec):
        logits = graph_forward(ad, ids, taps, noise, keep)
        clean_logprobs = (logits.detach() if base_is_clean else other_logits).float().log_softmax(-1)
        base_m = metric(logits, clean_logprobs)
        graddrop = scores.graddrop is not None
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
    upstream = torch.tensor([first_affected(sw.site, layer) for layer in range(n_layers)], dtype=torch.float32)
    upstream = upstream.reshape(1, n_layers, *([1] * (signed.dim() - 2)))
    denom = n_layers if sw.site in RESID else n_layers - 1
    return (acc + upstream * signed.abs()) / denom
