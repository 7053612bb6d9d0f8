"""Directions from labelled contrasts: difference of means (ActAdd, CAA, the refusal direction), the
first principal component of paired differences (RepE) and per-head logistic probes (ITI).

One batched no-grad pass per prompt set (prompts of one token length per forward) reads the
residual entering every block (``resid_pre``, ``[L, d_model]``) and, for probes, every head's output
before the output projection (``head``, ``[L, H, d_head]``) and reduces each to the chosen position
inside the tap: the last token, the mean over the prompt, one token index (negative: from the end)
or the mean over a span ``(start, stop)``, ``0 <= start < stop``. What is kept is one vector per
prompt, layer (and head), never a cache of all positions.

- ``diff_means[l] = mean_pos(x_l) - mean_neg(x_l)`` (not normalised: its norm is the size of the
  contrast; ``unit()`` normalises).
- ``pca[l]``: the top right singular vector of the paired differences ``x_l(pos_i) - x_l(neg_i)``,
  uncentred, so a contrast whose pairs come in either order (RepE's random signs) is still found;
  its sign is the one that agrees with ``diff_means`` (needs as many positive as negative prompts).
- ``probes[l, h]``: the unit weight vector of an L2-regularised logistic regression of the label on
  the head's output (all ``L x H`` probes fitted together by L-BFGS), and ``probe_accuracy[l, h]`` on
  a held-out fifth of the prompts (ITI picks the heads with the best).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from causalscan import files
from causalscan.data.prompts import by_length, encode
from causalscan.errors import InputError, check_options, is_int
from causalscan.model import runner
from causalscan.model.load import load

POSITIONS = ("last", "mean")


@dataclass
class DirectionResult:
    """Candidate directions at every layer; see the module docstring. ``diff_means``/``pca``
    ``[L, d_model]``, ``probes`` ``[L, H, d_head]`` and ``probe_accuracy`` ``[L, H]`` (None without probes)."""

    model: str
    position: str | int | tuple[int, int]
    n_positive: int
    n_negative: int
    diff_means: torch.Tensor
    pca: torch.Tensor | None
    probes: torch.Tensor | None = None
    probe_accuracy: torch.Tensor | None = None
    timings: dict = field(default_factory=dict)

    def unit(self, method: str = "diff_means") -> torch.Tensor:
        """The ``method`` direction of every layer at unit norm ``[L, d_model]`` (zero where it is zero)."""
        d = getattr(self, method)
        return d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def summary(self) -> dict:
        from causalscan.versions import versions

        doc = {
            "kind": "directions",
            "model": self.model,
            "position": self.position,
            "prompts": {"positive": self.n_positive, "negative": self.n_negative},
            "diff_means_norm": self.diff_means.norm(dim=-1).tolist(),
        }
        if self.pca is not None:
            doc["pca_cosine_with_diff_means"] = torch.cosine_similarity(self.pca, self.diff_means, dim=-1).tolist()
        if self.probe_accuracy is not None:
            acc = self.probe_accuracy
            order = acc.flatten().argsort(descending=True)[:10].tolist()
            doc["best_probes"] = [
                {"layer": j // acc.shape[1], "head": j % acc.shape[1], "accuracy": acc.flatten()[j].item()}
                for j in order
            ]
        return {**doc, "timings": self.timings, "versions": versions()}

    def notes(self, doc: dict) -> list[str]:
        return [
            f"direction: {self.n_positive} positive, {self.n_negative} negative prompts, "
            f"{doc['timings']['directions_s']:.2f}s"
        ]

    def lines(self, doc: dict) -> list[str]:
        cos = doc.get("pca_cosine_with_diff_means")
        out = [
            f"layer {layer:3d}  |diff of means| {norm:10.4g}" + (f"  cos(pca) {cos[layer]:+.3f}" if cos else "")
            for layer, norm in enumerate(doc["diff_means_norm"])
        ]
        out += [
            f"probe L{row['layer']}.H{row['head']}  held-out accuracy {row['accuracy']:.3f}"
            for row in doc.get("best_probes", [])[:5]
        ]
        return out

    def save(self, out_dir: str | Path) -> Path:
        """``directions.safetensors`` (every direction; metadata: model, position) and ``directions.json``."""
        out = files.out_dir(out_dir)
        tensors = {
            k: v.float().contiguous()
            for k, v in (
                ("diff_means", self.diff_means),
                ("pca", self.pca),
                ("probes", self.probes),
                ("probe_accuracy", self.probe_accuracy),
            )
            if v is not None
        }
        meta = {"model": self.model, "position": str(self.position), "site": "resid_pre"}
        files.write(out / "directions.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        files.write(out / "directions.json", files.strict_json(self.summary()))
        return out


def encode_prompts(model, prompts, field_name: str, chat: bool = False) -> list[list[int]]:
    """Token ids of ``prompts`` (strings, through the chat template with ``chat``, or token-id lists)."""
    if not isinstance(prompts, list | tuple) or not prompts:
        raise InputError(f"must be a non-empty list of prompts, not {prompts!r:.60}", field=field_name)
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(encode(model.tokenizer, p, chat=chat))
        elif isinstance(p, list | tuple) and p and all(is_int(t) for t in p):
            out.append(list(p))
        else:
            raise InputError(f"each prompt must be a string or a list of token ids, not {p!r:.60}", field=field_name)
    return out


@torch.no_grad()
def read(
    model, prompts: list[list[int]], position, heads: bool, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per prompt: ``resid_pre`` of every layer at ``position`` ``[N, L, d_model]`` and, with ``heads``,
    every head's output ``[N, L, H, d_head]``, reduced inside the taps (prompts batched by length)."""
    ad = model.adapter
    resid = torch.empty(len(prompts), ad.n_layers, ad.d_model)
    z = torch.empty(len(prompts), ad.n_layers, ad.n_heads, ad.d_head) if heads else None

    def at(x):  # [B, T, C, D] -> [B, C, D]
        if position == "last":
            return x[:, -1].float().cpu()
        if position == "mean":
            return x.float().mean(1).cpu()
        if isinstance(position, int):
            return x[:, position].float().cpu()
        return x[:, position[0] : position[1]].float().mean(1).cpu()

    for idx in by_length(prompts):
        for lo in range(0, len(idx), batch_size):
            rows = idx[lo : lo + batch_size]
            taps = []
            for layer in range(ad.n_layers):

                def keep_resid(x, layer=layer, rows=rows):
                    resid[rows, layer] = at(x)[:, 0]

                taps.append(("resid_pre", layer, keep_resid))
                if heads:

                    def keep_z(x, layer=layer, rows=rows):
                        z[rows, layer] = at(x)

                    taps.append(("head", layer, keep_z))
            runner.forward(ad, torch.tensor([prompts[i] for i in rows], device=model.device), taps)
    return resid, z


