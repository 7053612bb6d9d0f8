"""The main job: scan every component with AtP / AtP*, then confirm the hits exactly.

``scan`` estimates every node of the requested sweeps in a fixed number of passes per batch of
pairs (:mod:`causalscan.attribution`), ranks them by the mean over pairs of the per-pair
``|estimate|`` (AtP) or the GradDrop score (AtP*), then re-measures the top ``confirm`` nodes and
a random sample of the rest by batched exact patching in the same direction, on the scan's own
rows (:func:`causalscan.patching.measure`), and reports how well the two agree. An optional
false-negative diagnostic patches random subsets of the unconfirmed nodes jointly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from causalscan import attention, attribution, corruption, runner
from causalscan.checkpoint import Checkpoint, fingerprint, run
from causalscan.checkpoint import key as checkpoint_key
from causalscan.errors import InputError, check_options
from causalscan.executor import get as executor_get
from causalscan.inputs import Inputs, prepare
from causalscan.patching import cost, measure
from causalscan.progress import Progress
from causalscan.progress import check as check_progress
from causalscan.results import ScanResult
from causalscan.sweeps import Component, Sweep, build_sweeps

METHODS = ("atp", "atp*", "atp-ig")
IG_STEPS = 10  # Marks et al. 2024
# A sweep is patched exactly instead of estimated when that costs at most this many plain forward +
# backward passes (patching.cost). SmolLM2-135M, 16 IOI pairs: resid_pre/attn_out/mlp_out over the
# four roles 14 each (exact: AtP's recall@20 there is 0.30), heads 35 and neurons 6000 (estimated:
# AtP's recall@20 0.90 and 1.00); bench/bench_faithfulness.py.
EXACT_BUDGET = 20.0
SIGN_FLOOR = 0.05  # sign agreement counts nodes whose exact mean effect is >= 5% of the largest


def scan(
    model,
    dataset,
    sites: str | Sequence[str] = ("head", "neuron", "resid_pre"),
    method: str = "atp*",
    confirm: int = 32,
    confirm_random: int | None = None,
    direction: str = "noising",
    metric="logit_diff",
    batch_size: int = 8,
    graddrop: bool = False,
    fn_subsets: int = 0,
    fn_p: float = 0.1,
    seed: int = 0,
    progress: Progress | None = None,
    samples: int = corruption.SAMPLES,
    noise_scale: float = corruption.SCALE,
    checkpoint: str | Path | None = None,
    checkpoint_every_s: float = 30.0,
    ig_steps: int | None = None,
    ig_path: str = "inputs",
    exact_budget: float = EXACT_BUDGET,
    executor=None,
) -> ScanResult:
    """Estimate the effect of every component of ``sites`` on ``metric``, then confirm the top.

    ``sites``: sweeps as in :func:`causalscan.patch` (``head`` ``[L, H]``, ``neuron`` ``[L, d_mlp]``,
    ``resid_pre`` ``[L, T]``, ``q``/``k``/``v``, ``head:pos`` ...). ``method``: ``atp``,
    ``atp*`` (QK fix for q/k nodes, and GradDrop with ``graddrop=True``) or ``atp-ig``
    (integrated gradients, ``ig_steps`` steps, default 10, along ``ig_path``: ``inputs``, the
    embeddings, N forwards and backwards per batch; or ``activations``, each site's own path, N per
    site and layer, from that layer on; every node's score is ``|estimate|``). ``exact_budget``: a sweep whose exact
    patching costs at most this many plain forward + backward passes (:func:`exact_cost`) is
    patched exactly and not estimated (0: estimate every sweep); ``scored_by`` says which. The AtP* ranking score
    of a node is ``max(|AtP|, GradDrop)`` per pair: GradDrop exposes effects that cancel in the
    total gradient, but on its own it also hides effects that run through a single downstream
    block (every layer-0 node of a 2-layer model scores only its direct effect), so it may raise a
    node's score, never lower it. The GradDrop score itself is kept (``graddrop/<sweep>``).
    ``confirm``: how many top nodes to re-measure exactly (0: none), plus ``confirm_random``
    (default ``confirm``) drawn uniformly from the rest. ``fn_subsets``: random joint patches for
    the AtP* false-negative diagnostic (0: skip), each unconfirmed node in a subset with
    probability ``fn_p``. ``batch_size``: rows per attribution pass. ``samples``, ``noise_scale``:
    Gaussian corruption of ``noise_span`` pairs (:mod:`causalscan.corruption`; each pair runs as
    ``samples`` rows, seeded by ``seed``, and its estimates are the means over them).
    ``checkpoint``: a directory where the attribution stage writes its partial sums as it goes (at
    most every ``checkpoint_every_s``); a scan with the same model weights, data and settings
    resumes from them, and the file is removed when the scan completes. ``progress(stage, done,
    total)``: called after each attribution batch and each unit of confirmation forwards.
    ``executor``: where attribution batches and patched forwards run (None: this process;
    :class:`causalscan.executor.Ray`: a Ray cluster's actors); the result is the same.

    >>> import causalscan as cs
    >>> data = cs.zoo.dataset_path("induction", "previous")
    >>> res = scan("induction", data, sites="head", confirm=4)
    >>> res.scored_by  # 4 heads of a 2-layer model: cheaper to patch than to trust an estimate
    {'head': 'exact'}
    >>> sorted((row["layer"], row["index"]) for row in res.top(4))  # the card's four heads
    [(0, 0), (0, 1), (1, 0), (1, 1)]
    >>> est = scan("induction", data, sites="head", confirm=4, exact_budget=0)  # estimate, then confirm
    >>> est.agreement["recall_at_k"]
    1.0
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, not {method!r}", field="method")
    check_progress(progress)
    executor_get(executor)
    check_options(
        batch_size=batch_size, confirm=confirm, confirm_random=confirm_random, fn_subsets=fn_subsets, fn_p=fn_p
    )
    inp = prepare(model, dataset, metric, direction, samples, noise_scale, seed)
    if method == "atp-ig":
        ig_steps = IG_STEPS if ig_steps is None else ig_steps
        if ig_path not in attribution.IG_PATHS:
            raise InputError(
                f"ig_path must be one of {', '.join(attribution.IG_PATHS)}, not {ig_path!r}", field="ig_path"
            )
    elif ig_steps is not None:
        raise InputError(f"ig_steps needs method atp-ig, not {method!r}", field="ig_steps")
    elif ig_path != "inputs":
        raise InputError(f"ig_path needs method atp-ig, not {method!r}", field="ig_path")
    check_options(ig_steps=ig_steps, exact_budget=exact_budget)
    if graddrop and method != "atp*":
        raise InputError(f"GradDrop is part of atp*, not {method}", field="graddrop")
    sweeps, comps = build_sweeps(inp.model, sites, inp.lengths, inp.dataset.name, inp.dataset.roles)
    ck = None
    if checkpoint is not None:
        settings = {
            "model": inp.model.name,
            "weights": fingerprint(inp.model.hf),
            "data": inp.dataset.sha256,
            "nodes": len(comps),
            "sites": list(sites) if not isinstance(sites, str) else sites,
            "method": method,
            "graddrop": graddrop,
            "direction": direction,
            "metric": inp.metric,
            "samples": samples,
            "noise_scale": noise_scale,
            "seed": seed,
            "batch_size": batch_size,
            "ig_steps": ig_steps,
            "ig_path": ig_path,
        }
        ck = Checkpoint(checkpoint, "scan", checkpoint_key(settings), checkpoint_every_s)
    sums = estimate(
        inp,
        sweeps,
        len(comps),
        direction,
        method == "atp*",
        graddrop,
        batch_size,
        ck,
        progress,
        ig_steps or 0,
        ig_path,
        executor,
    )
    signed, gd = sums["signed"], sums.get("graddrop")
    res = ScanResult(
        **inp.header(),
        direction=direction,
        method=method,
        graddrop=gd,
        components=comps,
        sweeps=sweeps,
        signed=signed,
        score=torch.maximum(signed.abs(), gd) if graddrop else signed.abs(),
        clean=sums["clean"],
        ig_steps=ig_steps,
        ig_path=ig_path if ig_steps else None,
        scored_by={sw.name: method for sw in sweeps},
        tokens=inp.tokens(),
        corrupt=sums["corrupt"],
        timings={"attribution_s": time.perf_counter() - t0},
    )
    exact_sweeps = (
        [sw for sw in sweeps if exact_cost(inp, comps[sw.start : sw.stop]) <= exact_budget] if exact_budget else []
    )  # the default (0) plans nothing: no cost walk over every node
    if exact_sweeps:
        t1 = time.perf_counter()
        _patch_exactly(res, inp, exact_sweeps, progress, executor)
        res.timings["exact_s"] = time.perf_counter() - t1
    if confirm and any(m != "exact" for m in res.scored_by.values()):
        t1 = time.perf_counter()
        _confirm(res, inp, confirm, confirm if confirm_random is None else confirm_random, seed, progress, executor)
        res.timings["confirm_s"] = time.perf_counter() - t1
    if fn_subsets:
        from causalscan.negatives import false_negative_bound

        t1 = time.perf_counter()
        res.false_negatives = false_negative_bound(
            res, inp.model, inp.rows, inp.metric_fn, fn_subsets, p=fn_p, seed=seed, progress=progress, executor=executor
        )
        res.timings["false_negatives_s"] = time.perf_counter() - t1
    res.patterns = top_patterns(res, inp)
    res.timings["total_s"] = time.perf_counter() - t0
    if ck:
        ck.remove()
    return res


def estimate(
    inp: Inputs,
    sweeps: list[Sweep],
    n_nodes: int,
    direction: str,
    qk_fix: bool,
    graddrop: bool,
    batch_size: int,
    ck: Checkpoint | None = None,
    progress: Progress | None = None,
    ig_steps: int = 0,
    ig_path: str = "inputs",
    executor=None,
) -> dict:
    """The attribution stage: per-pair sums over each pair's rows, ``signed`` (and ``graddrop``)
    ``[P, n]`` and the ``clean``/``corrupt`` metrics ``[P]``, one batch of ``batch_size`` rows (of
    one token length) at a time, on ``executor`` (:mod:`causalscan.executor`); resumed from and
    written to ``ck`` as it goes."""
    n_pairs, per_row = len(inp.pairs), 1.0 / inp.rows.samples
    sums = {"signed": torch.zeros(n_pairs, n_nodes), "clean": torch.zeros(n_pairs), "corrupt": torch.zeros(n_pairs)}
    if graddrop:
        sums["graddrop"] = torch.zeros(n_pairs, n_nodes)
    args = (replace(inp, model=None), sweeps, direction, qk_fix, graddrop, batch_size, ig_steps, ig_path)

    def add(sums, part):
        for name in ("signed", "graddrop", "clean", "corrupt"):
            if name in sums:
                sums[name].index_add_(0, part["owner"], per_row * part[name])

    return run(
        ck,
        sums,
        len(inp.rows.batches(batch_size)),
        lambda todo: executor_get(executor).map(inp.model, attribution_units, args, todo),
        add,
        progress,
    )


def attribution_units(
    model,
    inp: Inputs,
    sweeps: list[Sweep],
    direction: str,
    qk_fix: bool,
    graddrop: bool,
    batch_size: int,
    ig_steps: int,
    ig_path: str,
):
    """``compute(i)``: attribution batch ``i`` of ``inp.rows.batches(batch_size)`` on ``model``, as the
    per-row ``signed`` (and ``graddrop``) ``[B, n]``, ``clean``/``corrupt`` metrics [B] and their
    pairs ``owner`` [B]."""
    inp = replace(inp, model=model)
    rows, noising, roles = inp.rows, direction == "noising", inp.dataset.roles
    batches = rows.batches(batch_size)
    embed = inp.model.hf.get_input_embeddings().weight

    def compute(i: int) -> dict:
        batch = batches[i]
        b = rows.batch(batch, noising, embed)

        def metric(logits, clean_logprobs):
            return inp.metric_fn(logits, b.labels, clean_logprobs)

        role_pos = torch.tensor([[rows.pairs[j].roles[r] for r in roles] for j in batch]) if roles else None
        out = attribution.attribute(
            inp.model.adapter,
            b.base,
            b.other,
            metric,
            sweeps,
            qk_fix=qk_fix,
            graddrop=graddrop,
            base_is_clean=noising,
            base_noise=b.base_noise,
            other_noise=b.other_noise,
            role_pos=role_pos,
            keep=rows.keep,
            ig_steps=ig_steps,
            ig_path=ig_path,
        )
        part = {
            name: torch.cat([out[name][sw.name].flatten(1) for sw in sweeps], 1).cpu()
            for name in (("signed", "graddrop") if graddrop else ("signed",))
        }
        clean_run, corrupt_run = (out["base"], out["other"]) if noising else (out["other"], out["base"])
        return {**part, "clean": clean_run.cpu(), "corrupt": corrupt_run.cpu(), "owner": rows.owner[batch]}

    return compute


@torch.no_grad()
def top_patterns(res: ScanResult, inp: Inputs, n: int = 4) -> dict[str, torch.Tensor]:
    """The attention patterns [T, T] of the ``n`` top-scoring heads on the first pair's clean prompt
    (for the report), by component name; empty without a ``head`` sweep."""
    sw = next((sw for sw in res.sweeps if sw.site == "head" and not sw.by_pos), None)
    if sw is None:
        return {}
    top = res.score[:, sw.start : sw.stop].mean(0).argsort(descending=True)[:n]
    comps = [res.components[sw.start + j] for j in top.tolist()]
    ad, rec = inp.model.adapter, {}
    with attention.recording(ad, {c.layer for c in comps}, rec):
        runner.forward(ad, torch.tensor([inp.pairs[0].clean], device=inp.model.device))
    return {str(c): rec[c.layer].pattern()[0, c.index].cpu() for c in comps}


def exact_cost(inp: Inputs, comps: list[Component]) -> float:
    """What patching every node of ``comps`` exactly costs, in plain forward + backward passes of the
    scan's rows (:func:`causalscan.patching.cost`)."""
    return cost(inp.model, inp.rows, [[c] for c in comps])


def _patch_exactly(res: ScanResult, inp: Inputs, sweeps: list[Sweep], progress: Progress | None, executor=None) -> None:
    """Replace the estimates of ``sweeps`` by their exact effects (per pair), in ``signed`` and ``score``."""
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
    )
    effect = m.effect(res.direction)
    res.signed[:, cols], res.score[:, cols] = effect, effect.abs()
    if res.graddrop is not None:
        res.graddrop[:, cols] = effect.abs()
    res.scored_by.update({sw.name: "exact" for sw in sweeps})


def _confirm(
    res: ScanResult, inp: Inputs, k: int, n_random: int, seed: int, progress: Progress | None, executor=None
) -> None:
    """Exact effects of the top ``k`` nodes and ``n_random`` others, measured on the scan's own rows,
    and of a sample stratified by sweep (when there are several): each sweep's own top
    ``min(k, size // 2)`` and as many random others, so that every sweep gets its own agreement
    statistics and a badly estimated sweep cannot hide behind a well estimated one."""
    score = res.score.mean(0)
    g = torch.Generator().manual_seed(seed)
    estimated = [sw for sw in res.sweeps if res.scored_by[sw.name] != "exact"]  # exact sweeps need no check
    pooled, k = _top_and_random(score, torch.cat([torch.arange(sw.start, sw.stop) for sw in estimated]), k, n_random, g)
    strata = {}
    if len(estimated) > 1:
        for sw in estimated:
            ids = torch.arange(sw.start, sw.stop)
            k_s = min(k, len(ids) // 2) if k else 0
            strata[sw.name] = (_top_and_random(score, ids, k_s, n_random, g)[0], k_s)
    seen = dict.fromkeys(pooled.tolist())  # the pooled sample first, in order, then each sweep's new nodes
    for ids, _ in strata.values():
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

    def agree(ids: torch.Tensor, k_s: int) -> dict:
        cols = torch.tensor([col[j] for j in ids.tolist()], dtype=torch.long)
        return agreement(score[ids], res.signed.mean(0)[ids], res.exact[:, cols], k_s)

    res.agreement = agree(pooled, k)
    res.agreement_by_sweep = {name: agree(ids, k_s) for name, (ids, k_s) in strata.items()} or {
        estimated[0].name: res.agreement
    }
    res.timings["confirm_forwards"] = m.forwards


def _top_and_random(
    score: torch.Tensor, ids: torch.Tensor, k: int, n_random: int, g: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Node ids: the ``k`` of ``ids`` with the highest ``score``, then ``n_random`` of the rest at random."""
    order = ids[score[ids].argsort(descending=True)]
    k = min(k, len(order))
    rest = order[k:]
    return torch.cat([order[:k], rest[torch.randperm(len(rest), generator=g)[:n_random]]]), k


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


__all__ = ["METHODS", "Component", "agreement", "scan", "spearman"]
