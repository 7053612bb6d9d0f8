"""The main job: scan every component with RelP / AtP / AtP*, then confirm the hits exactly.

``scan`` estimates every node of the requested sweeps in a fixed number of passes per batch of
pairs (:mod:`causalscan.patching.estimate`, :mod:`causalscan.patching.attribution`), ranks them by
the mean over pairs of the per-pair ``|estimate|`` (or the GradDrop score under AtP*), patches
exactly the sweeps no larger than their own confirmation sample (or cheaper than ``exact_budget``),
then re-measures each sweep's top ``confirm`` nodes and a random sample of the rest by batched exact
patching in the same direction, on the scan's own rows (:mod:`causalscan.patching.confirm`), ranks
the confirmed nodes by their exact effects, and reports how well the two agree and whether the
sweep's top may lie beyond what was confirmed. An optional false-negative diagnostic patches random
subsets of the unconfirmed nodes jointly. The memory plan of every stage is checked before any of
them runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from causalscan import memplan
from causalscan.checkpoint import Checkpoint, fingerprint
from causalscan.checkpoint import key as checkpoint_key
from causalscan.data import corruption
from causalscan.data.inputs import Inputs, prepare
from causalscan.data.sweeps import Component, Sweep, build_sweeps
from causalscan.errors import InputError, check_options
from causalscan.executor import get as executor_get
from causalscan.model import attention, relevance, runner
from causalscan.patching import confirm as confirmation
from causalscan.patching import ig
from causalscan.patching.estimate import Stage, attribution_units, estimate, heaviest_batch
from causalscan.patching.exact import memory_stage
from causalscan.patching.planner import planned
from causalscan.patching.scan_result import ScanResult
from causalscan.progress import Progress
from causalscan.progress import check as check_progress

METHODS = ("auto", "relp", "atp", "atp*", "atp-ig")
IG_STEPS = 10  # Marks et al. 2024
# RelP's attention rule. SmolLM2-135M, 16 IOI pairs (bench/bench_faithfulness.py), by position and by
# role: plain has the best recall@20 after confirmation on every sweep (0.95-1.00) and sign
# agreement >= 0.97; attnlrp loses recall on resid_pre (0.45 before confirmation, against 0.65-0.70)
# and cp loses sign agreement (0.62-0.83 on attn_out).
RELP_ATTENTION = "plain"
# The default (``auto``) scores these sites by AtP and every other by RelP, from one forward and two
# backwards. Neurons (SmolLM2, IOI): AtP's recall@20 1.00 and sign 0.98, RelP's 0.55 and 0.95 (0.65
# after confirmation); RelP is at least as good on every other sweep measured.
PLAIN_SITES = frozenset({"neuron"})


def scan(
    model,
    dataset,
    sites: str | Sequence[str] = ("head", "neuron", "resid_pre"),
    method: str = "auto",
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
    exact_budget: float | None = None,
    executor=None,
    memory_gb: float | None = None,
    dry_run: bool = False,
    relp_attention: str = RELP_ATTENTION,
) -> ScanResult | memplan.Plan:
    """Estimate the effect of every component of ``sites`` on ``metric``, then confirm the top.

    ``sites``: sweeps as in :func:`causalscan.patch` (``head`` ``[L, H]``, ``neuron`` ``[L, d_mlp]``,
    ``resid_pre`` ``[L, T]``, ``q``/``k``/``v``, ``head:pos`` ...). ``method``: ``auto`` (the
    default: neuron sweeps by AtP, every other by RelP, from one forward and two backwards;
    :data:`PLAIN_SITES`), ``relp`` (AtP with the relevance rules of
    :mod:`causalscan.model.relevance` in the backward, attention rule ``relp_attention``, and the
    QK fix for q/k nodes), ``atp``,
    ``atp*`` (QK fix for q/k nodes, and GradDrop with ``graddrop=True``) or ``atp-ig``
    (integrated gradients, ``ig_steps`` steps, default 10, along ``ig_path``: ``inputs``, the
    embeddings, N forwards and backwards per batch; or ``activations``, each site's own path, N per
    site and layer, from that layer on; every node's score is ``|estimate|``). ``exact_budget``: None
    (default): a sweep no larger than its confirmation sample (``confirm + confirm_random`` nodes,
    which confirmation would measure anyway) is patched exactly and not estimated; a number: every
    sweep whose exact patching costs at most this many plain forward + backward passes
    (:func:`causalscan.patching.confirm.exact_cost`) is (0: estimate every sweep); ``scored_by``
    says which. The AtP* ranking score
    of a node is ``max(|AtP|, GradDrop)`` per pair: GradDrop exposes effects that cancel in the
    total gradient, but on its own it also hides effects that run through a single downstream
    block (every layer-0 node of a 2-layer model scores only its direct effect), so it may raise a
    node's score, never lower it. The GradDrop score itself is kept (``graddrop/<sweep>``).
    ``confirm``: how many top nodes to re-measure exactly (0: none), plus ``confirm_random``
    (default ``confirm``) drawn uniformly from the rest. ``fn_subsets``: random joint patches for
    the AtP* false-negative diagnostic (0: skip), each unconfirmed node in a subset with
    probability ``fn_p``. ``batch_size``: rows per attribution pass. ``samples``, ``noise_scale``:
    Gaussian corruption of ``noise_span`` pairs (:mod:`causalscan.data.corruption`; each pair runs as
    ``samples`` rows, seeded by ``seed``, and its estimates are the means over them).
    ``checkpoint``: a directory where the attribution stage writes its partial sums as it goes (at
    most every ``checkpoint_every_s``); a scan with the same model weights, data and settings
    resumes from them, and the file is removed when the scan completes. ``progress(stage, done,
    total)``: called after each attribution batch and each unit of confirmation forwards.
    ``executor``: where attribution batches and patched forwards run (None: this process;
    :class:`causalscan.executor.Ray`: a Ray cluster's actors); the result is the same. Before any
    stage runs, the memory plan of all of them (:mod:`causalscan.memplan`: attribution, exact
    patching, confirmation) is checked against ``memory_gb`` GiB per device (default: what each
    device has free) and a run that cannot fit is refused; ``dry_run=True`` returns the plan instead.

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
        batch_size=batch_size,
        confirm=confirm,
        confirm_random=confirm_random,
        fn_subsets=fn_subsets,
        fn_p=fn_p,
        memory_gb=memory_gb,
    )
    inp = prepare(model, dataset, metric, direction, samples, noise_scale, seed)
    if method == "atp-ig":
        ig_steps = IG_STEPS if ig_steps is None else ig_steps
        if ig_path not in ig.PATHS:
            raise InputError(f"ig_path must be one of {', '.join(ig.PATHS)}, not {ig_path!r}", field="ig_path")
    elif ig_steps is not None:
        raise InputError(f"ig_steps needs method atp-ig, not {method!r}", field="ig_steps")
    elif ig_path != "inputs":
        raise InputError(f"ig_path needs method atp-ig, not {method!r}", field="ig_path")
    check_options(ig_steps=ig_steps, **({} if exact_budget is None else {"exact_budget": exact_budget}))
    attention_rule = relevance.attention_for(method, relp_attention, ("relp", "auto"), RELP_ATTENTION)
    if graddrop and method != "atp*":
        raise InputError(f"GradDrop is part of atp*, not {method}", field="graddrop")
    sweeps, comps = build_sweeps(inp.model, sites, inp.lengths, inp.dataset.name, inp.dataset.roles)
    cut = {sw.site for sw in sweeps} & {"q", "k"} if attention_rule == "cp" else set()
    if cut:
        raise InputError(
            f"the cp attention rule holds the pattern constant, so {' and '.join(sorted(cut))} get no "
            f"relevance (and the QK fix would score what it removes): use relp_attention plain or attnlrp",
            field="relp_attention",
        )
    n_random = confirm if confirm_random is None else confirm_random
    n_confirm = confirm + n_random if confirm else 0
    if exact_budget is None:  # no larger than its confirmation sample: measuring it all costs no more
        exact = [sw for sw in sweeps if sw.stop - sw.start <= n_confirm]
    else:  # a budget prices every sweep (0 plans nothing: no cost walk over every node)
        exact = confirmation.exact_sweeps(inp, sweeps, comps, exact_budget) if exact_budget else []
    exact_groups = [[comps[j]] for sw in exact for j in range(sw.start, sw.stop)]
    exact_work = planned(inp.model, inp.rows, exact_groups)  # planned once: for the memory plan and the run
    qk_fix = method == "atp*" or attention_rule not in (None, "cp")
    plain = PLAIN_SITES & {sw.site for sw in sweeps} if method == "auto" else frozenset()
    rules = attention_rule if any(sw.site not in plain for sw in sweeps) else None
    scored = {sw.name: ("atp" if sw.site in plain else "relp") if method == "auto" else method for sw in sweeps}
    stage = Stage.of(
        inp,
        sweeps,
        direction,
        qk_fix,
        graddrop,
        batch_size,
        ig_steps or 0,
        ig_path,
        rules,
        plain if rules else frozenset(),
    )
    plan = _plan(
        inp,
        stage,
        batch_size,
        exact_groups,
        exact_work,
        [sw for sw in sweeps if sw not in exact],
        comps,
        n_confirm,
        direction,
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
            **({"relp_attention": attention_rule} if attention_rule else {}),
        }
        ck = Checkpoint(checkpoint, "scan", checkpoint_key(settings), checkpoint_every_s)
    sums = estimate(inp.model, stage, len(comps), ck, progress, executor)
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
        corrupt=sums["corrupt"],
        ig_steps=ig_steps,
        ig_path=ig_path if ig_steps else None,
        scored_by=scored,
        tokens=inp.tokens(),
        timings={"attribution_s": time.perf_counter() - t0},
    )
    if exact:
        t1 = time.perf_counter()
        confirmation.patch_exactly(res, inp, exact, exact_work, progress, executor)
        res.timings["exact_s"] = time.perf_counter() - t1
    if confirm and any(m != "exact" for m in res.scored_by.values()):
        t1 = time.perf_counter()
        confirmation.confirm(res, inp, confirm, n_random, seed, progress, executor)
        res.timings["confirm_s"] = time.perf_counter() - t1
    if fn_subsets:
        from causalscan.patching.negatives import false_negative_bound

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


def _plan(
    inp: Inputs,
    stage: tuple,
    batch_size: int,
    exact_groups: list,
    exact_work: list,
    estimated: list[Sweep],
    comps: list[Component],
    n_confirm: int,
    direction: str,
) -> memplan.Plan:
    """The scan's memory plan: the attribution stage (its largest batch), exact patching of the exact
    sweeps (the plan they run by) and the confirmation of ``n_confirm`` estimated nodes (the earliest
    ones: the longest forwards)."""
    plan = memplan.Plan(memplan.weights(inp.model), chunks={"attribution rows": batch_size})
    plan.stages["attribution"] = memplan.simulate(inp.model, attribution_units, stage, heaviest_batch(inp, batch_size))
    rows, fn = inp.rows, inp.metric_fn
    memory_stage(plan, inp.model, rows, exact_groups, direction, fn, exact_work, "exact patching")
    sample = [[c] for sw in estimated for c in comps[sw.start : sw.stop]][:n_confirm]
    memory_stage(plan, inp.model, rows, sample, direction, fn, planned(inp.model, rows, sample), "confirmation")
    return plan


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


__all__ = ["METHODS", "PLAIN_SITES", "RELP_ATTENTION", "ScanResult", "scan"]
