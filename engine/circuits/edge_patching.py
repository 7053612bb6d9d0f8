"""Exact edge patching (path patching) over a :class:`~causalscan.circuits.graph.Graph`.

Each row of a forward carries its own set of edges ``mask [B, n_up, n_read]``. A reader's input is
rebuilt before its norm, ``x_r = x + sum_u mask[u, r] (w_other_u - w_u)``, where ``x`` and ``w_u`` are
this forward's own residual and writes: one edge changes its reader alone (everything upstream of
it is the base run's), and a set of edges composes as in the literature (auto-circuit): patching
every edge out of ``u`` is patching ``u``, and every edge of the graph gives the other run. The
rebuilt input goes through the reader's norm and only its own projection slice (q/k/v) or the
MLP; the logits' replaces the final norm's input.

:func:`measure` runs groups of edges (one edge each for confirmation, a circuit's complement for
faithfulness) over a dataset's rows, bucket by bucket, many (pair, group) rows per forward, each
forward started at the earliest block its edge sets change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from causalscan import memplan
from causalscan.circuits.edge_plan import EdgeWork, planned, units
from causalscan.circuits.graph import QKV, Graph, latent_writes, norm_inputs, pre_hooks, store_writes, write_taps
from causalscan.data.inputs import Inputs
from causalscan.model import runner
from causalscan.progress import Progress, report


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
    taps = write_taps(g, store_writes(g, store))
    if resid:
        taps += [runner.capture(g.ad, "resid_pre", layer, res) for layer in range(g.ad.n_layers)]
    logits = runner.forward(g.ad, ids, taps, noise=noise, logits_to_keep=keep)
    blocks = torch.stack([res[("resid_pre", layer)][:, :, 0] for layer in range(g.ad.n_layers)], 1) if resid else None
    return Recorded(logits, store["w"], blocks)


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
            early, late = (u < k0).nonzero()[:, 0], (u >= k0).nonzero()[:, 0]  # index lists, not masks: no
            val = self.diff.new_empty(len(nz), *self.diff.shape[2:])  # data-dependent shape on fake weights
            if k0:
                val[early] = self.base_diff[self.pair[b[early]], u[early]]
            val[late] = self.diff[b[late], u[late] - k0]
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

    def latent_tap(self, layer: int):
        """The MLP output of a layer with latent nodes, rebuilt. The rest's reader is the MLP's input
        (:meth:`mlp_hook` rebuilds it for its rows: the MLP's output there is the patched one); each
        latent reader recomputes its latent from its own input, ``f_j(norm(x + shift_j))``; every
        other latent keeps its unpatched value. The output is the rest (the MLP's output minus its
        input's latent writes) plus the latents' writes, handed on as this forward's writes."""
        g, st = self.g, self
        r0, js = g.reader("mlp", layer), g.latents[layer]
        ln = g.norms(layer)[1]

        def tap(view):  # mlp_out [B, T, 1, d]
            y = view[:, :, 0]
            b, t = y.shape[:2]
            d = g.ad.dictionaries[layer].like(y)
            f_in = d.encode(st.x[("mlp_in", layer)].reshape(b, t, -1))[0][..., js]  # the MLP's actual input
            rest_patched = st.active[:, r0].any()
            if rest_patched:  # the latents of the input before the rest's patch
                f = d.encode(st.x[("mlp_in0", layer)].reshape(b, t, -1))[0][..., js]
            else:  # the same input
                f = f_in
            act = st.active[:, r0 + 1 : r0 + 1 + len(js)]  # [B, n]: the latents' readers
            if act.any():
                delta = st.shift(r0 + 1, r0 + 1 + len(js))
                x = st.x[("mlp", layer)].reshape(b, t, -1)
                f = f.clone()
                for c in act.any(0).nonzero().flatten().tolist():
                    rows = act[:, c].nonzero().flatten().to(y.device)
                    f[rows, :, c] = d.encode(ln.forward(x[rows] + delta[c, rows].to(x.dtype)))[0][..., js[c]]
            rest = latent_writes(g, layer, y, f_in)[0]
            writes = latent_writes(g, layer, y, f)[1]
            st.wrote(g.mlp(layer), rest)
            st.wrote(g.latent(layer, 0), writes)
            if not (act.any() or rest_patched):  # nothing patched here: f is f_in
                return None
            return (y + torch.einsum("btn,nd->btd", f - f_in, d.W_dec[js]))[:, :, None]

        return tap

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
    taps = write_taps(g, st.wrote, skip=True) + [
        (site, layer, st.qkv_tap(site, layer)) for layer in range(ad.n_layers) for site in QKV
    ]
    taps += [("mlp_out", layer, st.latent_tap(layer)) for layer in g.latents]
    hooks = norm_inputs(g, st.x)
    for layer in range(ad.n_layers):  # in order on each MLP: its input, the rest's patch, the patched input
        mlp = g.norms(layer)[2]
        if layer in g.latents:
            hooks.append((mlp, _keep(st.x, ("mlp_in0", layer))))
        hooks.append((mlp, st.mlp_hook(layer)))
        if layer in g.latents:
            hooks.append((mlp, _keep(st.x, ("mlp_in", layer))))
    hooks += [(g.final_norm(), st.logits_hook)]
    with pre_hooks(hooks):
        return runner.forward(ad, base_ids, taps, noise=base_noise, logits_to_keep=keep, start_layer=start, resid=resid)


def _keep(store: dict, key):
    """A pre-hook keeping its input in ``store[key]``."""
    return lambda x: store.__setitem__(key, x)


def patch_units(
    model,
    rows,
    metric_fn,
    groups: Sequence[torch.Tensor],
    base_is_clean: bool,
    ablation: str,
    work: EdgeWork,
    latents: dict | None = None,
):
    """``compute((b, lo))``: the metric [rows] of the forward of bucket ``b``'s cells ``lo .. lo + chunk``
    (each row one (pair, group of edges)); the bucket's two recorded runs are kept for its next units
    (``latents``: the graph's latent nodes)."""
    g = Graph(model.adapter, latents)
    embed = model.hf.get_input_embeddings().weight
    cached: dict = {}

    @torch.no_grad()
    def compute(unit: tuple[int, int]) -> torch.Tensor:
        b_id, lo = unit
        idx, cells, chunk = work[b_id]
        if b_id not in cached:
            cached.clear()  # one bucket at a time: units come bucket by bucket
            b = rows.batch(idx, base_is_clean, embed)
            other_run = record(g, b.other, b.other_noise, rows.keep)
            base_run = record(g, b.base, b.base_noise, rows.keep, resid=True)
            clean_lp = (base_run if base_is_clean else other_run).logits.float().log_softmax(-1)
            other = other_run.writes
            if ablation == "mean":
                other = other.mean(0, keepdim=True).expand_as(other)
            cached[b_id] = (b, other, base_run.resid, other - base_run.writes, clean_lp)
        b, other, resid, base_diff, clean_lp = cached[b_id]
        part = cells[lo : lo + chunk]
        layer = part[0][0]  # the earliest start of the chunk: every row runs from there
        j, i = torch.tensor([c[1] for c in part]), torch.tensor([c[2] for c in part])
        noise = None if b.base_noise is None else b.base_noise[i]
        logits = patched_logits(
            g,
            b.base[i],
            other,
            torch.stack([groups[x] for x in j.tolist()]),
            rows.keep,
            noise,
            i,
            layer,
            resid[i, layer] if layer else None,
            base_diff,
        )
        return metric_fn(logits, b.labels.take(i), clean_lp[i]).float().cpu()

    return compute


@torch.no_grad()
def measure(
    inp: Inputs,
    g: Graph,
    groups: Sequence[torch.Tensor],
    base_is_clean: bool,
    ablation: str,
    memory_budget: int | None = None,
    progress: Progress | None = None,
    stage: str = "patch",
    work: EdgeWork | None = None,
) -> torch.Tensor:
    """The metric ``[P, G]`` of the base run with each group of edges (a ``[n_up, n_read]`` bool mask)
    taking the other run's writes (``ablation="mean"``: their mean over the rows), per pair, in this
    process; ``work``: the plan (:func:`planned`), if made already."""
    rows = inp.rows
    work = planned(inp, g, groups, memory_budget) if work is None else work
    out = torch.empty(len(rows.pairs), len(groups))
    todo = units(work)
    compute = patch_units(inp.model, rows, inp.metric_fn, groups, base_is_clean, ablation, work, g.latents)
    for done, (b, lo) in enumerate(todo, start=1):
        idx, cells, chunk = work[b]
        part = cells[lo : lo + chunk]
        j, i = torch.tensor([c[1] for c in part]), torch.tensor([c[2] for c in part])
        out[torch.tensor(idx)[i], j] = compute((b, lo))
        report(progress, stage, done, len(todo))
    return rows.mean(out)


def memory_stage(
    plan: memplan.Plan,
    inp: Inputs,
    g: Graph,
    groups: Sequence[torch.Tensor],
    base_is_clean: bool,
    ablation: str,
    work: EdgeWork,
    name: str,
) -> None:
    """Add the stage ``name`` of measuring ``groups`` to ``plan``: the first forward of the longest bucket."""
    if not groups:
        return
    b = max(range(len(work)), key=lambda k: len(inp.rows.pairs[work[k][0][0]].clean))
    args = (inp.rows, inp.metric_fn, groups, base_is_clean, ablation, work, g.latents)
    plan.stages[name] = memplan.simulate(inp.model, patch_units, args, (b, 0))
    plan.chunks[f"rows per {name} forward"] = max(chunk for *_, chunk in work)