def pca_direction(diffs: torch.Tensor) -> torch.Tensor:
    """The top right singular vector of ``diffs`` [N, L, d] per layer, uncentred ``[L, d]`` (unit),
    its sign that of its dot product with the mean difference."""
    _, _, vh = torch.linalg.svd(diffs.transpose(0, 1).double(), full_matrices=False)  # [L, N, d]
    u = vh[:, 0]
    sign = torch.sign((u * diffs.double().mean(0)).sum(-1))
    return (u * torch.where(sign == 0, 1.0, sign)[:, None]).float()


def fit_probes(
    x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, steps: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regressions of ``y`` [N] (0/1) on ``x`` [N, *probes, D], one per probe, fitted together
    (L-BFGS on the summed mean losses, ``l2`` on the weights, features standardised). Returns the
    weights ``[*probes, D]`` and biases ``[*probes]`` in the original coordinates: probe ``k`` predicts
    1 where ``x . w_k + b_k > 0``."""
    shape = x.shape[1:]
    xf = x.reshape(len(x), -1, shape[-1]).double()  # [N, K, D]
    mu, sd = xf.mean(0), xf.std(0).clamp_min(1e-8)
    xs = (xf - mu) / sd
    w = torch.zeros(xs.shape[1], xs.shape[2], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(xs.shape[1], dtype=torch.float64, requires_grad=True)
    yy = y.double()[:, None].expand(-1, xs.shape[1])
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = (xs * w).sum(-1) + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yy, reduction="none").mean(0).sum()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_orig = w.detach() / sd  # the same decision in unstandardised coordinates
    b_orig = b.detach() - (w_orig * mu).sum(-1)
    return w_orig.reshape(shape).float(), b_orig.reshape(shape[:-1]).float()


def directions(
    model,
    positive,
    negative,
    position: str | int | tuple[int, int] = "last",
    probes: bool = False,
    chat: bool = False,
    batch_size: int = 32,
    seed: int = 0,
) -> DirectionResult:
    """Candidate directions at every layer from ``positive`` and ``negative`` prompts (strings or
    token-id lists; ``pca`` needs as many of each, taken as pairs in order). ``position``: ``last``
    token, ``mean`` over the prompt, a token index (negative: from the end) or a span ``(start, stop)``
    that every prompt holds. ``probes``: also fit ITI's per-head probes (a seeded fifth of
    each set held out for their accuracy). ``chat``: string prompts go through the chat template."""
    t0 = time.perf_counter()
    span = isinstance(position, tuple) and len(position) == 2 and all(is_int(i) for i in position)
    if not (position in POSITIONS or is_int(position) or span):
        raise InputError(
            f"position must be last, mean, a token index or a (start, stop) span, not {position!r}", field="position"
        )
    check_options(batch_size=batch_size, seed=seed)
    model = load(model)
    pos = encode_prompts(model, positive, "positive", chat)
    neg = encode_prompts(model, negative, "negative", chat)
    shortest = min(len(p) for p in pos + neg)
    if (
        is_int(position)
        and not -shortest <= position < shortest
        or span
        and not (0 <= position[0] < position[1] <= shortest)
    ):
        raise InputError(
            f"position {position!r} is not inside every prompt (the shortest has {shortest} tokens)", field="position"
        )
    xp, zp = read(model, pos, position, probes, batch_size)
    xn, zn = read(model, neg, position, probes, batch_size)
    diff_means = xp.mean(0) - xn.mean(0)
    pca = pca_direction(xp - xn) if len(pos) == len(neg) else None
    res = DirectionResult(
        model=model.name, position=position, n_positive=len(pos), n_negative=len(neg), diff_means=diff_means, pca=pca
    )
    if probes:
        x, y = torch.cat([zp, zn]), torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
        g = torch.Generator().manual_seed(seed)
        held = torch.zeros(len(y), dtype=torch.bool)
        for cls in (0, 1):  # a fifth of each class held out
            ids = (y == cls).nonzero()[:, 0]
            held[ids[torch.randperm(len(ids), generator=g)[: max(1, len(ids) // 5)]]] = True
        w, b = fit_probes(x[~held], y[~held])
        pred = ((x[held] * w).sum(-1) + b) > 0  # [n_held, L, H]
        res.probes = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        res.probe_accuracy = (pred == y[held].bool()[:, None, None]).float().mean(0)
    res.timings["directions_s"] = time.perf_counter() - t0
    return res


__all__ = ["DirectionResult", "directions", "fit_probes", "pca_direction"]
