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


TOP = 20  # the top a sweep's confirmation checks the order of, and the false negatives against
DEEP = 0.75  # an exact top node found this deep in the confirmed top: more may lie beyond it


def frontier(exact_abs: torch.Tensor, k: int, n_rest: int, top: int = TOP) -> dict:
    """Whether a sweep's confirmed top was deep enough, from the mean |exact| ``exact_abs`` [n] of its
    confirmed nodes: the first ``k`` its estimated top (best first), the rest a random sample of its
    ``n_rest`` other nodes. With ``t = min(top, k // 2)``: ``recall_at_top``, the share of the exact
    top ``t`` (among the confirmed top) that the estimate ranked in its top ``t``; ``deepest``, the
    estimated rank (1-based) of the lowest-ranked of them; ``random_above``, the random nodes at
    least as large as the exact ``t``-th (false negatives seen), and ``missed_95``, a 95% upper
    bound on how many of the ``n_rest`` are (Clopper-Pearson on the random sample)."""
    t = min(top, k // 2)
    if t == 0:
        return {"top": 0}
    order = exact_abs[:k].argsort(descending=True)[:t]
    threshold = exact_abs[:k][order[-1]].item()
    rand = exact_abs[k:]
    above = int((rand >= threshold).sum()) if threshold > 0 else 0
    return {
        "top": t,
        "recall_at_top": len(set(order.tolist()) & set(range(t))) / t,
        "deepest": int(order.max()) + 1,
        "random": len(rand),
        "random_above": above,
        "missed_95": n_rest * upper_95(above, len(rand)) if len(rand) else math.nan,
    }


def upper_95(hits: int, n: int) -> float:
    """One-sided 95% Clopper-Pearson upper bound on a rate seen ``hits`` times in ``n`` draws."""
    if hits >= n:
        return 1.0
    lo, hi = hits / n, 1.0
    for _ in range(60):  # bisection on P(X <= hits; n, p) = 0.05, which falls as p grows
        p = (lo + hi) / 2
        cdf = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(hits + 1))
        lo, hi = (p, hi) if cdf > 0.05 else (lo, p)
    return hi


def shallow(s: dict) -> str | None:
    """Why a sweep's real top may lie beyond its confirmed top (None: no sign of it), from ``frontier``."""
    f = s.get("frontier") or {}
    if not f.get("top"):
        return None
    if f["random_above"]:
        return f"{f['random_above']} of {f['random']} random nodes belong in its exact top {f['top']}"
    if f["deepest"] > DEEP * s["k"]:
        return f"an exact top-{f['top']} node was the estimate's #{f['deepest']} of {s['k']} confirmed"
    return None


def trust(s: dict, method: str) -> str:
    """How far a sweep's ranking rests on its estimate (``method``) and how its confirmation agreed,
    in one line, from its agreement figures ``s`` (with ``frontier``)."""
    f = s.get("frontier") or {}
    if not f.get("top"):
        return f"estimated by {method}, not confirmed"
    bound = "" if math.isnan(f["missed_95"]) else f" (at most {f['missed_95']:.0f} of the rest, 95%)"
    return (
        f"estimated by {method}, its confirmed top {s['k']} ranked by exact effects (the estimate's own "
        f"top-{f['top']} recall there {f['recall_at_top']:.2f}, sign {s['sign_agreement']:.2f}); "
        f"{f['random_above']} of {f['random']} random nodes reach its exact top {f['top']}{bound}"
    )


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
