"""Edge attribution (EAP, EAP-IG) over a :class:`~causalscan.circuits.graph.Graph`, batch by batch over a
dataset.

**Writes.** A forward's upstream writes ``[B, n_up, T, d_model]`` are read at the runner's taps:
the residual entering block 0 (``embed``), each head's ``z_h @ W_O[h]`` at the output projection's
input (its bias is shared by every run, so it never enters a difference) and each MLP's output.

**EAP.** ``score(u -> r) = sum_{b,t} (w_other_u - w_base_u) . dM/dx_r``, with ``x_r`` reader ``r``'s
input before its norm. One forward of each run and one backward: the gradient at a q/k/v
projection's output ``[P, T, C, D]`` becomes, per component, the gradient at the normed input
(``g @ W[:, c]^T``) and then at the norm's input (the norm's vector-Jacobian product, all
components of a site stacked in one call); the MLP's reader is taken at its normed input the same
way and the logits' at the final norm's input directly. Each reader gradient is reduced against
the differences of every upstream node it sees as it passes (one matrix product per site and
layer) and dropped: no gradient cache. EAP-IG averages over ``ig_steps`` runs whose embeddings
are ``e_base + (k / N) (e_other - e_base)``, k = 0..N-1 (as node AtP-IG; N = 1 is EAP).

Exact edge patching: :mod:`causalscan.circuits.edge_patching`. The writes and readers are read
where :mod:`causalscan.circuits.graph` says.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from causalscan.checkpoint import Checkpoint, run
from causalscan.circuits.graph import QKV, Graph, norm_inputs, pre_hooks, store_writes, write_taps
from causalscan.data.corruption import Rows
from causalscan.data.inputs import Inputs
from causalscan.executor import get as executor_get
from causalscan.model import relevance, runner
from causalscan.model.load import Model
from causalscan.model.taps import Grad, integrated_gradients
from causalscan.progress import Progress


def norm_vjp(norm: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad [C, B, T, d]`` at ``norm(x)`` -> at ``x [B, T, d]``, each of the C rows on its own (one
    stacked call of the norm's own forward, hooks bypassed)."""
    with torch.enable_grad():
        xs = x.detach().expand(grad.shape[0], *x.shape).clone().requires_grad_()
        return torch.autograd.grad(norm.forward(xs), xs, grad.to(x.dtype))[0]


class _EdgeScores:
    """``scores [n_up, n_read]`` (summed over rows, each backward's share times ``weight``), filled by
    the reader hooks of a base run's backward against ``delta`` ``[n_up, P, T, d]`` (node-major)."""

    def __init__(self, g: Graph, device):
        self.g, self.scores, self.weight = g, torch.zeros(g.n_up, g.n_read, device=device), 1.0
        self.delta: torch.Tensor | None = None
        self.x: dict = {}  # norm inputs of the running forward
        self.seen: dict = {}  # latents (forward) and MLP-output gradients (backward) of latent layers

    def add(self, r0: int, grad_x: torch.Tensor) -> None:
        """Reader gradients ``[C, P, T, d]`` at readers ``r0 .. r0 + C`` against every node they see."""
        k = int(self.g.prefix[r0])
        d = self.delta[:k].flatten(1)  # [k, P * T * d], contiguous: one matrix product
        self.scores[:k, r0 : r0 + grad_x.shape[0]] += self.weight * (d @ grad_x.reshape(grad_x.shape[0], -1).float().T)

    def qkv_hook(self, site: str, layer: int):
        ad, g = self.g.ad, self.g
        w, _ = ad.weight(site, layer)
        ln = g.norms(layer)[0]

        def hook(grad):  # [P, T, C, D] at the projection's output
            normed = torch.einsum("ptcD,dcD->cptd", grad, w)
            self.add(g.reader(site, layer), norm_vjp(ln, self.x[("attn", layer)], normed))

        return hook

    def mlp_hook(self, layer: int):
        ln = self.g.norms(layer)[1]
        js = self.g.latents.get(layer)

        def hook(grad):  # [P, T, d] at the normed input ([P * T, d] in OPT)
            x = self.x[("mlp", layer)]
            grad = grad.reshape(1, *x.shape)
            if js:  # latent j's reader: (dM/dy . W_dec[j]) W_enc[:, j] where j is on; the rest's: the remainder
                d = self.g.ad.dictionaries[layer].like(grad)
                f, gy = self.seen.pop(("f", layer)), self.seen.pop(("gy", layer))
                a = (gy @ d.W_dec[js].T) * (f[..., js] > 0)  # [P, T, n]
                lat = torch.einsum("ptn,dn->nptd", a, d.W_enc[:, js])
                grad = torch.cat([grad - lat.sum(0, keepdim=True), lat])
            self.add(self.g.reader("mlp", layer), norm_vjp(ln, x, grad))

        return hook

    def latent_taps(self, layer: int) -> list[runner.TapSpec]:
        """What a layer with latent nodes keeps of the base run: its latents (forward) and the
        gradient at the MLP's output (backward, before the MLP input's)."""

        def keep_f(f):  # [P, T, d_sae, 1]
            self.seen[("f", layer)] = f[..., 0].detach()

        def keep_gy(grad):  # [P, T, 1, d]
            self.seen[("gy", layer)] = grad[:, :, 0]

        return [("feature", layer, keep_f), ("mlp_out", layer, Grad.tap(keep_gy))]

    def logits_hook(self, grad):
        self.add(self.g.n_read - 1, grad[None])


