"""Influence on the logits, as circuit-tracer prunes by it: with ``A`` the adjacency's absolute values,
each row divided by its sum, and ``w`` the logits' probabilities, a node's influence is
``w (A + A^2 + ...)`` (the graph has no cycle, so the series ends)."""

from __future__ import annotations

import torch


def normalised(adj: torch.Tensor) -> torch.Tensor:
    """``|adj|`` with each row divided by its sum (a new tensor; rows of zeros stay zero)."""
    a = adj.abs()
    return a.div_(a.sum(1, keepdim=True).clamp_min(1e-10))


def influence(
    adj: torch.Tensor, weights: torch.Tensor, row_node: torch.Tensor | None = None, a: torch.Tensor | None = None
) -> torch.Tensor:
    """Each node's influence on the weighted targets: ``w (A + A^2 + ...)`` with ``A`` the row-normalised
    ``|adj|`` [R, N] (``a``: that, if made already) whose row r is node ``row_node[r]``'s (default: the
    square adjacency, row r of node r; a row's node may lie past N: a target that is no source) and
    ``weights`` [R] per row. Returns [max(N, nodes of the rows)]."""
    a = normalised(adj) if a is None else a
    rows = torch.arange(len(adj)) if row_node is None else row_node
    n = max(adj.shape[1], int(rows.max()) + 1 if len(rows) else 0)
    x = torch.zeros(n)
    x[: adj.shape[1]] = weights.float() @ a
    total = x.clone()
    for _ in range(n + 1):  # no cycle: at most as many steps as nodes
        x[: adj.shape[1]] = x[rows] @ a
        if not x.any():
            break
        total += x
    return total


def keep_share(scores: torch.Tensor, share: float) -> torch.Tensor:
    """The smallest score among the largest ``scores`` (> 0) that together make up ``share`` of their sum."""
    s = scores[scores > 0].sort(descending=True).values
    if not len(s):
        return torch.tensor(float("inf"))
    cum = s.cumsum(0) / s.sum()
    return s[min(int(torch.searchsorted(cum, torch.tensor(share, dtype=cum.dtype))), len(s) - 1)]


__all__ = ["influence", "keep_share", "normalised"]
