"""Conditional activation steering (CAST; Lee et al. 2024): add a behaviour vector only on rows whose
hidden state matches a condition.

Inside the pass, a tap at ``resid_pre`` of ``condition_layer`` scores each row: the cosine of its
mean residual over the prompt's positions with the ``condition`` vector. Rows scoring above
``threshold`` get ``alpha * vector`` added to ``resid_post`` of ``layer`` (at or after the condition
layer) through the ``perturb`` op with that per-row mask. In generation the mask is decided on the
prompt's forward and kept for the tokens that follow (their forwards see one position each).
``fit_threshold`` grid-searches the threshold on labelled prompts.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from causalscan.bindings import ops
from causalscan.data.prompts import by_length
from causalscan.errors import InputError, check_number, check_vector
from causalscan.model import runner
from causalscan.model.load import load


def _check(model, condition: torch.Tensor, vector: torch.Tensor | None, condition_layer: int, layer: int) -> None:
    ad = model.adapter
    for name, v in (("condition", condition), ("vector", vector)):
        if v is not None:
            check_vector(v, ad.d_model, name)
    if not 0 <= condition_layer <= layer < ad.n_layers:
        raise InputError(
            f"needs 0 <= condition_layer ({condition_layer}) <= layer ({layer}) < {ad.n_layers}", field="layer"
        )


def _score(x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """Cosine of each row's mean residual ``x`` [B, T, 1, D] with ``condition`` [D] -> [B]."""
    return torch.cosine_similarity(x[:, :, 0].float().mean(1), condition.float().to(x.device)[None], dim=-1)


@torch.no_grad()
def scores(
    model, prompts: torch.Tensor | list[list[int]], condition: torch.Tensor, condition_layer: int
) -> torch.Tensor:
    """The condition score of each prompt (token ids, one forward each length) ``[N]``."""
    model = load(model)
    _check(model, condition, None, condition_layer, condition_layer)
    rows = [list(p) for p in prompts.tolist()] if isinstance(prompts, torch.Tensor) else prompts
    out = torch.empty(len(rows))
    for idx in by_length(rows):
        store: dict = {}
        runner.forward(
            model.adapter,
            torch.tensor([rows[i] for i in idx], device=model.device),
            [runner.capture(model.adapter, "resid_pre", condition_layer, store)],
            stop=condition_layer + 1,
        )
        out[idx] = _score(store[("resid_pre", condition_layer)], condition).cpu()
    return out


def fit_threshold(model, positive, negative, condition: torch.Tensor, condition_layer: int) -> tuple[float, float]:
    """The threshold between the scores of ``positive`` (to steer) and ``negative`` prompts (token-id
    lists) with the best balanced accuracy, at a midpoint between neighbouring scores. Returns
    ``(threshold, balanced accuracy)``."""
    sp, sn = scores(model, positive, condition, condition_layer), scores(model, negative, condition, condition_layer)
    s = torch.cat([sp, sn]).sort().values
    cands = torch.cat([s[:1] - 1, (s[1:] + s[:-1]) / 2, s[-1:] + 1])
    acc = ((sp[None] > cands[:, None]).float().mean(1) + (sn[None] <= cands[:, None]).float().mean(1)) / 2
    best = int(acc.argmax())
    return cands[best].item(), acc[best].item()


@contextmanager
def cast(
    model,
    condition: torch.Tensor,
    vector: torch.Tensor,
    condition_layer: int,
    layer: int,
    threshold: float,
    alpha: float = 1.0,
):
    """Every forward of ``model.hf`` inside the block steers the rows whose condition score exceeds
    ``threshold``; yields a dict whose ``"mask"`` [B] and ``"score"`` [B] are those of the last
    prompt forward (``generate`` keeps them for the tokens it adds)."""
    model = load(model)
    _check(model, condition, vector, condition_layer, layer)
    check_number(threshold, "threshold")
    check_number(alpha, "alpha")
    state: dict = {"mask": None, "score": None}

    def decide(x):  # resid_pre [B, T, 1, D]
        if state["mask"] is None or x.shape[1] > 1 or x.shape[0] != state["mask"].shape[0]:
            state["score"] = _score(x, condition)
            state["mask"] = state["score"] > threshold

    def steer(x):  # resid_post [B, T, 1, D]
        mask = state["mask"].to(x.device)[:, None, None].expand(x.shape[0], x.shape[1], 1)
        return ops.perturb(
            x,
            "add",
            mask,
            vector=vector.to(x.device, x.dtype).reshape(1, 1, -1),
            alpha=torch.tensor([alpha], dtype=x.dtype, device=x.device),
        )

    with runner.installed(model.adapter, [("resid_pre", condition_layer, decide), ("resid_post", layer, steer)]):
        yield state


__all__ = ["cast", "fit_threshold", "scores"]
