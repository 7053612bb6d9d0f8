"""Circuits: which component feeds which. Edge attribution over the model's graph
(:mod:`causalscan.circuits.graph`), exact edge patching of the top edges and a random sample, and the
faithfulness curve of the top-n circuits.

``circuit`` runs three stages on a dataset of prompt pairs, after checking their memory plan:

1. **Estimate** every edge (EAP or EAP-IG, :func:`causalscan.circuits.edges.attribute`), batch by batch.
2. **Confirm** the top ``confirm`` edges and ``confirm_random`` others by exact edge patching
   (:mod:`causalscan.circuits.edge_patching`), many edges per forward (each row one (pair, edge)),
   and report how the estimate agreed (:func:`causalscan.patching.agreement.agreement`).
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

import time
from pathlib import Path

import torch

from causalscan import memplan
from causalscan.checkpoint import Checkpoint, fingerprint
from causalscan.checkpoint import key as checkpoint_key
from causalscan.circuits import edge_patching
from causalscan.circuits.circuit_result import THRESHOLDS, CircuitResult, to_dot
from causalscan.circuits.edges import edge_units, estimate
from causalscan.circuits.graph import Graph
from causalscan.data import corruption
from causalscan.data.inputs import Inputs, prepare
from causalscan.data.sweeps import build_sweeps
from causalscan.errors import InputError, check_options
from causalscan.executor import get as executor_get
from causalscan.model import relevance
from causalscan.model.features import require_transcoders
from causalscan.patching.agreement import agreement, top_and_random
from causalscan.patching.estimate import Stage, heaviest_batch
from causalscan.patching.estimate import estimate as estimate_nodes
from causalscan.progress import Progress
from causalscan.progress import check as check_progress

METHODS = ("eap", "eap-ig", "relp")
ABLATIONS = ("patch", "mean")
IG_STEPS = 5


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
    memory_gb: float | None = None,
    dry_run: bool = False,
    relp_attention: str = "plain",
    latents: int = 16,
) -> CircuitResult | memplan.Plan:
    """Score every edge of the model's graph on ``metric``, confirm the top, measure faithfulness.

    ``method``: ``eap``, ``eap-ig`` (``ig_steps`` steps of the input path, default 5) or ``relp``
    (EAP with the relevance rules of :mod:`causalscan.model.relevance` in the backward, attention
    rule ``relp_attention``: ``plain`` or ``attnlrp``; ``cp`` would give q and k readers nothing).
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
    patching and the curve run in this process. ``memory_gb``, ``dry_run``: the memory plan of the
    three stages, as in :func:`causalscan.patch`.

    **Feature circuits**: on a model with transcoders attached (``cs.load(model, sae=...)``, ``--sae``),
    each transcoder's ``latents`` latents of largest mean |AtP| over the pairs (of those on somewhere)
    become nodes of the graph, writers and readers of their own (``L3.F12``; the MLP node is then
    the rest of the MLP's output, its error and the other latents): edges run between latents of
    different layers, heads, the rest nodes, the embeddings and the logits, are estimated, confirmed
    by exact edge patching and measured for faithfulness like any other
    (:mod:`causalscan.circuits.graph`).
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, not {method!r}", field="method")
    if ablation not in ABLATIONS:
        raise InputError(f"ablation must be one of {', '.join(ABLATIONS)}, not {ablation!r}", field="ablation")
    if ig_steps is not None and method != "eap-ig":
        raise InputError(f"ig_steps needs method eap-ig, not {method!r}", field="ig_steps")
    ig_steps = (IG_STEPS if ig_steps is None else ig_steps) if method == "eap-ig" else 0
    rules = relevance.attention_for(method, relp_attention, ("relp",))
    if rules == "cp":
        raise InputError(
            "the cp attention rule holds the pattern constant: every edge into a q or k reader would score "
            "0; use relp_attention plain or attnlrp",
            field="relp_attention",
        )
    check_options(
        edges=edges,
        refine=refine,
        confirm=confirm,
        confirm_random=confirm_random,
        batch_size=batch_size,
        memory_budget=memory_budget,
        seed=seed,
        memory_gb=memory_gb,
        latents=latents,
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
    noising = direction == "noising"
    t_latents = time.perf_counter()
    chosen = _latent_nodes(inp, latents, noising, batch_size, dry_run)
    t_latents = time.perf_counter() - t_latents
    g = Graph(inp.model.adapter, chosen)
    n_random = confirm if confirm_random is None else confirm_random
    n_confirm = confirm + n_random if confirm else 0
    plan = _plan(
        inp,
        g,
        noising,
        batch_size,
        ig_steps,
        rules,
        n_confirm,
        grid(int(g.valid().sum()), edges) if curve else [],
        ablation,
        memory_budget,
    )
    if dry_run:
        return plan
    plan.check_gb(memory_gb)
    ck = None
    if checkpoint is not None:
        settings = {
            "model": inp.model.name,
            "weights": fingerprint(inp.model.hf),
            "data": inp.dataset.sha256,
            "method": method,
            "ig_steps": ig_steps,
            **({"relp_attention": relp_attention} if rules else {}),
            "direction": direction,
            "metric": inp.metric,
            "samples": samples,
            "noise_scale": noise_scale,
            "seed": seed,
            "batch_size": batch_size,
            **({"latents": {str(k): v for k, v in g.latents.items()}} if g.latents else {}),
        }
        ck = Checkpoint(checkpoint, "circuit", checkpoint_key(settings), checkpoint_every_s)
    sums = estimate(inp, g, noising, batch_size, ig_steps, progress, ck, executor, rules)
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
        timings={"attribution_s": time.perf_counter() - t0, **({"latents_s": t_latents} if chosen else {})},
    )
    ids = res.ranked()
    if confirm:
        t1 = time.perf_counter()
        res.confirmed, res.n_top = top_and_random(ids, confirm, n_random, torch.Generator().manual_seed(seed))
        singles = [_single(g, e) for e in res.confirmed.tolist()]
        patched = edge_patching.measure(inp, g, singles, noising, "patch", memory_budget, progress, "confirm")
        res.exact = patched - (res.clean if noising else res.corrupt)[:, None]
        est = res.scores.flatten()[res.confirmed]
        res.agreement = agreement(est.abs(), est, res.exact, res.n_top)
        res.timings["confirm_s"] = time.perf_counter() - t1
    if curve:
        t1 = time.perf_counter()
        _faithfulness(res, inp, g, ids, refine, memory_budget, progress)
        res.timings["faithfulness_s"] = time.perf_counter() - t1
    res.timings["total_s"] = time.perf_counter() - t0
    if ck:
        ck.remove()
    return res


def _faithfulness(
    res: CircuitResult,
    inp: Inputs,
    g: Graph,
    ids: torch.Tensor,
    refine: int,
    memory_budget: int | None,
    progress: Progress | None,
) -> None:
    """The faithfulness curve into ``res``: the grid's circuit sizes of the edges ranked ``ids``, then
    at most ``refine`` bisections between the sizes around each first crossing of a threshold."""
    valid = g.valid()

    def run_curve(sizes: list[int]) -> None:  # measure more circuit sizes into the curve, kept sorted
        masks = [_complement(valid, ids[:n]) for n in sizes]
        new = edge_patching.measure(inp, g, masks, True, res.ablation, memory_budget, progress, "faithfulness")
        n_all = (res.curve_n or []) + sizes
        cols = torch.cat([new] if res.curve is None else [res.curve, new], 1)
        order = sorted(range(len(n_all)), key=n_all.__getitem__)
        res.curve_n, res.curve = [n_all[j] for j in order], cols[:, order]

    run_curve(grid(len(ids), res.size))
    for threshold in THRESHOLDS:  # bisect between the grid's sizes below and at the first crossing
        for _ in range(refine):
            rec = res.faithfulness["recovered"]
            hit = next((j for j, r in enumerate(rec) if r >= threshold), None)
            if not hit or res.curve_n[hit] - res.curve_n[hit - 1] <= max(1, res.curve_n[hit] // 50):
                break
            run_curve([(res.curve_n[hit - 1] + res.curve_n[hit]) // 2])


def _plan(
    inp: Inputs,
    g: Graph,
    noising: bool,
    batch_size: int,
    ig_steps: int,
    rules: str | None,
    n_confirm: int,
    sizes: list[int],
    ablation: str,
    memory_budget: int | None,
) -> memplan.Plan:
    """The memory plan of ``circuit``: edge attribution (its largest batch), exact patching of
    ``n_confirm`` single edges (the graph's first: the longest forwards) and the faithfulness curve
    (``sizes``: every edge but a few patched, from block 0)."""
    plan = memplan.Plan(memplan.weights(inp.model), chunks={"attribution rows": batch_size})
    stage = (inp.rows, inp.metric_fn, noising, batch_size, ig_steps, rules, g.latents)
    plan.stages["attribution"] = memplan.simulate(inp.model, edge_units, stage, heaviest_batch(inp, batch_size))
    ids = g.valid().flatten().nonzero().flatten()
    for name, groups, clean, abl in (
        ("confirmation", [_single(g, e) for e in ids[:n_confirm].tolist()], noising, "patch"),
        ("faithfulness", [g.valid()] * len(sizes), True, ablation),
    ):
        work = edge_patching.planned(inp, g, groups, memory_budget)
        edge_patching.memory_stage(plan, inp, g, groups, clean, abl, work, name)
    return plan


def _latent_nodes(inp: Inputs, n: int, noising: bool, batch_size: int, dry_run: bool) -> dict[int, list[int]]:
    """Per layer with a transcoder, its ``n`` latents of largest mean |AtP| over the pairs (one forward
    and backward per batch; without the pass, for a dry run, the first ``n``: the plan needs the count)."""
    ad = inp.model.adapter
    if not ad.dictionaries:
        return {}
    require_transcoders(
        ad, "circuits take transcoders, whose latents read and write the residual stream (SAE latents: scan, patch)"
    )
    for layer, d in sorted(ad.dictionaries.items()):
        if d.normalize_activations != "none":
            raise InputError(
                f"layer {layer}: a transcoder with normalize_activations {d.normalize_activations!r}: circuits "
                "read latents through W_enc alone (fold the normalisation into the weights)",
                field="sae",
            )
    if ad.family.readers[2] != "mlp":
        raise InputError(f"{ad.family.name} has no MLP module to split into latents", field="sae")
    if dry_run:
        return {layer: list(range(min(n, d.d_sae))) for layer, d in ad.dictionaries.items()}
    sweeps, comps = build_sweeps(inp.model, "feature:all", inp.lengths, inp.dataset.name)
    stage = Stage.of(inp, sweeps, "noising" if noising else "denoising", False, False, batch_size, 0, "input")
    score = estimate_nodes(inp.model, stage, len(comps))["signed"].abs().mean(0)
    out = {}
    for layer in sorted(ad.dictionaries):
        idx = torch.tensor([j for j, c in enumerate(comps) if c.layer == layer])
        top = score[idx].topk(min(n, len(idx)))
        out[layer] = sorted(comps[int(idx[k])].index for k, v in zip(top.indices, top.values, strict=True) if v > 0)
    return out


def grid(n_edges: int, size: int) -> list[int]:
    """Circuit sizes of the faithfulness curve: 0, 1, 2, 5, 10, 20, 50, ... below ``n_edges``, the
    circuit's ``size``, and every edge."""
    out, scale = {0, n_edges, min(size, n_edges)}, 1
    while scale < n_edges:
        out |= {m * scale for m in (1, 2, 5) if m * scale < n_edges}
        scale *= 10
    return sorted(out)


__all__ = ["ABLATIONS", "METHODS", "CircuitResult", "circuit", "grid", "to_dot"]


def _single(g: Graph, e: int) -> torch.Tensor:
    mask = torch.zeros(g.n_up * g.n_read, dtype=torch.bool)
    mask[e] = True
    return mask.view(g.n_up, g.n_read)


def _complement(valid: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Every edge of the graph but ``keep`` (flat edge ids)."""
    mask = valid.clone()
    mask.view(-1)[keep] = False
    return mask
