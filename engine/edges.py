"""Edge attribution (EAP, EAP-IG) and exact edge patching over a :class:`~causalscan.graph.Graph`.

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

**Exact edge patching** (path patching). Each row of a forward carries its own set of edges
``mask [B, n_up, n_read]``. A reader's input is rebuilt before its norm,
``x_r = x + sum_u mask[u, r] (w_other_u - w_u)``, where ``x`` and ``w_u`` are this forward's own
residual and writes: one edge changes its reader alone (everything upstream of it is the base
run's), and a set of edges composes as in the literature (auto-circuit): patching every edge
out of ``u`` is patching ``u``, and every edge of the graph gives the other run. The rebuilt input
goes through the reader's norm and only its own projection slice (q/k/v) or the MLP; the logits'
replaces the final norm's input.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import torch

from causalscan import runner
from causalscan.attribution import _Grad, frozen, graph_forward, input_path
from causalscan.graph import QKV, Graph
from causalscan.runner import _hidden_in, _with_hidden_in


def _write_taps(g: Graph, put: Callable[[int, torch.Tensor], None]) -> list[runner.TapSpec]:
    """Read-only taps handing each upstream write to ``put(u0, w [B, C, T, d])`` (nodes ``u0 .. u0 + C``)."""
    ad = g.ad

    def heads(layer):
        w_o, _ = ad.weight("head", layer)
        return lambda z: put(g.head(layer, 0), torch.einsum("btcD,cDd->bctd", z.detach(), w_o))

    def mlp(layer):
        return lambda x: put(g.mlp(layer), x[:, :, 0].detach()[:, None])

    taps = [("resid_pre", 0, lambda x: put(0, x[:, :, 0].detach()[:, None]))]
    for layer in range(ad.n_layers):
        taps += [("head", layer, heads(layer)), ("mlp_out", layer, mlp(layer))]
    return taps


def _store(g: Graph, store: dict, node_major: bool = False):
    """A ``put`` for :func:`_write_taps` filling ``store["w"]`` [B, n_up, T, d] (``node_major``:
    [n_up, B, T, d]), fp32."""

    def put(u0, w):
        if node_major:
            w = w.transpose(0, 1)
        if "w" not in store:
            n = (g.n_up, w.shape[1]) if node_major else (w.shape[0], g.n_up)
            store["w"] = w.new_zeros(*n, w.shape[2], w.shape[3], dtype=torch.float32)
        if node_major:
            store["w"][u0 : u0 + w.shape[0]] = w
        else:
            store["w"][:, u0 : u0 + w.shape[1]] = w

    return put


@contextmanager
def _pre_hooks(hooks: list[tuple[torch.nn.Module, Callable]]):
    """Forward pre-hooks ``fn(x) -> x'`` on the first input of each module, for the block's duration."""
    with ExitStack() as stack:
        for module, fn in hooks:

            def pre(mod, args, kwargs, fn=fn):
                new = fn(_hidden_in(args, kwargs))
                return None if new is None else _with_hidden_in(args, kwargs, new)

            stack.callback(module.register_forward_pre_hook(pre, with_kwargs=True).remove)
        yield


def _norm_inputs(g: Graph, store: dict) -> list[tuple[torch.nn.Module, Callable]]:
    """Pre-hooks keeping each block's norm inputs (``store[("attn"|"mlp", layer)]``, detached)."""
    hooks = []
    for layer in range(g.ad.n_layers):
        ln_attn, ln_mlp, _ = g.norms(layer)
        keys = [("attn", layer)] + [("mlp", layer)] * (ln_mlp is ln_attn)

        def keep(x, keys=keys):
            for k in keys:
                store[k] = x.detach()

        hooks.append((ln_attn, keep))
        if ln_mlp is not ln_attn:
            hooks.append((ln_mlp, lambda x, k=("mlp", layer): store.__setitem__(k, x.detach())))
    return hooks


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

        def hook(grad):  # [P, T, d] at the normed input ([P * T, d] in OPT)
            x = self.x[("mlp", layer)]
            self.add(self.g.reader("mlp", layer), norm_vjp(ln, x, grad.reshape(1, *x.shape)))

        return hook

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
) -> dict:
    """EAP (``ig_steps`` 0) or EAP-IG scores of every edge for pairs ``base_ids``/``other_ids`` [P, T].

    ``metric(logits [P, keep, V], clean_logprobs) -> [P]`` as in :func:`causalscan.attribution.attribute`.
    Returns ``{"scores": [n_up, n_read] summed over the pairs (0 off the graph), "base": [P],
    "other": [P]}``.
    """
    ad = g.ad
    with torch.no_grad():
        other = {}
        other_logits = runner.forward(
            ad, other_ids, _write_taps(g, _store(g, other, True)), noise=other_noise, logits_to_keep=keep
        )
    acc = _EdgeScores(g, base_ids.device)
    steps = max(ig_steps, 1)
    acc.weight = 1.0 / steps
    grads = [(site, layer, _Grad.tap(acc.qkv_hook(site, layer))) for layer in range(ad.n_layers) for site in QKV]
    hooks = _norm_inputs(g, acc.x)
    hooks += [(g.norms(layer)[2], _Grad.tap(acc.mlp_hook(layer))) for layer in range(ad.n_layers)]
    hooks += [(g.final_norm(), _Grad.tap(acc.logits_hook))]
    with frozen(ad.model), torch.enable_grad(), _pre_hooks(hooks):
        for k, noise in enumerate(input_path(ad, base_ids, other_ids, base_noise, other_noise, steps)):
            base = {}
            logits = graph_forward(
                ad, base_ids, grads + (_write_taps(g, _store(g, base, True)) if k == 0 else []), noise, keep
            )
            if k == 0:
                acc.delta = other.pop("w").sub_(base.pop("w"))
                clean_logprobs = (logits.detach() if base_is_clean else other_logits).float().log_softmax(-1)
            m = metric(logits, clean_logprobs)
            m.sum().backward()
            if k == 0:
                base_m = m.detach()
    with torch.no_grad():
        other_m = metric(other_logits, clean_logprobs)
    return {"scores": acc.scores.cpu(), "base": base_m.float().cpu(), "other": other_m.float().cpu()}


