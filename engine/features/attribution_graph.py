"""Attribution graphs for one prompt: direct effects between transcoder latents, error nodes, token
embeddings and the top logits in the prompt's local replacement model (Ameisen et al. 2025, as
circuit-tracer builds them).

**The local replacement model.** With transcoders attached (``sae=``), each MLP's output becomes
``f W_dec + skip(x) + err`` where a transcoder sits (``f`` its latents at every position, ``err``
the rest of the MLP's output there, ``b_dec`` included) and ``err`` alone where none does (the MLP's
whole output: one error node per layer and position either way). The attention patterns and every
norm's scale are held at their values on the prompt (:mod:`causalscan.model.relevance`'s ``cp``
attention rule and norm rule: the forward is the model's own), and the latents, errors and the
residual entering block 0 (token embeddings) are leaves. The model is then linear in its leaves,
so one backward from a target gives its **direct effect** from every source:
``A[t, s] = value_s . d target_t / d leaf_s`` (a latent's value is its activation; an error's or a
token's its vector).

**Targets** (rows): each active latent's pre-activation at its position (its encoder input) and
the logits at the last position that carry ``logit_prob`` of the probability (at most
``max_logits``), each minus the mean logit, read at the output embedding (before any soft cap).
Each backward carries ``batch_size`` targets: the forward runs that many copies of the prompt, row
``b`` seeded with target ``b``. With more active latents than ``max_features``, the logits' rows
come first and then latents in order of their influence on the logits so far (recomputed every
``batch_size`` rows), as circuit-tracer does.

**Completeness.** A target is the sum of its row plus the part of the biases: its encoder bias
``b_enc`` on a model without other biases (Llama, Mistral, Qwen3, Gemma); ``GraphResult.bias``
holds each target's rest.

>>> import causalscan as cs
>>> from causalscan.model import features
>>> m = cs.load("random:llama-tiny")
>>> tc = [features.random_dictionary(m, "mlp_in", layer, 32, "transcoder") for layer in (0, 1)]
>>> g = attribution_graph(m, "the cat sat on the", sae=tc)
>>> g.adjacency.shape[0] == g.n_features + 2 * g.n_pos + g.n_pos + len(g.logit_tokens)
True
"""

from __future__ import annotations

import time

import torch

from causalscan import memplan
from causalscan.errors import InputError, check_options
from causalscan.features.graph_result import GraphResult
from causalscan.features.influence import influence
from causalscan.features.replacement import probe, replacement
from causalscan.model import relevance
from causalscan.model.dictionary import TRANSCODERS
from causalscan.model.features import require_transcoders
from causalscan.model.load import Model, load
from causalscan.model.taps import frozen
from causalscan.progress import Progress, report

MAX_FEATURES = 2048


def _check(model: Model) -> None:
    ad = model.adapter
    if not ad.dictionaries:
        raise InputError("an attribution graph needs transcoders: sae=DIR (--sae DIR), one per layer", field="sae")
    require_transcoders(ad, "attribution graphs replace MLPs with transcoders (" + ", ".join(TRANSCODERS) + ")")
    if ad.post_ln:
        raise InputError("post-LN blocks: a norm after the residual add is not held linear", field="model")


def _tokens(model: Model, prompt) -> torch.Tensor:
    if isinstance(prompt, str):
        if not prompt:
            raise InputError("the prompt is empty", field="prompt")
        if model.tokenizer is None:
            raise InputError("the model has no tokenizer: give the prompt as token ids", field="prompt")
        ids = model.tokenizer(prompt)["input_ids"]
    else:
        ids = list(prompt)
        vocab = model.hf.get_input_embeddings().weight.shape[0]
        if not ids or not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
            raise InputError(f"token ids must be integers in [0, {vocab})", field="prompt")
    return torch.tensor(ids, device=model.device)


