"""Train a small TopK sparse autoencoder, or a TopK transcoder, on a model's activations at one
layer (Gao et al. 2024; transcoders: Dunefsky et al. 2024).

Activations come from the prompts' forwards (the first position of each prompt, the attention sink
with its outsized norm, is left out; prompts are cut at ``max_len`` tokens); a tenth is held out.
An SAE reads and rebuilds one site, ``x`` [N, d_in]; a transcoder (site ``mlp_in``) reads the MLP's
input ``x`` and rebuilds its output ``y`` [N, d_out]. The dictionary: ``f = TopK(relu((x - b_dec)
W_enc + b_enc))`` (a transcoder subtracts no ``b_dec``), ``y_hat = f W_dec + b_dec``, ``b_dec``
started at the mean of ``y``, ``W_enc = W_dec.T`` at the start (a transcoder's random, unit
columns), unit-norm decoder rows after every step, Adam on the squared error plus the AuxK term
(the ``k_aux`` largest dead latents fit the residual ``y - y_hat``), which keeps latents from dying.
Reported on the held-out tokens: explained variance ``1 - sum |y - y_hat|^2 / sum |y - mean|^2`` and
the share of dead latents (never among a token's top k there).

>>> import causalscan as cs
>>> m = cs.load("induction")
>>> d, stats = train(m, "resid_pre", 1, 64, ["Mary are time before two seven"] * 40, k=8, epochs=2)
>>> d.architecture, d.d_sae, sorted(stats)[:3]
('topk', 64, ['d_sae', 'dead_share', 'epochs'])
"""

from __future__ import annotations

import math
import time

import torch

from causalscan.errors import InputError, check_number
from causalscan.model import runner
from causalscan.model.dictionary import Dictionary
from causalscan.progress import Progress, report

TRAIN_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_in")


