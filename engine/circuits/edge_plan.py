"""The plan of exact edge patching: where each group of edges starts its forward, the buckets of rows
of one length, and how many (pair, group) rows one forward carries within a memory budget."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from causalscan.circuits.graph import Graph
from causalscan.data.inputs import Inputs
from causalscan.patching.planner import default_budget


def start_layer(g: Graph, mask: torch.Tensor) -> int:
    """The first block an edge set ``[n_up, n_read]`` changes (its earliest reader's layer)."""
    read = mask.any(0).nonzero()
    return g.reader_layer(int(read.min())) if len(read) else g.ad.n_layers - 1


def _row_bytes(inp: Inputs, g: Graph, seq: int) -> int:
    """Rough peak bytes of one edge-patched row: the other run's writes, their differences and the
    reader shifts (fp32), the edge mask, and a forward's live activations."""
    ad = inp.model.adapter
    return (
        4 * seq * ad.d_model * (2 * g.n_up + g.per_layer + 8)
        + 5 * g.n_up * g.n_read
        + 4 * seq * (ad.d_mlp + 2 * ad.n_heads * seq)
    )


EdgeWork = list[tuple[list[int], list[tuple[int, int, int]], int]]  # per bucket: rows, sorted cells, rows per forward


def planned(inp: Inputs, g: Graph, groups: Sequence[torch.Tensor], memory_budget: int | None = None) -> EdgeWork:
    """Per bucket of equal-length rows: its row ids, its cells ``(start block, group, row)`` sorted by
    start, and the rows one forward carries within ``memory_budget`` bytes."""
    budget = memory_budget or default_budget(inp.model)
    starts = [start_layer(g, m) for m in groups]
    work = []
    for idx in inp.rows.buckets():
        cells = sorted(((starts[j], j, i) for j in range(len(groups)) for i in range(len(idx))), key=lambda c: c[0])
        work.append((idx, cells, max(1, budget // _row_bytes(inp, g, len(inp.rows.pairs[idx[0]].clean)))))
    return work


def units(work: EdgeWork) -> list[tuple[int, int]]:
    """``(bucket, first cell)`` of every forward, in order."""
    return [(b, lo) for b, (_, cells, chunk) in enumerate(work) for lo in range(0, len(cells), chunk)]


__all__ = ["EdgeWork", "planned", "start_layer", "units"]
