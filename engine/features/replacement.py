"""The local replacement model of one prompt (circuit-tracer's): each MLP's output made of its
transcoder's latents, their error and the skip path (or the MLP's whole output as an error where no
transcoder sits), with the latents, errors and the token embeddings as autograd leaves, and the
forward the model's own. Held linear by :mod:`causalscan.model.relevance` (``cp`` attention, norm
scales) around it: see :mod:`causalscan.features.attribution_graph`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from causalscan.model import runner
from causalscan.model.load import Model


@dataclass
class Replacement:
    """One forward of the local replacement model over B copies of a prompt [T]: its leaves, the
    latents' pre-activations and the logits, all on one graph."""

    embed: torch.Tensor  # [B, T, d_model] leaf
    latents: dict  # layer -> [B, T, d_sae] leaf (the activations)
    errors: dict  # layer -> [B, T, d_model] leaf
    pre: dict  # layer -> [B, T, d_sae]: the encoders' inputs (targets)
    logits: torch.Tensor  # [B, V] at the last position, before any soft cap


def replacement(model: Model, ids: torch.Tensor, copies: int) -> Replacement:
    """The local replacement model's forward of ``ids`` [T] in ``copies`` rows (see the module doc);
    run it inside ``relevance.rules(ad, "cp")`` and with the parameters frozen."""
    ad = model.adapter
    t = ids.shape[0]
    got: dict = {"latents": {}, "errors": {}, "pre": {}, "in": {}}

    def leaf(x: torch.Tensor) -> torch.Tensor:
        return x.detach().clone().requires_grad_()

    def embed(x):  # [B, T, 1, d]
        got["embed"] = leaf(x[:, :, 0])
        return got["embed"][:, :, None]

    def mlp_out(layer: int):
        d = ad.dictionaries.get(layer)

        def tap(y):  # [B, T, 1, d]
            y = y[:, :, 0]
            if d is None:
                got["errors"][layer] = err = leaf(y)
                return err[:, :, None]
            x = got["in"].pop(layer).reshape(copies, t, -1)  # the MLP's input, on the graph
            dd = d.like(x)
            norm = dd.normalise(x.detach())  # the dictionary's own normalisation, held too
            got["pre"][layer] = dd.pre(x, norm)
            f = leaf(dd.encode(x.detach())[0])
            skip = x @ dd.W_skip.T if dd.W_skip is not None else None
            got["latents"][layer] = f
            got["errors"][layer] = err = leaf(y - f.detach() @ dd.W_dec - (0.0 if skip is None else skip.detach()))
            # the MLP's own output in value (bit for bit); in the backward the latents, the skip and the error
            out = y.detach() + (f - f.detach()) @ dd.W_dec + (err - err.detach())
            return (out if skip is None else out + (skip - skip.detach()))[:, :, None]

        return tap

    def keep_in(layer):
        def hook(mod, args, kwargs):
            got["in"][layer] = runner.hidden_in(args, kwargs)

        return hook

    def keep_logits(mod, args, out):
        got["logits"] = out[:, -1]

    handles = [model.hf.get_output_embeddings().register_forward_hook(keep_logits)]
    for layer in ad.dictionaries:
        mlp = ad.blocks[layer].get_submodule(ad.family.readers[2])
        handles.append(mlp.register_forward_pre_hook(keep_in(layer), with_kwargs=True))
    taps = [("resid_pre", 0, embed)] + [("mlp_out", layer, mlp_out(layer)) for layer in range(ad.n_layers)]
    try:
        runner.forward(ad, ids.expand(copies, t), taps)
    finally:
        for h in handles:
            h.remove()
    return Replacement(got["embed"], got["latents"], got["errors"], got["pre"], got["logits"])


@torch.no_grad()
def probe(model: Model, ids: torch.Tensor) -> dict:
    """A plain forward: the active latents ``features`` [n, 3] (layer, position, latent) in that
    order, their ``activations`` [n] and the next-token ``probs`` [V] at the last position."""
    ad = model.adapter
    store: dict = {}
    taps = [runner.capture(ad, "feature", layer, store) for layer in sorted(ad.dictionaries)]
    logits = runner.forward(ad, ids[None], taps)
    feats, acts = [], []
    for layer in sorted(ad.dictionaries):
        f = store[("feature", layer)][0, :, :, 0]  # [T, d_sae]
        nz = f.nonzero()
        feats.append(torch.cat([torch.full((len(nz), 1), layer, device=nz.device), nz], 1))
        acts.append(f[nz[:, 0], nz[:, 1]])
    return {
        "features": torch.cat(feats).cpu(),
        "activations": torch.cat(acts).float().cpu(),
        "probs": logits[0, -1].float().softmax(-1).cpu(),
    }


__all__ = ["Replacement", "probe", "replacement"]