@torch.no_grad()
def collect(
    model, site: str, layer: int, prompts: list[list[int]], max_tokens: int, max_len: int = 128, batch: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``x`` [N, d_in] and targets ``y`` [N, d_out] (float32, CPU) at ``layer`` over the
    prompts' positions 1 .. ``max_len`` - 1, up to ``max_tokens`` rows, prompts of one length per
    forward: ``site``'s activation twice (the same tensor), or for ``mlp_in`` the MLP's input and its
    output (``mlp_out``)."""
    from causalscan.data.prompts import by_length

    ad = model.adapter
    cut = [p[:max_len] for p in prompts if len(p) > 1]
    out_site = "mlp_out" if site == "mlp_in" else site
    xs, ys, n = [], [], 0
    for group in by_length(cut):
        for lo in range(0, len(group), batch):
            ids = torch.tensor([cut[i] for i in group[lo : lo + batch]], device=model.device)
            store: dict = {}
            handle = None
            if site == "mlp_in":
                mlp = ad.blocks[layer].get_submodule(ad.family.readers[2])
                handle = mlp.register_forward_pre_hook(
                    lambda mod, args, kwargs, store=store: store.__setitem__("in", runner.hidden_in(args, kwargs)),
                    with_kwargs=True,
                )
            try:
                runner.forward(ad, ids, [runner.capture(ad, out_site, layer, store)])
            finally:
                if handle is not None:
                    handle.remove()
            y = store[(out_site, layer)][:, 1:].flatten(2).flatten(0, 1).float().cpu()
            x = y if site != "mlp_in" else store["in"].reshape(*ids.shape, -1)[:, 1:].flatten(0, 1).float().cpu()
            xs.append(x)
            ys.append(y)
            n += len(x)
            if n >= max_tokens:
                break
        if n >= max_tokens:
            break
    x = torch.cat(xs)[:max_tokens]
    return x, (x if site != "mlp_in" else torch.cat(ys)[:max_tokens])


def _topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


def train(
    model,
    site: str,
    layer: int,
    d_sae: int,
    prompts: list,
    k: int = 32,
    tokens: int = 200_000,
    epochs: int = 4,
    lr: float | None = None,
    batch_size: int = 1024,
    max_len: int = 128,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[Dictionary, dict]:
    """A TopK SAE with ``d_sae`` latents and ``k`` active per token at ``site`` of ``layer`` (``mlp_in``:
    a TopK transcoder from the MLP's input to its output), trained on at most ``tokens`` activations
    of ``prompts`` (texts, or token-id lists) for ``epochs`` passes; returns it and its held-out
    statistics. ``lr``: Adam's step (default ``2e-4 / sqrt(d_sae / 16384)``, the TopK paper's scaling)."""
    ad = model.adapter
    transcoder = site == "mlp_in"
    if site not in TRAIN_SITES:
        raise InputError(f"trains at {', '.join(TRAIN_SITES)} (mlp_in: a transcoder), not {site}", field="site")
    ad.check_site("mlp_out" if transcoder else site, layer)
    check_number(d_sae, "d_sae", 1, 1 << 20, integer=True)
    check_number(k, "k", 1, d_sae, integer=True)
    check_number(tokens, "tokens", 16, 1 << 30, integer=True)
    check_number(epochs, "epochs", 1, 10_000, integer=True)
    t0 = time.perf_counter()
    ids = [model.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    x, y = collect(model, site, layer, ids, tokens, max_len)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    x, y = x[order], y[order]
    n_held = max(1, len(x) // 10)
    held, held_y, x, y = x[:n_held], y[:n_held], x[n_held:], y[n_held:]
    if len(x) < 2 * k:
        raise InputError(f"{len(x)} training tokens is too few for k={k}; give more prompts", field="data")
    w_dec = torch.randn(d_sae, y.shape[1], generator=gen)
    w_dec = torch.nn.Parameter(w_dec / w_dec.norm(dim=1, keepdim=True))
    if transcoder:
        w_enc = torch.randn(x.shape[1], d_sae, generator=gen)
        w_enc = torch.nn.Parameter(w_enc / w_enc.norm(dim=0, keepdim=True))
    else:
        w_enc = torch.nn.Parameter(w_dec.detach().T.clone())
    b_enc = torch.nn.Parameter(torch.zeros(d_sae))
    b_dec = torch.nn.Parameter(y.mean(0))
    shift = 0.0 if transcoder else b_dec  # an SAE reads x - b_dec
    lr = lr if lr is not None else 2e-4 / math.sqrt(d_sae / 16384)
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=lr, betas=(0.9, 0.999))
    k_aux = min(d_sae // 2, 2 * k)
    since = torch.zeros(d_sae)  # tokens since each latent last fired
    dead_after = max(batch_size * 8, len(x) // 4)
    var = (y - y.mean(0)).pow(2).sum(-1).mean()
    steps = epochs * math.ceil(len(x) / batch_size)
    step = 0
    for _epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for lo in range(0, len(x), batch_size):
            rows = order[lo : lo + batch_size]
            xb, yb = x[rows], y[rows]
            pre = (xb - shift) @ w_enc + b_enc
            f = _topk(pre, k)
            recon = f @ w_dec + b_dec
            err = yb - recon
            loss = err.pow(2).sum(-1).mean() / var
            fired = (f > 0).any(0)
            since += len(xb)
            since[fired] = 0
            dead = since > dead_after
            if dead.any():  # AuxK: the dead latents' top k_aux fit the residual
                pre_dead = pre.masked_fill(~dead, -math.inf)
                aux = _topk(pre_dead, min(k_aux, int(dead.sum())))
                loss = loss + (err.detach() - aux @ w_dec).pow(2).sum(-1).mean() / var / 32
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                w_dec /= w_dec.norm(dim=1, keepdim=True)
            step += 1
            report(progress, "sae train", step, steps)
    d = Dictionary(
        "topk_transcoder" if transcoder else "topk",
        site,
        layer,
        w_enc.detach().clone(),
        b_enc.detach().clone(),
        w_dec.detach().clone(),
        b_dec.detach().clone(),
        k=k,
        apply_b_dec_to_input=not transcoder,
        out_site="mlp_out" if transcoder else None,
        name=f"topk-{'transcoder' if transcoder else site}-L{layer}-{d_sae}",
    )
    stats = {
        **evaluate(d, held, held_y),
        "tokens": len(x),
        "held_out": n_held,
        "epochs": epochs,
        "k": k,
        "d_sae": d_sae,
        "lr": lr,
        "seconds": time.perf_counter() - t0,
    }
    return d, stats


@torch.no_grad()
def evaluate(d: Dictionary, x: torch.Tensor, y: torch.Tensor | None = None, batch: int = 4096) -> dict:
    """Explained variance of targets ``y`` [N, d_out] (default: the inputs ``x`` [N, d_in], an SAE's)
    and the share of dead latents (never on) of ``d`` on inputs ``x``."""
    y = x if y is None else y
    sse, fired, l0 = 0.0, torch.zeros(d.d_sae, dtype=torch.bool), 0.0
    for lo in range(0, len(x), batch):
        xb = x[lo : lo + batch]
        f, norm = d.encode(xb)
        sse += (y[lo : lo + batch] - d.decode(f, norm, xb)).pow(2).sum().item()
        fired |= (f > 0).any(0)
        l0 += (f > 0).sum().item()
    sst = (y - y.mean(0)).pow(2).sum().item()
    return {"explained_variance": 1 - sse / sst, "dead_share": 1 - fired.float().mean().item(), "l0": l0 / len(x)}


__all__ = ["collect", "evaluate", "train"]
