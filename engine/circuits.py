"""Circuits: which component feeds which. Edge attribution over the model's graph
(:mod:`causalscan.graph`), exact edge patching of the top edges and a random sample, and the
faithfulness curve of the top-n circuits.

``circuit`` runs three stages on a dataset of prompt pairs:

1. **Estimate** every edge (EAP or EAP-IG, :func:`causalscan.edges.attribute`), batch by batch.
2. **Confirm** the top ``confirm`` edges and ``confirm_random`` others by exact edge patching, many
   edges per forward (each row one (pair, edge)), and report how the estimate agreed
   (:func:`causalscan.scan.agreement`).
3. **Faithfulness**: for n on a grid, the clean run with every edge outside the top n taking the
   corrupt run's value (``ablation="patch"``) or its mean over the dataset (``"mean"``);
   ``(L_circuit - L_corrupt) / (L_clean - L_corrupt)`` per n (Hanna et al. 2024; auto-circuit), and
   the smallest n reaching 80% and 95% (bisected between the grid's sizes around the first
   crossing). At n = 0 every edge is patched: the corrupt run, exactly; at every edge, the clean run.

>>> import causalscan as cs
>>> res = cs.circuit("induction", cs.zoo.dataset_path("induction", "previous"), confirm=8, edges=10)
>>> [e["edge"] for e in res.top(6)][2:]  # after the copied token's value: the induction heads, their keys
['L1.H1 -> logits', 'L1.H0 -> logits', 'L0.H1 -> L1.KV1.k', 'L0.H1 -> L1.KV0.k']
>>> res.agreement["recall_at_k"], res.faithfulness["n_80"]    # of 46 edges
(1.0, 7)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from causalscan import corruption, edges
from causalscan.checkpoint import Checkpoint, fingerprint, run
from causalscan.checkpoint import key as checkpoint_key
from causalscan.corruption import Rows
from causalscan.errors import InputError, check_options
from causalscan.executor import get as executor_get
from causalscan.graph import Graph
from causalscan.inputs import Inputs, prepare
from causalscan.load import Model
from causalscan.patching import default_budget
from causalscan.progress import Progress, report
from causalscan.progress import check as check_progress
from causalscan.results import Result, _write
from causalscan.scan import agreement

METHODS = ("eap", "eap-ig")
ABLATIONS = ("patch", "mean")
IG_STEPS = 5
THRESHOLDS = (0.8, 0.95)  # the faithfulness the edge counts are reported at


def circuit(
    model,
    dataset,
    method: str = "eap-ig",
    edges: int = 200,
    confirm: int = 50,
    confirm_random: int | None = None,
    ig_steps: int | None = None,
    direction: str = "noising",
    metric="logit_diff",
    batch_size: int = 8,
    curve: bool = True,
    refine: int = 8,
    ablation: str = "patch",
    memory_budget: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    samples: int = corruption.SAMPLES,
    noise_scale: float = corruption.SCALE,
    checkpoint: str | Path | None = None,
    checkpoint_every_s: float = 30.0,
    executor=None,
) -> CircuitResult:
    """Score every edge of the model's graph on ``metric``, confirm the top, measure faithfulness.

    ``method``: ``eap`` or ``eap-ig`` (``ig_steps`` steps of the input path, default 5).
    ``edges``: the circuit's size (its edges in the JSON, dot and report; also a point of the
    curve). ``confirm``: top edges re-measured by exact edge patching, plus ``confirm_random``
    (default ``confirm``) others at random (0: none). ``direction``: ``noising`` (the clean run,
    an edge taking the corrupt value) or ``denoising``; estimate and confirmation share it, and
    the faithfulness curve always keeps the circuit clean. ``curve``: measure faithfulness on the
    grid (:func:`grid`), then bisect at most ``refine`` times between the sizes around each first
    crossing of 80% and 95% (to within 2% or one edge);
    ``ablation``: ``patch`` (the corrupt run) or ``mean`` (its mean over the pairs, which needs
    one token length). ``memory_budget``: bytes per patched forward (default 1 GiB on CPU, half
    the free GPU memory). ``batch_size``, ``samples``, ``noise_scale``, ``seed``, ``progress``,
    ``checkpoint`` (the attribution stage's partial sums, written as it goes and resumed from): as
    in :func:`causalscan.scan`. ``executor``: where the attribution batches run (None: here;
    :class:`causalscan.executor.Ray`: on a Ray cluster's actors, with the same result); exact edge
    patching and the curve run in this process.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, not {method!r}", field="method")
    if ablation not in ABLATIONS:
        raise InputError(f"ablation must be one of {', '.join(ABLATIONS)}, not {ablation!r}", field="ablation")
    if ig_steps is not None and method != "eap-ig":
        raise InputError(f"ig_steps needs method eap-ig, not {method!r}", field="ig_steps")
    ig_steps = (IG_STEPS if ig_steps is None else ig_steps) if method == "eap-ig" else 0
    check_options(
        edges=edges,
        refine=refine,
        confirm=confirm,
        confirm_random=confirm_random,
        batch_size=batch_size,
        memory_budget=memory_budget,
        seed=seed,
        **({"ig_steps": ig_steps} if ig_steps else {}),
    )
    check_progress(progress)
    executor_get(executor)
    inp = prepare(model, dataset, metric, direction, samples, noise_scale, seed)
    if ablation == "mean" and len(inp.lengths) > 1:
        raise InputError(
            f"mean ablation averages the corrupt run over pairs position by position: every pair needs "
            f"the same token length, found {inp.lengths}",
            file=inp.dataset.name,
            field="ablation",
        )
    g = Graph(inp.model.adapter)
    noising = direction == "noising"
    ck = None
    if checkpoint is not None:
        settings = {
            "model": inp.model.name,
            "weights": fingerprint(inp.model.hf),
            "data": inp.dataset.sha256,
            "method": method,
            "ig_steps": ig_steps,
            "direction": direction,
            "metric": inp.metric,
            "samples": samples,
            "noise_scale": noise_scale,
            "seed": seed,
            "batch_size": batch_size,
        }
        ck = Checkpoint(checkpoint, "circuit", checkpoint_key(settings), checkpoint_every_s)
    sums = estimate(inp, g, noising, batch_size, ig_steps, progress, ck, executor)
    res = CircuitResult(
        **inp.header(),
        graph=g,
        method=method,
        ig_steps=ig_steps or None,
        direction=direction,
        size=edges,
        ablation=ablation,
        scores=sums["scores"],
        clean=sums["clean"],
        corrupt=sums["corrupt"],
        timings={"attribution_s": time.perf_counter() - t0},
    )
    ids = res.ranked()
    if confirm:
        t1 = time.perf_counter()
        n_random = confirm if confirm_random is None else confirm_random
        k = min(confirm, len(ids))
        rest = ids[k:][torch.randperm(len(ids) - k, generator=torch.Generator().manual_seed(seed))[:n_random]]
        res.confirmed, res.n_top = torch.cat([ids[:k], rest]), k
        patched = measure(
            inp,
            g,
            [_single(g, e) for e in res.confirmed.tolist()],
            noising,
            "patch",
            memory_budget,
            progress,
            "confirm",
        )
        res.exact = patched - (res.clean if noising else res.corrupt)[:, None]
        est = res.scores.flatten()[res.confirmed]
        res.agreement = agreement(est.abs(), est, res.exact, k)
        res.timings["confirm_s"] = time.perf_counter() - t1
    if curve:
        t1 = time.perf_counter()
        valid = g.valid()

        def run_curve(sizes: list[int]) -> None:  # measure more circuit sizes into the curve, kept sorted
            new = measure(
                inp,
                g,
                [_complement(valid, ids[:n]) for n in sizes],
                True,
                ablation,
                memory_budget,
                progress,
                "faithfulness",
            )
            n_all = (res.curve_n or []) + sizes
            cols = torch.cat([new] if res.curve is None else [res.curve, new], 1)
            order = sorted(range(len(n_all)), key=n_all.__getitem__)
            res.curve_n, res.curve = [n_all[j] for j in order], cols[:, order]

        run_curve(grid(len(ids), edges))
        for threshold in THRESHOLDS:  # bisect between the grid's sizes below and at the first crossing
            for _ in range(refine):
                rec = res.faithfulness["recovered"]
                hit = next((j for j, r in enumerate(rec) if r >= threshold), None)
                if not hit or res.curve_n[hit] - res.curve_n[hit - 1] <= max(1, res.curve_n[hit] // 50):
                    break
                run_curve([(res.curve_n[hit - 1] + res.curve_n[hit]) // 2])
        res.timings["faithfulness_s"] = time.perf_counter() - t1
    res.timings["total_s"] = time.perf_counter() - t0
    if ck:
        ck.remove()
    return res


def estimate(
    inp: Inputs,
    g: Graph,
    noising: bool,
    batch_size: int,
    ig_steps: int,
    progress: Progress | None = None,
    ck: Checkpoint | None = None,
    executor=None,
) -> dict:
    """Edge scores ``[n_up, n_read]`` (mean over pairs) and the ``clean``/``corrupt`` metrics [P], one
    batch at a time on ``executor``; the running sums resumed from and written to ``ck`` as it goes."""
    per_row, n = 1.0 / inp.rows.samples, len(inp.pairs)
    sums = {"scores": torch.zeros(g.n_up, g.n_read), "clean": torch.zeros(n), "corrupt": torch.zeros(n)}

    def add(sums, part):
        sums["scores"] += per_row * part["scores"]
        sums["clean"].index_add_(0, part["owner"], per_row * part["clean"])
        sums["corrupt"].index_add_(0, part["owner"], per_row * part["corrupt"])

    stage = (inp.rows, inp.metric_fn, noising, batch_size, ig_steps)
    sums = run(
        ck,
        sums,
        len(inp.rows.batches(batch_size)),
        lambda todo: executor_get(executor).map(inp.model, edge_units, stage, todo),
        add,
        progress,
    )
    return {"scores": sums["scores"] / n, "clean": sums["clean"], "corrupt": sums["corrupt"]}


def edge_units(model: Model, rows: Rows, metric_fn, noising: bool, batch_size: int, ig_steps: int):
    """``compute(i)``: the edge scores of attribution batch ``i`` summed over its rows ``[n_up, n_read]``,
    its rows' ``clean``/``corrupt`` metrics [B] and their pairs ``owner`` [B]."""
    g = Graph(model.adapter)
    embed = model.hf.get_input_embeddings().weight
    batches = rows.batches(batch_size)

    def compute(i: int) -> dict:
        b = rows.batch(batches[i], noising, embed)
        out = edges.attribute(
            g,
            b.base,
            b.other,
            lambda logits, lp: metric_fn(logits, b.labels, lp),
            noising,
            b.base_noise,
            b.other_noise,
            rows.keep,
            ig_steps,
        )
        clean, corrupt = (out["base"], out["other"]) if noising else (out["other"], out["base"])
        return {
            "scores": out["scores"].cpu(),
            "clean": clean.cpu(),
            "corrupt": corrupt.cpu(),
            "owner": rows.owner[batches[i]],
        }

    return compute


def grid(n_edges: int, size: int) -> list[int]:
    """Circuit sizes of the faithfulness curve: 0, 1, 2, 5, 10, 20, 50, ... below ``n_edges``, the
    circuit's ``size``, and every edge."""
    out, scale = {0, n_edges, min(size, n_edges)}, 1
    while scale < n_edges:
        out |= {m * scale for m in (1, 2, 5) if m * scale < n_edges}
        scale *= 10
    return sorted(out)


def _single(g: Graph, e: int) -> torch.Tensor:
    mask = torch.zeros(g.n_up * g.n_read, dtype=torch.bool)
    mask[e] = True
    return mask.view(g.n_up, g.n_read)


def _complement(valid: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Every edge of the graph but ``keep`` (flat edge ids)."""
    mask = valid.clone()
    mask.view(-1)[keep] = False
    return mask


def _row_bytes(inp: Inputs, g: Graph, seq: int) -> int:
    """Rough peak bytes of one edge-patched row: the other run's writes, their differences and the
    reader shifts (fp32), the edge mask, and a forward's live activations."""
    ad = inp.model.adapter
    return (
        4 * seq * ad.d_model * (2 * g.n_up + g.per_layer + 8)
        + 5 * g.n_up * g.n_read
        + 4 * seq * (ad.d_mlp + 2 * ad.n_heads * seq)
    )


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
) -> torch.Tensor:
    """The metric ``[P, G]`` of the base run with each group of edges (a ``[n_up, n_read]`` bool mask)
    taking the other run's writes (``ablation="mean"``: their mean over the rows), per pair."""
    rows = inp.rows
    embed = inp.model.hf.get_input_embeddings().weight
    budget = memory_budget or default_budget(inp.model)
    out = torch.empty(len(rows.pairs), len(groups))
    buckets = rows.buckets()
    cap = [max(1, budget // _row_bytes(inp, g, len(rows.pairs[idx[0]].clean))) for idx in buckets]
    total = sum(math.ceil(len(idx) * len(groups) / c) for idx, c in zip(buckets, cap, strict=True))
    done = 0
    starts = [edges.start_layer(g, m) for m in groups]
    for idx, chunk in zip(buckets, cap, strict=True):
        b = rows.batch(idx, base_is_clean, embed)
        other_run = edges.record(g, b.other, b.other_noise, rows.keep)
        base_run = edges.record(g, b.base, b.base_noise, rows.keep, resid=True)
        clean_lp = (base_run if base_is_clean else other_run).logits.float().log_softmax(-1)
        other, resid = other_run.writes, base_run.resid
        if ablation == "mean":
            other = other.mean(0, keepdim=True).expand_as(other)
        base_diff = other - base_run.writes
        del other_run, base_run
        cells = sorted(((starts[j], j, i) for j in range(len(groups)) for i in range(len(idx))), key=lambda c: c[0])
        for lo in range(0, len(cells), chunk):
            part = cells[lo : lo + chunk]
            layer = part[0][0]  # the earliest start of the chunk: every row runs from there
            j, i = torch.tensor([c[1] for c in part]), torch.tensor([c[2] for c in part])
            logits = edges.patched_logits(
                g,
                b.base[i],
                other,
                torch.stack([groups[x] for x in j.tolist()]),
                rows.keep,
                None if b.base_noise is None else b.base_noise[i],
                i,
                layer,
                resid[i, layer] if layer else None,
                base_diff,
            )
            out[torch.tensor(idx)[i], j] = inp.metric_fn(logits, b.labels.take(i), clean_lp[i]).float().cpu()
            done += 1
            report(progress, stage, done, total)
    return rows.mean(out)


@dataclass(kw_only=True)
class CircuitResult(Result):
    """Edge scores ``scores`` ``[n_up, n_read]`` (mean over pairs; 0 off the graph) of ``method``;
    after confirmation ``confirmed`` [m] flat edge ids (``u * n_read + r``; the first ``n_top`` the
    estimated top, then a random sample) and ``exact`` [P, m] their exact effects; with the curve,
    ``curve_n`` circuit sizes and ``curve`` [P, len(curve_n)] the metric with every other edge
    ablated."""

    FILE: ClassVar[str] = "circuit.json"

    graph: Graph
    method: str
    direction: str
    scores: torch.Tensor
    size: int
    ablation: str = "patch"
    ig_steps: int | None = None
    confirmed: torch.Tensor | None = None
    n_top: int = 0
    exact: torch.Tensor | None = None
    agreement: dict | None = None
    curve_n: list[int] | None = None
    curve: torch.Tensor | None = None

    def ranked(self) -> torch.Tensor:
        """Flat ids of the graph's edges, highest ``|score|`` first (ties: graph order)."""
        ids = self.graph.valid().flatten().nonzero().flatten()
        return ids[self.scores.flatten()[ids].abs().argsort(descending=True, stable=True)]

    def n_rows(self) -> int:
        return int(self.graph.valid().sum())

    @property
    def faithfulness(self) -> dict | None:
        """``{"n": sizes, "recovered": share of clean - corrupt per size, "n_80", "n_95"}`` (the
        smallest measured size reaching 80% / 95%, None if none does)."""
        if self.curve is None:
            return None
        gap = (self.clean.mean() - self.corrupt.mean()).item()
        rec = [(c - self.corrupt.mean().item()) / gap if gap else math.nan for c in self.curve.mean(0).tolist()]
        first = {
            f"n_{int(100 * t)}": next((n for n, r in zip(self.curve_n, rec, strict=True) if r >= t), None)
            for t in THRESHOLDS
        }
        return {"n": self.curve_n, "recovered": rec, **first}

    def top(self, k: int = 10) -> list[dict]:
        """The ``k`` edges of highest |score|: names, score and (if confirmed) the exact effect."""
        g = self.graph
        exact = (
            {}
            if self.confirmed is None
            else dict(zip(self.confirmed.tolist(), self.exact.mean(0).tolist(), strict=True))
        )
        rows = []
        for rank, e in enumerate(self.ranked()[:k].tolist()):
            u, r = divmod(e, g.n_read)
            rows.append(
                {
                    "rank": rank,
                    "edge": g.edge_name(u, r),
                    "upstream": g.node_name(u),
                    "reader": g.reader_name(r),
                    "reader_node": g.reader_node(r),
                    "score": self.scores[u, r].item(),
                    "exact": exact.get(e),
                }
            )
        return rows

    def tensors(self) -> dict[str, torch.Tensor]:
        """``<method>/edges`` [n_up, n_read]; ``exact/edges`` [n_up, n_read] (NaN where not confirmed);
        ``faithfulness`` [len(curve_n)] (share recovered)."""
        out = {f"{self.method}/edges": self.scores}
        if self.confirmed is not None:
            ex = torch.full((self.scores.numel(),), float("nan"))
            ex[self.confirmed] = self.exact.mean(0)
            out["exact/edges"] = ex.view_as(self.scores)
        if self.curve is not None:
            out["faithfulness"] = torch.tensor(self.faithfulness["recovered"])
        return out

    def to_json(self, top: int | None = None) -> dict:
        """The document: settings, the circuit (its ``size`` top edges; more with ``top``) with the
        nodes they join, agreement and faithfulness."""
        check_options(top=top)
        edges_ = self.top(self.size if top is None else max(top, self.size))
        nodes = sorted({e["upstream"] for e in edges_} | {e["reader_node"] for e in edges_})
        settings = {
            "method": self.method,
            "ig_steps": self.ig_steps,
            "direction": self.direction,
            "size": self.size,
            "ablation": self.ablation,
            "edges_in_graph": self.n_rows(),
            "confirmed": {
                "top": self.n_top,
                "random": 0 if self.confirmed is None else len(self.confirmed) - self.n_top,
            },
        }
        return self._document(
            "circuit", settings, nodes=nodes, edges=edges_, agreement=self.agreement, faithfulness=self.faithfulness
        )

    def save(self, out_dir, top: int | None = None):
        """``circuit.json``, ``scores.safetensors`` and ``circuit.dot`` into ``out_dir``."""
        from causalscan import files

        out = _write(out_dir, self.tensors(), self.to_json(self.TOP if top is None else top), self.FILE)
        files.write(out / "circuit.dot", self.to_dot())
        return out

    def to_dot(self) -> str:
        """The circuit (its ``size`` top edges) as a Graphviz digraph: blue positive, red negative,
        pen width by |score|, the reader kind (q, k, v) on the edge."""
        return to_dot(self.top(self.size))


def to_dot(edges_: list[dict]) -> str:
    """Graphviz text of ranked edge rows (``top``), nodes ranked by layer."""

    def q(s):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    big = max((abs(e["score"]) for e in edges_), default=1.0) or 1.0
    lines = ["digraph circuit {", "  rankdir=BT;", "  node [shape=box, fontname=Helvetica];"]
    for e in edges_:
        kind = e["reader"].rsplit(".", 1)[-1]
        colour = "#2166ac" if e["score"] >= 0 else "#b2182b"
        width = 0.5 + 4.5 * abs(e["score"]) / big
        label = f', label="{kind}"' if kind in ("q", "k", "v") else ""
        lines.append(f'  {q(e["upstream"])} -> {q(e["reader_node"])} [color="{colour}", penwidth={width:.2f}{label}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


__all__ = ["ABLATIONS", "METHODS", "CircuitResult", "circuit", "estimate", "grid", "measure", "to_dot"]
