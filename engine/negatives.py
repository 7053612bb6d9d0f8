"""AtP* false-negative diagnostic: how large could the effect of a node the scan did not confirm be?

Random subsets of the unconfirmed nodes (each node in with probability ``p``) are patched jointly,
one subset per batch row, from the other run into the base run. Each node's effect is estimated as
``mean(effect | node in) - mean(effect | node out)`` over subsets; a one-sided 95% t bound on
its magnitude, maximised over nodes, bounds the effect any missed node could have. Interactions
between jointly patched nodes loosen it: it is a diagnostic, not a guarantee.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from causalscan import runner
from causalscan.bindings import ops
from causalscan.corruption import Rows

# one-sided 95% Student t quantiles, df = 1..30; 1.645 beyond
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761, 1.753,
        1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697)


def t95(df: int) -> float:
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.645 if df > 0 else math.inf


@torch.no_grad()
def false_negative_bound(res, model, rows: Rows, metric_fn, n_subsets: int, p: float = 0.1, seed: int = 0,
                         rows_per_forward: int = 64) -> dict:
    """Joint random patches of the unconfirmed nodes of scan result ``res``, measured with the scan's
    ``metric_fn`` (the signature of :mod:`causalscan.metrics`) on the scan's ``rows`` (of the first
    token length); returns the bound.

    ``{"bound": float, "node": str, "subsets": S, "p": p, "nodes": N}``; ``bound`` is the largest
    over nodes of ``|diff| + t95 * se`` (mean effect over pairs, metric units).
    """
    ad, dev = model.adapter, model.device
    n = len(res.components)
    keep = torch.ones(n, dtype=torch.bool)
    if res.confirmed is not None:
        keep[res.confirmed] = False
    nodes = keep.nonzero()[:, 0]
    g = torch.Generator().manual_seed(seed + 1)
    member = torch.rand(n_subsets, len(nodes), generator=g) < p  # [S, N]
    seq = min(len(x.clean) for x in rows.pairs)
    idx = [i for i, x in enumerate(rows.pairs) if len(x.clean) == seq]
    noising = res.direction == "noising"
    b = rows.batch(idx, noising, model.hf.get_input_embeddings().weight)
    base_ids, base_noise = b.base, b.base_noise
    comps = [res.components[j] for j in nodes.tolist()]
    sources = sorted({(c.site, c.layer) for c in comps})
    src_acts: dict = {}
    src_logits = runner.forward(ad, b.other, [runner.capture(ad, s, layer, src_acts) for s, layer in sources],
                                noise=b.other_noise)[:, -1]
    base_logits = runner.forward(ad, base_ids, noise=base_noise)[:, -1]
    ref = torch.log_softmax((base_logits if noising else src_logits).float(), -1)
    base_m = metric_fn(base_logits, b.answer, b.wrong, ref)

    by_site = defaultdict(list)  # (site, layer) -> [(node column, index, position)]
    for col, c in enumerate(comps):
        by_site[(c.site, c.layer)].append((col, c.index, c.position))
    n_pairs, seq = base_ids.shape
    effect = torch.empty(n_subsets)
    per = max(1, rows_per_forward // n_pairs)
    for lo in range(0, n_subsets, per):
        subs = list(range(lo, min(n_subsets, lo + per)))
        batch = torch.arange(n_pairs, device=dev).repeat(len(subs))
        sub_of_row = torch.tensor(subs).repeat_interleave(n_pairs)
        taps = []
        for (site, layer), cols in by_site.items():
            mask = torch.zeros(len(batch), seq, ad.shape(site)[0], dtype=torch.bool)
            col, idx = torch.tensor([c[0] for c in cols]), torch.tensor([c[1] for c in cols])
            pos = [c[2] for c in cols]
            on = member[sub_of_row][:, col]  # [batch, k]
            for r, k in on.nonzero().tolist():
                if pos[k] is None:
                    mask[r, :, idx[k]] = True
                else:
                    mask[r, pos[k], idx[k]] = True
            mask, source = mask.to(dev), src_acts[(site, layer)][batch]
            taps.append((site, layer, lambda x, m=mask, s=source: ops.perturb(x, "patch", m, source=s)))
        logits = runner.forward(ad, base_ids[batch], taps,
                                noise=None if base_noise is None else base_noise[batch])[:, -1]
        m = metric_fn(logits, b.answer[batch], b.wrong[batch], ref[batch]).float().cpu()
        eff = (m - base_m[batch].float().cpu()).view(len(subs), n_pairs).mean(1)
        effect[torch.tensor(subs)] = eff

    best, best_node = 0.0, None
    for k in range(len(nodes)):
        inn, out = effect[member[:, k]], effect[~member[:, k]]
        if len(inn) < 2 or len(out) < 2:
            continue
        diff = (inn.mean() - out.mean()).abs().item()
        se = math.sqrt(inn.var().item() / len(inn) + out.var().item() / len(out))
        ucb = diff + t95(min(len(inn), len(out)) - 1) * se
        if ucb > best:
            best, best_node = ucb, str(comps[k])
    return {"bound": best, "node": best_node, "subsets": n_subsets, "p": p, "nodes": len(nodes),
            "mean_joint_effect": effect.mean().item()}
