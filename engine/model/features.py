"""Feature sites: a model's activation rewritten through its dictionaries, exactly.

With a dictionary at a site the activation ``x`` [B, T, d_in] becomes ``decode(f) + err`` with
``f = encode(x)`` [B, T, d_sae] (site ``feature``, viewed ``[B, T, d_sae, 1]``) and ``err = x -
decode(f)`` [B, T, d_out] (site ``feature_error``, ``[B, T, 1, d_out]``), both nodes. The site is
rewritten as ``x + (decode(f') - decode(f)) + (err' - err)`` from the taps' ``f'`` and ``err'``, so
when no tap changes them the forward is the model's own, bit for bit, and the gradient reaching
``x`` from downstream is unchanged. A transcoder reads its input at the MLP's input (``mlp_in``) and
its reconstruction and error replace the MLP output: ``mlp_out = decode(f, x_in) + err``.

Dictionaries belong to one model instance (``model.adapter.dictionaries``, by layer: one per layer)
and travel with it (to Ray actors as well). Feature sweeps run over the layers that have one.

>>> import causalscan as cs
>>> from causalscan.model import features as sites
>>> m = cs.load("random:llama-tiny")
>>> d = sites.random_dictionary(m, "resid_pre", 1, d_sae=32)
>>> sites.attach(m, d).adapter.shape("feature"), m.adapter.layers("feature")
((32, 1), [1])
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable

import torch

from causalscan.errors import InputError
from causalscan.model import saelens
from causalscan.model.dictionary import TOPK, Dictionary

FEATURE_SITES = ("feature", "feature_error")


def attach(model, sae) -> object:
    """Attach dictionaries to ``model`` (in place; returns it): ``sae`` a folder in SAELens's format,
    a :class:`Dictionary`, or a list of them. Each is checked against the model: its layer exists,
    no other dictionary sits at that layer, and its ``d_in``/``d_out`` match the site's width."""
    ad = model.adapter
    items = sae if isinstance(sae, list | tuple) else [sae]
    for item in items:
        d = item if isinstance(item, Dictionary) else saelens.read(_path(item))
        where = d.name
        if not 0 <= d.layer < ad.n_layers:
            raise InputError(f"layer {d.layer} out of range [0, {ad.n_layers})", file=where, field="metadata.hook_name")
        if d.layer in ad.dictionaries:
            raise InputError(
                f"layer {d.layer} has a dictionary already ({ad.dictionaries[d.layer].name}); one per layer",
                file=where,
                field="metadata.hook_name",
            )
        width_in = ad.d_model if d.site == "mlp_in" else _width(ad, d.site, where)
        width_out = _width(ad, d.writes, where)
        if d.d_in != width_in:
            raise InputError(
                f"d_in {d.d_in} != the width {width_in} of {d.site} in {ad.family.name}", file=where, field="d_in"
            )
        if d.d_out != width_out:
            raise InputError(f"d_out {d.d_out} != the width {width_out} of {d.writes}", file=where, field="d_out")
        ad.dictionaries[d.layer] = d
    if ad.dictionaries and len({d.d_sae for d in ad.dictionaries.values()}) > 1:
        sizes = {layer: d.d_sae for layer, d in sorted(ad.dictionaries.items())}
        ad.dictionaries.clear()
        raise InputError(f"the dictionaries of one run share d_sae; found {sizes} by layer", field="sae")
    return model


def require_transcoders(ad, use: str) -> None:
    """:class:`InputError` naming the first of ``ad``'s dictionaries that is not a transcoder (``use``: what
    takes only transcoders, and why)."""
    for layer, d in sorted(ad.dictionaries.items()):
        if not d.transcoder:
            raise InputError(f"layer {layer}: {d.name} is an SAE ({d.architecture} at {d.site}); {use}", field="sae")


def _path(item) -> str:
    if not isinstance(item, str | os.PathLike):
        raise InputError(f"must be a dictionary folder or a Dictionary, not {type(item).__name__}", field="sae")
    return str(item)


def _width(ad, site: str, where: str) -> int:
    ad.check_site(site)
    c, d = ad.shape(site)
    return c * d


def detach(model) -> None:
    """Remove every dictionary from ``model``."""
    model.adapter.dictionaries.clear()


def _chain(fns: list[Callable], x: torch.Tensor) -> torch.Tensor | None:
    """The taps ``fns`` applied in turn (each sees the last replacement); None if none replaced."""
    out = None
    for fn in fns:
        new = fn(x if out is None else out)
        out = new if new is not None else out
    return out


def _rewrite(d: Dictionary, x: torch.Tensor, xin: torch.Tensor, feature: list, error: list) -> torch.Tensor | None:
    """``x`` [B, T, d_out] rewritten from the taps on ``f`` and ``err`` of input ``xin`` [B, T, d_in]."""
    f, norm = d.encode(xin)
    recon = d.decode(f, norm, xin)
    err = x - recon
    f2 = _chain(feature, f[..., None]) if feature else None
    e2 = _chain(error, err[:, :, None]) if error else None
    if f2 is None and e2 is None:
        return None
    out = x
    if f2 is not None:
        out = out + (d.decode(f2[..., 0], norm, xin) - recon)
    if e2 is not None:
        out = out + (e2[:, :, 0] - err)
    return out


