"""AtP* false-negative diagnostic: how large could the effect of a node the scan did not confirm be?

Random subsets of the unconfirmed nodes (each node in with probability ``p``) are patched jointly,
one group of the exact-patching engine per subset, from the other run into the base run. Each
node's effect is estimated as ``mean(effect | node in) - mean(effect | node out)`` over subsets;
a one-sided 95% t bound on its magnitude, maximised over nodes, bounds the effect any missed node
could have. Interactions between jointly patched nodes loosen it: it is a diagnostic, not a
guarantee.
"""

from __future__ import annotations

import math

import torch

from causalscan.data.corruption import Rows
from causalscan.patching.exact import measure
from causalscan.progress import Progress

# one-sided 95% Student t quantiles, df = 1..30; 1.645 beyond
_T95 = (
    6.314,
    2.920,
    2.353,
    2.132,
    2.015,
    1.943,
    1.895,
    1.860,
    1.833,
    1.812,
    1.796,
    1.782,
    1.771,
    1.761,
    1.753,
    1.746,
    1.740,
    1.734,
    1.729,
    1.725,
    1.721,
    1.717,
    1.714,
    1.711,
    1.708,
    1.706,
    1.703,
    1.701,
    1.699,
    1.697,
)


def t95(df: int) -> float:
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.645 if df > 0 else math.inf


@torch.no_grad()
def false_negative_bound(
    res,
    model,
    rows: Rows,
    metric_fn,
    n_subsets: int,
    p: float = 0.1,
    seed: int = 0,
    memory_budget: int | None = None,
    progress: Progress | None = None,
    executor=None,
) -> dict:
    """Joint random patches of the unconfirmed nodes of scan result ``res``, measured with the scan's
    ``metric_fn`` (the signature of :mod:`causalscan.data.metrics`) on the scan's ``rows``; returns the bound.

    Each subset is one group of :func:`causalscan.patching.exact.measure` (memory budget, start-layer and
    key/value reuse, rows of every token length). ``{"bound": float, "node": str, "subsets": S,
    "p": p, "nodes": N, "mean_joint_effect": float}``; ``bound`` is the largest over nodes of
    ``|diff| + t95 * se`` (mean effect over pairs, metric units).
    """
    unconfirmed = torch.ones(len(res.components), dtype=torch.bool)
    if res.confirmed is not None:
        unconfirmed[res.confirmed] = False
    nodes = [res.components[j] for j in unconfirmed.nonzero()[:, 0].tolist()]
    g = torch.Generator().manual_seed(seed + 1)
    member = torch.rand(n_subsets, len(nodes), generator=g) < p  # [S, N]
    groups = [[nodes[k] for k in row.nonzero()[:, 0].tolist()] for row in member]
    m = measure(
        model,
        rows,
        groups,
        res.direction,
        metric_fn,
        memory_budget,
        progress=progress,
        stage="false negatives",
        executor=executor,
    )
    effect = m.effect(res.direction).mean(0)  # [S]: mean over pairs

    best, best_node = 0.0, None
    for k in range(len(nodes)):
        inn, out = effect[member[:, k]], effect[~member[:, k]]
        if len(inn) < 2 or len(out) < 2:
            continue
        diff = (inn.mean() - out.mean()).abs().item()
        se = math.sqrt(inn.var().item() / len(inn) + out.var().item() / len(out))
        ucb = diff + t95(min(len(inn), len(out)) - 1) * se
        if ucb > best:
            best, best_node = ucb, str(nodes[k])
    return {
        "bound": best,
        "node": best_node,
        "subsets": n_subsets,
        "p": p,
        "nodes": len(nodes),
        "mean_joint_effect": effect.mean().item(),
    }
