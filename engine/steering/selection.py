"""Choose a direction by what it does, not by how well it separates the prompts (Arditi et al. 2024).

For each candidate (a method's direction at one layer, from :func:`causalscan.directions`):

- **ablation**: the unit direction projected out of every residual write (layer 0's ``resid_pre``,
  i.e. the embeddings, and every ``attn_out`` and ``mlp_out``) on the *positive* prompts; its effect
  is the mean change of the behaviour metric;
- **addition**: ``alpha * |diff_means[layer]|`` times the unit direction added to ``resid_pre`` of the
  candidate's layer on the *negative* prompts, for each ``alpha``;
- **KL guard**: the same interventions on *neutral* prompts: the mean KL divergence of the
  next-token distribution from the unsteered one.

The behaviour metric is the log-probability of the token ``target`` at each prompt's last position,
or any callable of the next-token log-probabilities ``[N, V] -> [N]`` (a logit difference between
two answer tokens, the mass of a word list).
Every forward carries many candidates: row ``(candidate, prompt)`` gets its own direction through
the ``perturb`` op's per-row parameters. Candidates are ranked by ablation effect (most negative
first) among those whose ablation KL is at most ``kl_max``.
"""

from __future__ import annotations

import time

import torch

from causalscan.data.prompts import by_length
from causalscan.errors import InputError, check_number, check_type
from causalscan.model import interventions as iv
from causalscan.model.load import load
from causalscan.progress import log
from causalscan.steering.directions import DirectionResult, encode_prompts


@torch.no_grad()
def steered_logprobs(
    model,
    prompts: list[list[int]],
    units: torch.Tensor,
    op: str,
    layers: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    batch_rows: int = 256,
) -> torch.Tensor:
    """Next-token log-probabilities ``[K, N, V]`` of ``prompts`` (token-id lists) under each of ``K``
    interventions: ``op="ablate"``: unit direction ``units[k]`` projected out of every residual write;
    ``op="add"``: ``scales[k] * units[k]`` added to ``resid_pre`` of ``layers[k]``; ``op="none"``:
    unsteered (``K = 1``)."""
    dev, k_n = model.device, 1 if op == "none" else len(units)
    out: torch.Tensor | None = None
    for idx in by_length(prompts):
        rows = [(k, i) for k in range(k_n) for i in idx]
        for lo in range(0, len(rows), batch_rows):
            chunk = rows[lo : lo + batch_rows]
            ids = torch.tensor([prompts[i] for _, i in chunk], device=dev)
            ks = torch.tensor([k for k, _ in chunk], device=dev)
            if op == "none":
                logits = model.hf(input_ids=ids).logits[:, -1]
            elif op == "ablate":
                u = units.to(dev)[ks][:, None]  # [rows, 1, d]: one direction per row
                logits = iv.perturb(
                    model,
                    iv.project_out("resid_pre", u, layers=0),
                    iv.project_out("attn_out", u),
                    iv.project_out("mlp_out", u),
                    input_ids=ids,
                )[:, -1]
            else:
                vec = (units.to(dev) * scales.to(dev)[:, None])[ks]
                lay = layers.to(dev)[ks]
                adds = [
                    iv.add("resid_pre", (vec * (lay == layer)[:, None])[:, None], layers=int(layer))
                    for layer in lay.unique().tolist()
                ]
                logits = iv.perturb(model, *adds, input_ids=ids)[:, -1]
            lp = logits.float().log_softmax(-1).cpu()
            if out is None:
                out = torch.empty(k_n, len(prompts), lp.shape[-1])
            out[ks.cpu(), torch.tensor([i for _, i in chunk])] = lp
    return out


def kl_divergence(base: torch.Tensor, steered: torch.Tensor) -> torch.Tensor:
    """Mean over prompts of KL(base || steered) ``[K]`` from log-probabilities ``[1|K, N, V]``."""
    return (base.exp() * (base - steered)).sum(-1).mean(-1)


