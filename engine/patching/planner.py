"""The plan of exact patching: which rows each batched forward carries and where it starts.

A patch of a group of components starting at ``(layer, position)`` leaves every block before
``layer`` and every position before ``position`` as in the base run, so its forward starts there
from the cached residual and the cached keys and values. Groups of one start layer share
forwards, merged in position order until a forward carries ``min_tokens`` row-positions, and
each forward's rows are cut to the memory budget. :func:`cost` prices a plan in plain forward +
backward passes (what ``scan`` weighs against an estimate).
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch

from causalscan.data.corruption import Rows
from causalscan.data.sweeps import Component
from causalscan.model.load import Model

Work = list[tuple[list[int], list[tuple[int, int]], list["Forward"]]]  # per bucket: rows, starts, forwards


def _row_bytes(model: Model, seq: int, new: int, n_layers: int, tapped_width: int, keep: int = 1) -> int:
    """Rough peak bytes of one row of a no-grad forward over ``new`` of ``seq`` positions, ``keep`` logits."""
    ad, el = model.adapter, next(model.hf.parameters()).element_size()
    kv = 2 * ad.n_layers * seq * ad.n_kv_heads * ad.d_head
    live = new * (6 * ad.d_model + 3 * ad.d_mlp + 2 * ad.n_heads * seq + 2 * tapped_width)
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    return el * (kv + live + 2 * keep * vocab) + 64 * n_layers


def default_budget(model: Model) -> int:
    """Bytes per batched forward by default: 1 GiB on CPU, half the free memory of a GPU."""
    dev = model.device
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free * 0.5)
    return 1 << 30


class Forward(NamedTuple):
    """One batched forward: rows ``pairs[r]`` (base row ids) x ``groups[r]`` (group ids), started at
    block ``layer`` and position ``pos``."""

    layer: int
    pos: int
    pairs: torch.Tensor
    groups: torch.Tensor


def default_min_tokens(device: torch.device) -> int:
    """Row-positions a merged forward gathers by default: enough to fill a GPU, fewer on a CPU."""
    return 16384 if torch.device(device).type == "cuda" else 2048


def planned(
    model: Model,
    rows: Rows,
    groups: list[list[Component]],
    memory_budget: int | None = None,
    min_tokens: int | None = None,
) -> Work:
    """Per bucket of equal-length rows: ``(row ids, each group's start, the planned forwards)``."""
    budget = memory_budget or default_budget(model)
    if min_tokens is None:
        min_tokens = default_min_tokens(model.device)
    work = []
    for idx in rows.buckets():
        roles = rows.pairs[idx[0]].roles or {}
        earliest = {r: min(rows.pairs[i].roles[r] for i in idx) for r in roles}  # of each role in the bucket
        starts = [start(g, earliest) for g in groups]
        seq = len(rows.pairs[idx[0]].clean)
        work.append((idx, starts, forwards(model, groups, starts, len(idx), seq, budget, min_tokens, rows.keep)))
    return work


def cost(model: Model, rows: Rows, work: Work) -> float:
    """What running the plan ``work`` (:func:`planned`) costs, in plain forward + backward passes of
    ``rows`` (taken as four forwards): the blocks x positions its forwards recompute, plus one output
    layer per forward row, against the same of every row's full forward."""
    n_layers, done, floor = model.adapter.n_layers, 0.0, 0.0
    for idx, _, fws in work:
        seq = len(rows.pairs[idx[0]].clean)
        done += sum(len(fw.pairs) * ((n_layers - fw.layer) * (seq - fw.pos) + _HEAD) for fw in fws)
        floor += 4 * len(idx) * (n_layers * seq + _HEAD)
    return done / floor


_HEAD = 4  # the output layer of one row, in block x positions (a 49k vocabulary against 30 blocks)


def start(group: list[Component], earliest: dict[str, int] | None = None) -> tuple[int, int]:
    """The earliest (layer, position) a patch of ``group`` changes (a role at ``earliest[role]``, its
    earliest position among the rows; an empty group changes nothing: the end)."""
    if not group:
        return (1 << 30, 1 << 30)
    return min(c.layer for c in group), min(_position(c, earliest) for c in group)


def _position(c: Component, earliest: dict[str, int] | None) -> int:
    if c.position is None:
        return 0
    return earliest[c.position] if isinstance(c.position, str) else c.position


def schedule(
    starts: list[tuple[int, int]], n_pairs: int, seq: int, min_tokens: int
) -> list[tuple[int, int, list[int]]]:
    """Forwards as ``(start_layer, start_pos, group ids)`` for groups starting at ``starts``.

    A patch starting at (layer, p) may start at any earlier layer and position: what is recomputed
    there equals the base run. Groups of one start layer are merged, in position order, until a
    forward carries ``min_tokens`` row-positions, so by-position sweeps do not pay the
    per-forward overhead hundreds of times; a merged forward starts at its members' earliest
    position. Layers are never merged: starting a block earlier costs a whole block per row.
    """
    by_start: dict[tuple[int, int], list[int]] = defaultdict(list)
    for j, s in enumerate(starts):
        by_start[s].append(j)
    out: list[tuple[int, int, list[int]]] = []
    for (layer, pos), members in sorted(by_start.items()):
        if out:
            l0, p0, acc = out[-1]
            if l0 == layer and n_pairs * len(acc) * (seq - p0) < min_tokens:
                out[-1] = (l0, min(p0, pos), acc + members)
                continue
        out.append((layer, pos, list(members)))
    return out


def forwards(
    model: Model,
    groups: list[list[Component]],
    starts: list[tuple[int, int]],
    n_pairs: int,
    seq: int,
    budget: int,
    min_tokens: int,
    keep: int = 1,
) -> list[Forward]:
    """The planned forwards of ``n_pairs`` base rows of length ``seq``, each row-chunk within ``budget``.
    Empty groups run in none: their metric is the base run's."""
    ad = model.adapter
    live = [j for j, g in enumerate(groups) if g]
    out = []
    for layer, pos, members in schedule([starts[j] for j in live], n_pairs, seq, min_tokens):
        members = [live[j] for j in members]
        sites = {c.site for j in members for c in groups[j]}
        width = sum(ad.shape(s)[0] * ad.shape(s)[1] for s in sites)
        chunk = max(1, budget // _row_bytes(model, seq, seq - pos, ad.n_layers - layer, width, keep))
        pair_ids = torch.arange(n_pairs).repeat_interleave(len(members))
        group_ids = torch.tensor(members).repeat(n_pairs)
        out += [
            Forward(layer, pos, pair_ids[lo : lo + chunk], group_ids[lo : lo + chunk])
            for lo in range(0, len(pair_ids), chunk)
        ]
    return out