def attribution_graph(
    model,
    prompt,
    sae=None,
    max_logits: int = 10,
    logit_prob: float = 0.95,
    max_features: int | None = MAX_FEATURES,
    batch_size: int = 16,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    progress: Progress | None = None,
    memory_gb: float | None = None,
    dry_run: bool = False,
) -> GraphResult | memplan.Plan:
    """The attribution graph of ``prompt`` (a string or token ids) under ``model``'s transcoders
    (``sae``: folders or dictionaries, attached as :func:`causalscan.load` does; a layer without one
    keeps its MLP as error nodes).

    ``max_logits``, ``logit_prob``: the logit targets (the most probable tokens until their
    probability reaches ``logit_prob``); ``max_features``: latent targets (None: every active one);
    ``batch_size``: targets per backward (the rows the forward carries); ``node_threshold``,
    ``edge_threshold``: the pruning the JSON export and the report apply
    (:meth:`GraphResult.prune`). ``memory_gb``, ``dry_run``: the memory plan, as for every verb.
    """
    t0 = time.perf_counter()
    check_options(
        batch_size=batch_size,
        memory_gb=memory_gb,
        max_logits=max_logits,
        max_features=max_features,
        logit_prob=logit_prob,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )
    model = load(model, sae=sae)
    _check(model)
    ids = _tokens(model, prompt)
    with torch.no_grad():
        found = probe(model, ids)
    n_feat = len(found["features"])
    cap = n_feat if max_features is None else min(max_features, n_feat)
    probs, order = found["probs"].sort(descending=True)
    n_logits = min(max_logits, int((probs.cumsum(0) < logit_prob).sum()) + 1)
    logit_tokens, logit_probs = order[:n_logits], probs[:n_logits]
    plan = plan_memory(model, ids, n_feat, cap, n_logits, batch_size)
    if dry_run:
        return plan
    plan.check_gb(memory_gb)
    ad = model.adapter
    t, n_layers = len(ids), ad.n_layers
    feats = found["features"]  # [n_feat, 3]: layer, position, latent
    n_cols = n_feat + (n_layers + 1) * t  # sources: latents, errors (layer-major), tokens
    rows = torch.zeros(cap + n_logits, n_cols)
    row_node = torch.zeros(cap + n_logits, dtype=torch.long)  # the node each row is the target of
    target_value = torch.zeros(cap + n_logits)
    # per layer, the column of each (position, latent) that is on
    col = {layer: torch.full((t, ad.dictionaries[layer].d_sae), -1, dtype=torch.long) for layer in ad.dictionaries}
    for j, (layer, pos, i) in enumerate(feats.tolist()):
        col[layer][pos, i] = j
    with frozen(model.hf), relevance.rules(ad, "cp"):
        rep = replacement(model, ids, batch_size)
        leaves = [rep.embed] + [rep.latents[layer] for layer in sorted(rep.latents)]
        leaves += [rep.errors[layer] for layer in range(n_layers)]
        vocab = rep.logits.shape[-1]

        def backward(targets: list[tuple], last: bool) -> torch.Tensor:
            """Rows [len(targets), n_cols] of targets ``("logit", token)`` or ``("latent", j)``."""
            outs, seeds = [], []
            if any(kind == "logit" for kind, _ in targets):
                seed = torch.zeros_like(rep.logits)
                for b, (kind, v) in enumerate(targets):
                    if kind == "logit":
                        seed[b] = -1.0 / vocab
                        seed[b, v] += 1.0
                outs.append(rep.logits)
                seeds.append(seed)
            for layer in sorted({int(feats[v, 0]) for kind, v in targets if kind == "latent"}):
                seed = torch.zeros_like(rep.pre[layer])
                for b, (kind, v) in enumerate(targets):
                    if kind == "latent" and int(feats[v, 0]) == layer:
                        seed[b, feats[v, 1], feats[v, 2]] = 1.0
                outs.append(rep.pre[layer])
                seeds.append(seed)
            grads = torch.autograd.grad(outs, leaves, seeds, retain_graph=not last, allow_unused=True)
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)]
            out = torch.zeros(batch_size, n_cols)
            g_embed, g_lat, g_err = grads[0], grads[1 : 1 + len(rep.latents)], grads[1 + len(rep.latents) :]
            for layer, g in zip(sorted(rep.latents), g_lat, strict=True):
                on = col[layer] >= 0
                out[:, col[layer][on]] = (g * rep.latents[layer]).detach()[:, on].float().cpu()
            err = torch.stack([(g * rep.errors[layer]).sum(-1) for layer, g in enumerate(g_err)], 1)  # [B, L, T]
            out[:, n_feat : n_feat + n_layers * t] = err.detach().flatten(1).float().cpu()
            out[:, n_feat + n_layers * t :] = (g_embed * rep.embed).sum(-1).detach().float().cpu()
            return out[: len(targets)]

        logit_rows = [("logit", int(v)) for v in logit_tokens]
        done, visited = 0, torch.zeros(n_feat, dtype=torch.bool)
        total = -(-n_logits // batch_size) + -(-cap // batch_size)
        step = 0
        queue = [logit_rows[i : i + batch_size] for i in range(0, n_logits, batch_size)]
        while queue or done < cap + n_logits:
            if not queue:  # the next latents: every one, or the most influential ones so far
                pending = (
                    torch.arange(n_feat)
                    if cap == n_feat
                    else _by_influence(rows, row_node, done, n_logits, logit_probs, n_feat)
                )
                pending = pending[~visited[pending]][: min(4 * batch_size, cap + n_logits - done)]
                queue = [
                    [("latent", int(j)) for j in pending[i : i + batch_size]]
                    for i in range(0, len(pending), batch_size)
                ]
                visited[pending] = True
            batch = queue.pop(0)
            step += 1
            rows[done : done + len(batch)] = backward(batch, last=step == total)
            for b, (kind, v) in enumerate(batch):
                if kind == "logit":
                    row_node[done + b] = n_cols + logit_rows.index((kind, v))
                    target_value[done + b] = (rep.logits[0, v] - rep.logits[0].mean()).item()
                else:
                    row_node[done + b] = v
                    layer, pos, i = feats[v].tolist()
                    target_value[done + b] = rep.pre[layer][0, pos, i].item()
            done += len(batch)
            report(progress, "graph", step, total)
    selected = (row_node[:done] < n_feat).nonzero().flatten()
    chosen = row_node[selected].sort().values  # latents with a row, in node order
    return GraphResult.build(
        model=model,
        ids=ids,
        features=feats,
        activations=found["activations"],
        rows=rows[:done],
        row_node=row_node[:done],
        target_value=target_value[:done],
        chosen=chosen,
        logit_tokens=logit_tokens,
        logit_probs=logit_probs,
        settings={
            "max_logits": max_logits,
            "logit_prob": logit_prob,
            "max_features": max_features,
            "batch_size": batch_size,
            "node_threshold": node_threshold,
            "edge_threshold": edge_threshold,
            "transcoders": {str(layer): d.name for layer, d in sorted(ad.dictionaries.items())},
        },
        timings={"total_s": time.perf_counter() - t0},
        plan=plan,
    )


def _by_influence(rows, row_node, done, n_logits, logit_probs, n_feat) -> torch.Tensor:
    """Latents ordered by their influence on the logits through the rows computed so far."""
    weights = torch.zeros(done)
    weights[row_node[:done] >= rows.shape[1]] = logit_probs
    return influence(rows[:done], weights, row_node[:done])[:n_feat].argsort(descending=True)


def plan_memory(model: Model, ids: torch.Tensor, n_feat: int, cap: int, n_logits: int, batch_size: int) -> memplan.Plan:
    """The memory plan of a graph: the replacement forward over ``batch_size`` copies and one
    backward (on fake weights, through this module's own code), plus the rows the run keeps
    (``[cap + n_logits, sources]`` fp32, and as much again while they are ordered by influence or
    gathered into the result) and the square adjacency ``[N, N]`` with what pruning makes of it
    (the normalised adjacency, the pruned one and its edge scores)."""
    ad = model.adapter
    t = len(ids)
    n_cols = n_feat + (ad.n_layers + 1) * t
    n = cap + (ad.n_layers + 1) * t + n_logits
    held = 4 * (2 * (cap + n_logits) * n_cols + 4 * n * n)
    plan = memplan.Plan(memplan.weights(model), chunks={"targets per backward": batch_size})
    plan.stages["graph"] = memplan.simulate(model, _one_backward, (ids, batch_size), 0)
    plan.stages["graph"]["cpu"] = plan.stages["graph"].get("cpu", 0) + held
    return plan


def _one_backward(model: Model, ids: torch.Tensor, batch_size: int):
    """``compute(0)``: the replacement forward and one backward from every row's last logit (the
    heaviest step of a graph, for the memory plan)."""

    def compute(_unit) -> None:
        with frozen(model.hf), relevance.rules(model.adapter, "cp"):
            rep = replacement(model, ids, batch_size)
            leaves = [rep.embed, *rep.latents.values(), *rep.errors.values()]
            torch.autograd.grad(rep.logits[:, 0].sum(), leaves, allow_unused=True)

    return compute


__all__ = ["MAX_FEATURES", "attribution_graph", "plan_memory"]
