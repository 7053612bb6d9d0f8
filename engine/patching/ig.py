"""AtP-IG: attribution patching with integrated gradients (Hanna et al. 2024, "Have Faith in
Faithfulness").

Along the input path (``ig_path="inputs"``): ``ig_steps`` = N forwards and backwards of the base run
whose token embeddings are ``e_base + (k / N) (e_other - e_base)``, k = 0..N-1 (a left Riemann sum:
N = 1 is AtP); each site's backward adds ``(a_other - a_base) . grad / N`` into the same per-site
store, so memory stays that of AtP plus the base run's activations at the scanned sites. The other
path the paper compares (``ig_path="activations"``) interpolates each site on its own: for every
scanned (site, layer), N forwards from that layer of the base run with the site's activation set to
``a_base + (k / N) (a_other - a_base)`` (everything upstream is the base run's), each backward
adding ``(a_other - a_base) . grad / N`` for that site only. A site's attributions then sum to the
exact effect of patching the whole site (completeness), up to the quadrature error; the cost is N
passes per site and layer instead of N in all.
"""

from __future__ import annotations

import torch

from causalscan.bindings import ops
from causalscan.data.sweeps import Sweep
from causalscan.model import runner
from causalscan.model.adapters import Adapter
from causalscan.model.taps import Grad, frozen, integrated_gradients
from causalscan.patching.scores import Scores, other_run

PATHS = ("inputs", "activations")


def along_inputs(
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
    """AtP-IG along the input path (see the module docstring); returns as
    :func:`causalscan.patching.attribution.attribute`."""
    tapped = [(s, layer) for s in sorted({sw.site for sw in sweeps}) for layer in ad.layers(s)]
    other_logits, other_acts, _ = other_run(ad, other_ids, tapped, range(0), other_noise, keep)
    _, delta, _ = other_run(ad, base_ids, tapped, range(0), base_noise, keep)
    for key, a in other_acts.items():
        delta[key] = a - delta[key]  # a_other - a_base, in place of the base activation
    other_acts.clear()
    scores = Scores(sweeps, base_ids.shape[0], base_ids.device, False, role_pos)
    scores.weight = 1.0 / steps

    taps = [(s, layer, Grad.tap(_ig_hook(scores, delta, s, layer))) for s, layer in tapped]
    base_m, clean_logprobs = integrated_gradients(
        ad,
        base_ids,
        other_ids,
        metric,
        lambda k: taps,
        steps,
        other_logits,
        base_is_clean,
        base_noise,
        other_noise,
        keep,
    )
    delta.clear()
    with torch.no_grad():
        other_m = metric(other_logits, clean_logprobs)
    return _result(scores, base_m, other_m)


def _ig_hook(scores: Scores, delta: dict, site: str, layer: int):
    """The backward hook of an IG step at ``site`` of ``layer``: ``delta . grad`` into its sweeps (weighted)."""
    d, modes = delta[(site, layer)], {sw.by_pos for sw in scores.of(site)}

    def hook(grad):
        for by_pos in modes:
            scores.store(site, layer, by_pos, ops.attribute(None, d, grad, by_pos))

    return hook


def along_activations(
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
    """AtP-IG along each site's own path (see the module docstring); returns as
    :func:`causalscan.patching.attribution.attribute`."""
    tapped = [(s, layer) for s in sorted({sw.site for sw in sweeps}) for layer in ad.layers(s)]
    other_logits, other_acts, _ = other_run(ad, other_ids, tapped, range(0), other_noise, keep)
    resid_in = [("resid_pre", layer) for layer in range(ad.n_layers)]
    base_logits, base_acts, _ = other_run(ad, base_ids, sorted(set(tapped + resid_in)), range(0), base_noise, keep)
    resid = [base_acts[key][:, :, 0] for key in resid_in]  # [P, T, d_model] entering each block
    delta = {key: other_acts.pop(key) - base_acts.pop(key) for key in tapped}  # a_other - a_base
    base_acts.clear()
    clean_logprobs = (base_logits if base_is_clean else other_logits).float().log_softmax(-1)
    scores = Scores(sweeps, base_ids.shape[0], base_ids.device, False, role_pos)
    scores.weight = 1.0 / steps
    with frozen(ad.model), torch.enable_grad():
        for site, layer in tapped:
            hook = _ig_hook(scores, delta, site, layer)
            for k in range(steps):

                def tap(x, alpha=k / steps, d=delta[(site, layer)], hook=hook):
                    return Grad.apply((x.detach() + alpha * d).requires_grad_(), hook)

                logits = runner.forward(
                    ad, base_ids, [(site, layer, tap)], start_layer=layer, resid=resid[layer], logits_to_keep=keep
                )
                metric(logits, clean_logprobs).sum().backward()
    delta.clear()
    with torch.no_grad():
        base_m, other_m = metric(base_logits, clean_logprobs), metric(other_logits, clean_logprobs)
    return _result(scores, base_m, other_m)


def _result(scores: Scores, base_m: torch.Tensor, other_m: torch.Tensor) -> dict:
    """What :func:`causalscan.patching.attribution.attribute` returns: ``signed`` and the metrics, on the CPU."""
    signed = {name: v.cpu() for name, v in scores.signed.items()}
    return {"signed": signed, "base": base_m.float().cpu(), "other": other_m.float().cpu()}
