"""The scan's exact stages: sweeps cheaper to patch exactly than to trust an estimate are patched
exactly, and the estimated ones are confirmed on the top nodes and a random sample of the rest,
pooled and per sweep (:mod:`causalscan.patching.agreement`).
"""

from __future__ import annotations

import torch

from causalscan.data.inputs import Inputs
from causalscan.data.sweeps import Component, Sweep
from causalscan.patching.agreement import agreement, frontier, ranked, top_and_random
from causalscan.patching.exact import measure
from causalscan.patching.planner import Work, cost, planned
from causalscan.progress import Progress


def exact_cost(inp: Inputs, comps: list[Component]) -> float:
    """What patching every node of ``comps`` exactly costs, in plain forward + backward passes of the
    scan's rows (:func:`causalscan.patching.planner.cost`)."""
    return cost(inp.model, inp.rows, planned(inp.model, inp.rows, [[c] for c in comps]))


def exact_sweeps(inp: Inputs, sweeps: list[Sweep], comps: list[Component], budget: float) -> list[Sweep]:
    """The sweeps whose exact patching costs at most ``budget`` plain forward + backward passes."""
    return [sw for sw in sweeps if exact_cost(inp, comps[sw.start : sw.stop]) <= budget]


def patch_exactly(res, inp: Inputs, sweeps: list[Sweep], work: Work, progress: Progress | None, executor=None) -> None:
    """Replace the estimates of ``sweeps`` in the scan result ``res`` by their exact effects (per pair),
    in ``signed`` and ``score``, measured by the plan ``work`` of their nodes (in sweep order)."""
    cols = [j for sw in sweeps for j in range(sw.start, sw.stop)]
    m = measure(
        inp.model,
        inp.rows,
        [[res.components[j]] for j in cols],
        res.direction,
        inp.metric_fn,
        progress=progress,
        stage="exact",
        executor=executor,
        work=work,
    )
    effect = m.effect(res.direction)
    res.signed[:, cols], res.score[:, cols] = effect, effect.abs()
    if res.graddrop is not None:
        res.graddrop[:, cols] = effect.abs()
    res.scored_by.update({sw.name: "exact" for sw in sweeps})


def confirm(res, inp: Inputs, k: int, n_random: int, seed: int, progress: Progress | None, executor=None) -> None:
    """Exact effects of the scan result ``res``'s top ``k`` estimated nodes and ``n_random`` others,
    measured on the scan's own rows, and of a sample stratified by sweep (when there are several):
    each sweep's own top ``min(k, size // 2)`` and as many random others, so that every sweep gets
    its own agreement statistics and a badly estimated sweep cannot hide behind a well estimated one."""
    score = res.score.mean(0)
    g = torch.Generator().manual_seed(seed)
    estimated = [sw for sw in res.sweeps if res.scored_by[sw.name] != "exact"]  # exact sweeps need no check
    ids = torch.cat([torch.arange(sw.start, sw.stop) for sw in estimated])
    pooled, k = top_and_random(ranked(score, ids), k, n_random, g)
    strata = {}
    if len(estimated) > 1:
        for sw in estimated:
            ids = torch.arange(sw.start, sw.stop)
            k_s = min(k, len(ids) // 2) if k else 0
            strata[sw.name] = (top_and_random(ranked(score, ids), k_s, n_random, g)[0], k_s, len(ids) - k_s)
    seen = dict.fromkeys(pooled.tolist())  # the pooled sample first, in order, then each sweep's new nodes
    for ids, _, _ in strata.values():
        seen.update(dict.fromkeys(ids.tolist()))
    chosen = torch.tensor(list(seen), dtype=torch.long)
    m = measure(
        inp.model,
        inp.rows,
        [[res.components[j]] for j in chosen.tolist()],
        res.direction,
        inp.metric_fn,
        progress=progress,
        stage="confirm",
        executor=executor,
    )
    res.confirmed, res.n_top, res.exact = chosen, k, m.effect(res.direction)
    col = {j: c for c, j in enumerate(chosen.tolist())}

    def agree(ids: torch.Tensor, k_s: int, n_rest: int) -> dict:
        cols = torch.tensor([col[j] for j in ids.tolist()], dtype=torch.long)
        out = agreement(score[ids], res.signed.mean(0)[ids], res.exact[:, cols], k_s)
        return {**out, "frontier": frontier(res.exact[:, cols].abs().mean(0), k_s, n_rest)}

    n_pool = sum(sw.stop - sw.start for sw in estimated)
    res.agreement = agree(pooled, k, n_pool - k)
    res.agreement_by_sweep = {name: agree(*stratum) for name, stratum in strata.items()} or {
        estimated[0].name: res.agreement
    }
    res.timings["confirm_forwards"] = m.forwards