def select(
    model,
    result: DirectionResult,
    positive,
    negative,
    neutral,
    target,
    methods: tuple[str, ...] = ("diff_means", "pca"),
    alphas: tuple[float, ...] = (0.5, 1.0, 2.0),
    kl_max: float = 0.1,
    layers: list[int] | None = None,
    chat: bool = False,
) -> list[dict]:
    """Every candidate's ablation and addition effects and KL (see the module docstring), ranked.

    Returns one row per candidate: ``method``, ``layer``, ``ablation`` (mean change of the
    behaviour metric on ``positive``), ``ablation_kl`` (on ``neutral``), ``addition`` (per alpha, the
    mean change on ``negative``), ``addition_kl`` (per alpha, on ``neutral``), ``kl_ok``; sorted with
    the KL-admissible candidates first, then by ablation effect (most negative first)."""
    t0 = time.perf_counter()
    model = load(model)
    check_type(result, DirectionResult, "result", "a DirectionResult from causalscan.directions")
    check_number(kl_max, "kl_max")
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    if callable(target):
        metric = target
    elif isinstance(target, int) and not isinstance(target, bool) and 0 <= target < vocab:

        def metric(lp, t=target):
            return lp[..., t]
    else:
        raise InputError(
            f"must be a token id in [0, {vocab}) or a callable of log-probabilities [N, V], not {target!r:.60}",
            field="target",
        )
    for m in methods:
        if m not in ("diff_means", "pca") or getattr(result, m) is None:
            raise InputError(f"no {m!r} directions in this result (diff_means, pca)", field="methods")
    norms = result.diff_means.norm(dim=-1)
    layers = [la for la in (layers if layers is not None else range(len(norms))) if norms[la] > 0]
    cands = [(m, la) for m in methods for la in layers]
    if not cands:
        raise InputError("no candidate: every chosen layer's difference of means is zero", field="layers")
    units = torch.stack([result.unit(m)[la] for m, la in cands])
    lay = torch.tensor([la for _, la in cands])
    pos, neg, neu = (
        encode_prompts(model, x, name, chat)
        for x, name in ((positive, "positive"), (negative, "negative"), (neutral, "neutral"))
    )
    base_pos, base_neg, base_neu = (steered_logprobs(model, x, units, "none") for x in (pos, neg, neu))
    abl_pos, abl_neu = (steered_logprobs(model, x, units, "ablate") for x in (pos, neu))

    def behaviour(lp: torch.Tensor) -> torch.Tensor:  # [K, N, V] -> [K, N]
        return torch.stack([torch.as_tensor(metric(x)).float() for x in lp])

    ablation = (behaviour(abl_pos) - behaviour(base_pos)).mean(-1)
    base_behaviour = behaviour(base_neg)
    ablation_kl = kl_divergence(base_neu, abl_neu)
    addition, addition_kl = [], []
    for a in alphas:
        scales = float(a) * norms[lay]
        addition.append((behaviour(steered_logprobs(model, neg, units, "add", lay, scales)) - base_behaviour).mean(-1))
        addition_kl.append(kl_divergence(base_neu, steered_logprobs(model, neu, units, "add", lay, scales)))
    rows = [
        {
            "method": m,
            "layer": la,
            "ablation": ablation[k].item(),
            "ablation_kl": ablation_kl[k].item(),
            "addition": {str(a): addition[j][k].item() for j, a in enumerate(alphas)},
            "addition_kl": {str(a): addition_kl[j][k].item() for j, a in enumerate(alphas)},
            "kl_ok": ablation_kl[k].item() <= kl_max,
        }
        for k, (m, la) in enumerate(cands)
    ]
    rows.sort(key=lambda r: (not r["kl_ok"], r["ablation"]))
    log.info("select: %d candidates in %.2fs", len(rows), time.perf_counter() - t0)
    return rows


__all__ = ["kl_divergence", "select", "steered_logprobs"]