def attribute(
    g: Graph,
    base_ids: torch.Tensor,
    other_ids: torch.Tensor,
    metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    base_is_clean: bool = True,
    base_noise: torch.Tensor | None = None,
    other_noise: torch.Tensor | None = None,
    keep: int = 1,
    ig_steps: int = 0,
    rules: str | None = None,
) -> dict:
    """EAP (``ig_steps`` 0) or EAP-IG scores of every edge for pairs ``base_ids``/``other_ids`` [P, T].

    ``metric(logits [P, keep, V], clean_logprobs) -> [P]`` as in
    :func:`causalscan.patching.attribution.attribute`.
    Returns ``{"scores": [n_up, n_read] summed over the pairs (0 off the graph), "base": [P],
    "other": [P]}``. ``rules``: RelP's attention rule (:mod:`causalscan.model.relevance`; one step):
    EAP with the relevance rules in the backward.
    """
    ad = g.ad
    with torch.no_grad():
        other = {}
        other_logits = runner.forward(
            ad, other_ids, write_taps(g, store_writes(g, other, True)), noise=other_noise, logits_to_keep=keep
        )
    acc = _EdgeScores(g, base_ids.device)
    steps = max(ig_steps, 1)
    acc.weight = 1.0 / steps
    grads = [(site, layer, Grad.tap(acc.qkv_hook(site, layer))) for layer in range(ad.n_layers) for site in QKV]
    grads += [t for layer in g.latents for t in acc.latent_taps(layer)]
    hooks = norm_inputs(g, acc.x)
    hooks += [(g.norms(layer)[2], Grad.tap(acc.mlp_hook(layer))) for layer in range(ad.n_layers)]
    hooks += [(g.final_norm(), Grad.tap(acc.logits_hook))]
    base: dict = {}

    def taps(k: int) -> list[runner.TapSpec]:  # the base run's writes at the first step
        return grads + (write_taps(g, store_writes(g, base, True)) if k == 0 else [])

    def first() -> None:
        acc.delta = other.pop("w").sub_(base.pop("w"))

    with pre_hooks(hooks), relevance.rules(ad, rules) if rules else nullcontext():
        base_m, clean_logprobs = integrated_gradients(
            ad,
            base_ids,
            other_ids,
            metric,
            taps,
            steps,
            other_logits,
            base_is_clean,
            base_noise,
            other_noise,
            keep,
            first,
        )
    with torch.no_grad():
        other_m = metric(other_logits, clean_logprobs)
    return {"scores": acc.scores.cpu(), "base": base_m.float().cpu(), "other": other_m.float().cpu()}


def estimate(
    inp: Inputs,
    g: Graph,
    noising: bool,
    batch_size: int,
    ig_steps: int,
    progress: Progress | None = None,
    ck: Checkpoint | None = None,
    executor=None,
    rules: str | None = None,
) -> dict:
    """Edge scores ``[n_up, n_read]`` (mean over pairs) and the ``clean``/``corrupt`` metrics [P], one
    batch at a time on ``executor``; the running sums resumed from and written to ``ck`` as it goes."""
    per_row, n = 1.0 / inp.rows.samples, len(inp.pairs)
    sums = {"scores": torch.zeros(g.n_up, g.n_read), "clean": torch.zeros(n), "corrupt": torch.zeros(n)}

    def add(sums, part):
        sums["scores"] += per_row * part["scores"]
        sums["clean"].index_add_(0, part["owner"], per_row * part["clean"])
        sums["corrupt"].index_add_(0, part["owner"], per_row * part["corrupt"])

    stage = (inp.rows, inp.metric_fn, noising, batch_size, ig_steps, rules, g.latents)
    sums = run(
        ck,
        sums,
        len(inp.rows.batches(batch_size)),
        lambda todo: executor_get(executor).map(inp.model, edge_units, stage, todo),
        add,
        progress,
    )
    return {"scores": sums["scores"] / n, "clean": sums["clean"], "corrupt": sums["corrupt"]}


def edge_units(
    model: Model,
    rows: Rows,
    metric_fn,
    noising: bool,
    batch_size: int,
    ig_steps: int,
    rules: str | None = None,
    latents: dict | None = None,
):
    """``compute(i)``: the edge scores of attribution batch ``i`` summed over its rows ``[n_up, n_read]``,
    its rows' ``clean``/``corrupt`` metrics [B] and their pairs ``owner`` [B] (``latents``: the graph's
    latent nodes)."""
    g = Graph(model.adapter, latents)
    embed = model.hf.get_input_embeddings().weight
    batches = rows.batches(batch_size)

    def compute(i: int) -> dict:
        b = rows.batch(batches[i], noising, embed)
        out = attribute(
            g,
            b.base,
            b.other,
            lambda logits, lp: metric_fn(logits, b.labels, lp),
            noising,
            b.base_noise,
            b.other_noise,
            rows.keep,
            ig_steps,
            rules,
        )
        clean, corrupt = (out["base"], out["other"]) if noising else (out["other"], out["base"])
        return {
            "scores": out["scores"].cpu(),
            "clean": clean.cpu(),
            "corrupt": corrupt.cpu(),
            "owner": rows.owner[batches[i]],
        }

    return compute