def expand(ad, taps, shape) -> tuple[list, list]:
    """The feature taps ``(site, layer, fn)`` as taps at their dictionaries' sites, and the forward
    pre-hooks ``(module, hook)`` a transcoder needs to read its input. ``shape``: the runner's
    record of the batch and sequence in flight."""
    by_layer: dict[int, dict[str, list]] = defaultdict(lambda: {"feature": [], "feature_error": []})
    for site, layer, fn in taps:
        ad.check_site(site, layer)
        by_layer[layer][site].append(fn)
    out, pre = [], []
    for layer, fns in by_layer.items():
        d = ad.dictionaries[layer]
        if not d.transcoder:

            def tap(x, d=d, fns=fns):  # [B, T, C, D] -> [B, T, C, D]
                new = _rewrite(d, x.flatten(-2), x.flatten(-2), fns["feature"], fns["feature_error"])
                return None if new is None else new.unflatten(-1, x.shape[-2:])

            out.append((d.site, layer, tap))
            continue
        seen: dict = {}

        def read_in(mod, args, kwargs, seen=seen):
            seen["in"] = args[0] if args else kwargs["hidden_states"]

        def tap_tc(y, d=d, fns=fns, seen=seen):  # mlp_out [B, T, 1, d_model]
            b, t = shape.bt
            xin = seen.pop("in").reshape(b, t, -1)
            new = _rewrite(d, y[:, :, 0], xin, fns["feature"], fns["feature_error"])
            return None if new is None else new[:, :, None]

        pre.append((ad.blocks[layer].get_submodule(ad.family.readers[2]), read_in))
        out.append((d.writes, layer, tap_tc))
    return out, pre


@torch.no_grad()
def active(model, rows, comps, batch_size: int = 64) -> torch.Tensor:
    """Which latents of ``comps`` are on (non-zero) at their position in the clean or the corrupt
    run of some row [n] (non-latent components count as on). An off latent is 0 in both runs, so
    patching it changes nothing: its exact effect is 0 without a forward."""
    from causalscan.model import runner

    ad = model.adapter
    on = torch.ones(len(comps), dtype=torch.bool)
    latents = [j for j, c in enumerate(comps) if c.site == "feature"]
    if not latents:
        return on
    on[latents] = False
    layers = sorted({comps[j].layer for j in latents})
    embed = model.hf.get_input_embeddings().weight
    for idx in rows.batches(batch_size):
        b = rows.batch(idx, True, embed)
        any_on = {}
        for ids, noise in ((b.base, b.base_noise), (b.other, b.other_noise)):
            store: dict = {}
            runner.forward(ad, ids, [runner.capture(ad, "feature", layer, store) for layer in layers], noise=noise)
            for layer in layers:
                nz = store[("feature", layer)][..., 0] != 0  # [B, T, d_sae]
                any_on[layer] = nz if layer not in any_on else any_on[layer] | nz
        for j in latents:
            c = comps[j]
            nz = any_on[c.layer][:, :, c.index]  # [B, T]
            if c.position is None:
                hit = nz.any()
            else:
                pos = [rows.pairs[r].roles[c.position] if isinstance(c.position, str) else c.position for r in idx]
                hit = nz[torch.arange(len(idx)), torch.tensor(pos)].any()
            on[j] |= bool(hit)
    return on


def random_dictionary(
    model, site: str, layer: int, d_sae: int, architecture: str = "standard", seed: int = 0, k: int | None = None
) -> Dictionary:
    """A random dictionary at ``site`` of ``layer`` (tests, examples): unit-norm decoder rows,
    ``W_enc = W_dec.T``, a small negative encoder bias so that some latents are off."""
    ad = model.adapter
    gen = torch.Generator().manual_seed(seed)
    transcoder = "transcoder" in architecture
    d_in = ad.d_model if transcoder else _width(ad, site, "random")
    d_out = ad.d_model if transcoder else d_in
    w_dec = torch.randn(d_sae, d_out, generator=gen)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    w_enc = torch.randn(d_in, d_sae, generator=gen) / d_in**0.5 if transcoder else w_dec.T.clone()
    extra = {}
    if architecture in ("jumprelu", "jumprelu_transcoder"):
        extra["threshold"] = torch.rand(d_sae, generator=gen) * 0.1
    if architecture == "skip_transcoder":
        extra["W_skip"] = torch.randn(d_out, d_in, generator=gen) * 0.01
    if architecture == "gated":
        extra |= {
            "b_gate": torch.zeros(d_sae),
            "r_mag": torch.randn(d_sae, generator=gen) * 0.1,
            "b_mag": torch.randn(d_sae, generator=gen) * 0.1,
        }
    return Dictionary(
        architecture,
        "mlp_in" if transcoder else site,
        layer,
        w_enc,
        -0.1 * torch.rand(d_sae, generator=gen),
        w_dec,
        0.01 * torch.randn(d_out, generator=gen),
        k=k if architecture not in TOPK else (k or max(1, d_sae // 8)),
        apply_b_dec_to_input=not transcoder,
        out_site="mlp_out" if transcoder else None,
        name=f"random-{architecture}-L{layer}",
        **extra,
    )


__all__ = ["FEATURE_SITES", "active", "attach", "detach", "expand", "random_dictionary", "require_transcoders"]
