"""How far an estimate can be trusted: the agreement of estimated scores with exact effects on a
confirmed sample (the estimated top ``k`` and a random sample of the rest), for node sweeps
(``scan``) and edges (``circuit``) alike.

>>> import torch
>>> round(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0])), 3)
0.5
"""

from __future__ import annotations

import math

import torch

SIGN_FLOOR = 0.05  # sign agreement counts nodes whose exact mean effect is >= 5% of the largest


def top_and_random(order: torch.Tensor, k: int, n_random: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """The sample to confirm from ids ranked best first (``order``): the top ``k``, then ``n_random``
    of the rest drawn with ``g``; and the ``k`` taken (at most ``len(order)``)."""
    k = min(k, len(order))
    rest = order[k:]
    return torch.cat([order[:k], rest[torch.randperm(len(rest), generator=g)[:n_random]]]), k


def ranked(score: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``ids`` ordered by ``score``, highest first."""
    return ids[score[ids].argsort(descending=True)]


def agreement(score: torch.Tensor, signed: torch.Tensor, exact: torch.Tensor, k: int) -> dict:
    """How well estimates of the confirmed nodes agree with their exact effects.

    ``score`` [n] (ranking score), ``signed`` [n] (signed mean estimate), ``exact`` [P, n]
    (per-pair exact effects); the first ``k`` nodes are the estimated top-k, the rest a random
    sample. ``spearman``: rank correlation of score and mean |exact| over all n; ``recall_at_k``:
    share of the exact top-k (within the n) that the estimate put in its top-k; ``sign_agreement``:
    share of the ``sign_nodes`` nodes that matter (|exact mean| at least 5% of the largest here)
    whose signed estimate has the same sign;
    ``random_max_exact_abs``: the largest mean |exact| in the random sample (what a node outside
    the top-k was seen to do), against ``top_min_exact_abs``.
    """
    ex_abs, ex_mean = exact.abs().mean(0), exact.mean(0)
    n = len(score)
    exact_top = set(ex_abs.argsort(descending=True)[:k].tolist())
    live = ex_mean.abs() > max(1e-6, SIGN_FLOOR * ex_mean.abs().max().item())  # nodes that matter
    out = {
        "n": n,
        "k": k,
        "spearman": spearman(score, ex_abs),
        "recall_at_k": len(exact_top & set(range(k))) / k if k else math.nan,
        "sign_agreement": (torch.sign(signed[live]) == torch.sign(ex_mean[live])).float().mean().item()
        if live.any()
        else math.nan,
        "sign_nodes": int(live.sum()),
        "top_min_exact_abs": ex_abs[:k].min().item() if k else math.nan,
        "random_max_exact_abs": ex_abs[k:].max().item() if n > k else math.nan,
    }
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    if len(a) < 2:
        return math.nan

    def ranks(x):
        x = x.double()
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in x.unique():  # average tied ranks
            m = x == v
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / den if den else math.nan


def untrusted(s: dict, min_sign: float = 0.9, min_spearman: float = 0.5) -> bool:
    """Agreement figures ``s`` that should not be trusted: sign agreement (on at least 4 nodes that
    matter) or Spearman (on at least 4 confirmed nodes) below the bar; NaN is not evidence either way."""
    return (
        s.get("sign_nodes", s["n"]) >= 4
        and s["sign_agreement"] < min_sign
        or s["n"] >= 4
        and s["spearman"] < min_spearman
    )


def summary(s: dict) -> str:
    """Agreement figures ``s`` in words: ``(top k + random): spearman, recall@k, sign`` (the CLI's lines)."""
    return (
        f"(top {s['k']} + random): spearman {s['spearman']:.3f}, recall@{s['k']} {s['recall_at_k']:.3f}, "
        f"sign {s['sign_agreement']:.3f}"
    )