class Recorded(NamedTuple):
    """A plain forward's logits ``[B, keep, V]``, upstream writes ``[B, n_up, T, d_model]`` (fp32) and,
    if asked, the residual entering each block ``[B, L, T, d_model]`` (model dtype)."""

    logits: torch.Tensor
    writes: torch.Tensor
    resid: torch.Tensor | None = None


@torch.no_grad()
def record(
    g: Graph, ids: torch.Tensor, noise: torch.Tensor | None = None, keep: int = 1, resid: bool = False
) -> Recorded:
    """One plain forward of ``ids`` [B, T] keeping what edge patching starts from."""
    store, res = {}, {}
    taps = _write_taps(g, _store(g, store))
    if resid:
        taps += [runner.capture(g.ad, "resid_pre", layer, res) for layer in range(g.ad.n_layers)]
    logits = runner.forward(g.ad, ids, taps, noise=noise, logits_to_keep=keep)
    blocks = torch.stack([res[("resid_pre", layer)][:, :, 0] for layer in range(g.ad.n_layers)], 1) if resid else None
    return Recorded(logits, store["w"], blocks)


def start_layer(g: Graph, mask: torch.Tensor) -> int:
    """The first block an edge set ``[n_up, n_read]`` changes (its earliest reader's layer)."""
    read = mask.any(0).nonzero()
    return min(int(read.min()) // g.per_layer, g.ad.n_layers - 1) if len(read) else g.ad.n_layers - 1


class _Patch:
    """The state of one edge-patched forward: ``diff = w_other - w`` as the forward writes it, the
    norm inputs, and the per-row edge sets."""

    def __init__(
        self,
        g: Graph,
        other: torch.Tensor,
        mask: torch.Tensor,
        pair: torch.Tensor,
        skipped: int,
        base_diff: torch.Tensor | None,
    ):
        self.g, self.other, self.pair, self.mask = g, other, pair.to(other.device), mask.to(other.device)
        self.active = mask.any(1)  # [B, n_read] bool, on the host: which rows rebuild which reader
        # nodes before ``skipped`` keep the base run's difference (per pair); the rest are written by
        # the forward (per row) before any reader reads them: no zero fill
        self.skipped, self.base_diff = skipped, base_diff
        self.diff = other.new_empty(len(pair), other.shape[1] - skipped, *other.shape[2:])
        self.x: dict = {}

    def wrote(self, u0: int, w: torch.Tensor) -> None:  # w [B, C, T, d]
        if u0 >= self.skipped:
            u = u0 - self.skipped
            self.diff[:, u : u + w.shape[1]] = self.other[self.pair, u0 : u0 + w.shape[1]] - w.float()

    def shift(self, r0: int, r1: int) -> torch.Tensor:
        """``[r1 - r0, B, T, d]``: what readers ``r0 .. r1`` add to their input, per row."""
        k, k0 = int(self.g.prefix[r0]), self.skipped
        m = self.mask[:, :k, r0:r1]
        nz = m.nonzero()
        if len(nz) <= m.shape[0] * m.shape[2]:  # sparse edge sets (confirmation): add the few differences
            b, u, r = nz.unbind(1)
            early = u < k0
            val = self.diff.new_empty(len(nz), *self.diff.shape[2:])
            val[early] = self.base_diff[self.pair[b[early]], u[early]] if k0 else val[early]
            val[~early] = self.diff[b[~early], u[~early] - k0]
            out = self.diff.new_zeros(r1 - r0, len(self.pair), *self.diff.shape[2:])
            return out.index_put_((r, b), val, accumulate=True)
        m = m.to(self.diff.dtype).transpose(1, 2)  # [B, R, k]: one batched matrix product per part
        t_d = self.diff.shape[2:]
        out = torch.bmm(m[:, :, k0:], self.diff[:, : max(k - k0, 0)].flatten(2))
        if k0:
            out += torch.bmm(m[:, :, :k0], self.base_diff[self.pair, : min(k, k0)].flatten(2))
        return out.transpose(0, 1).unflatten(2, t_d)

    def qkv_tap(self, site: str, layer: int):
        g = self.g
        r0 = g.reader(site, layer)
        n = g.ad.shape(site)[0]
        w, bias = g.ad.weight(site, layer)
        ln = g.norms(layer)[0]

        def tap(view):  # [B, T, C, D] projection output
            act = self.active[:, r0 : r0 + n]
            if not act.any():
                return None
            delta = self.shift(r0, r0 + n)
            x = self.x[("attn", layer)]
            out = view.clone()
            for c in act.any(0).nonzero().flatten().tolist():
                rows = act[:, c].nonzero().flatten().to(view.device)
                y = ln.forward(x[rows] + delta[c, rows].to(x.dtype)) @ w[:, c]
                out[rows, :, c] = y if bias is None else y + bias[c]
            return out

        return tap

    def mlp_hook(self, layer: int):
        r = self.g.reader("mlp", layer)
        ln = self.g.norms(layer)[1]

        def hook(normed):  # [B, T, d] ([B * T, d] in OPT)
            rows = self.active[:, r].nonzero().flatten()
            if not len(rows):
                return None
            x = self.x[("mlp", layer)].reshape(len(self.pair), self.other.shape[2], -1)
            rows = rows.to(normed.device)
            out = normed.reshape(x.shape).clone()
            out[rows] = ln.forward(x[rows] + self.shift(r, r + 1)[0, rows].to(x.dtype))
            return out.reshape(normed.shape)

        return hook

    def logits_hook(self, x):
        r = self.g.n_read - 1
        if not self.active[:, r].any():
            return None
        return x + self.shift(r, r + 1)[0].to(x.dtype)


@torch.no_grad()
def patched_logits(
    g: Graph,
    base_ids: torch.Tensor,
    other: torch.Tensor,
    mask: torch.Tensor,
    keep: int = 1,
    base_noise: torch.Tensor | None = None,
    pair: torch.Tensor | None = None,
    start: int = 0,
    resid: torch.Tensor | None = None,
    base_diff: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``[B, keep, V]`` of the base rows ``base_ids`` [B, T] with the edges of ``mask``
    ``[B, n_up, n_read]`` (bool) taking the other run's writes ``other[pair]`` (``other``
    ``[P, n_up, T, d]`` per pair, ``pair`` [B] each row's; default: row b is pair b).

    ``start`` > 0 (no reader of ``mask`` before that block): the forward starts there from the base
    residual ``resid`` [B, T, d], and ``base_diff`` [P, n_up, T, d] (``other`` minus the base run's
    writes) gives the differences of the nodes written before it.
    """
    ad = g.ad
    pair = torch.arange(len(base_ids)) if pair is None else pair
    st = _Patch(g, other, mask, pair, g.head(start, 0) if start else 0, base_diff)
    taps = _write_taps(g, st.wrote) + [
        (site, layer, st.qkv_tap(site, layer)) for layer in range(ad.n_layers) for site in QKV
    ]
    hooks = _norm_inputs(g, st.x)
    hooks += [(g.norms(layer)[2], st.mlp_hook(layer)) for layer in range(ad.n_layers)]
    hooks += [(g.final_norm(), st.logits_hook)]
    with _pre_hooks(hooks):
        return runner.forward(ad, base_ids, taps, noise=base_noise, logits_to_keep=keep, start_layer=start, resid=resid)
