"""The rows a method runs: one per token pair, ``samples`` per Gaussian-noise pair (ROME).

A noise pair (``noise_span``) is run as ``samples`` rows, each with its own seeded draw of
Gaussian noise of std ``scale x`` the std of the input-embedding entries at the span tokens of the
whole dataset (ROME: ``scale = 3``, the std over the subject tokens of the prompts). The noise is
added to the output of the model's input embedding module at the span positions, so models that
scale or add to the embeddings afterwards (Gemma, GPT-2 positions) treat it like a token. Every
per-pair result is the mean over the pair's rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from causalscan.data import Pair, stack

SAMPLES, SCALE = 10, 3.0


@dataclass
class Batch:
    """Rows of one forward, split by direction: the ``base`` run and the ``other`` run ``[B, T]``
    with their embedding noise (None where that run is not noised), ``answer``/``wrong`` [B]."""

    base: torch.Tensor
    other: torch.Tensor
    base_noise: torch.Tensor | None
    other_noise: torch.Tensor | None
    answer: torch.Tensor
    wrong: torch.Tensor


@dataclass
class Rows:
    """Rows of a dataset: ``pairs[r]`` is row ``r``'s pair, ``owner[r]`` its index in the dataset.

    ``draws[r]``: the noise of row ``r`` ``[span, d_model]`` (None for token pairs); ``std``: the
    noise std (None for token pairs).
    """

    pairs: list[Pair]
    owner: torch.Tensor
    n_pairs: int
    draws: list[torch.Tensor] | None = None
    std: float | None = None
    samples: int = 1
    scale: float | None = None
    seed: int | None = None

    def noise(self, rows: list[int], like: torch.Tensor) -> torch.Tensor | None:
        """Noise of ``rows`` on the embeddings ``[B, T, d_model]`` (zero off the span), or None."""
        if self.draws is None:
            return None
        seq = len(self.pairs[rows[0]].clean)
        out = torch.zeros(len(rows), seq, self.draws[rows[0]].shape[-1], dtype=like.dtype, device=like.device)
        for i, r in enumerate(rows):
            a, b = self.pairs[r].span
            out[i, a:b] = self.draws[r].to(out)
        return out

    def batch(self, rows: list[int], noising: bool, embed: torch.Tensor) -> Batch:
        """Rows ``rows`` (equal length) on ``embed``'s device: the base run is clean when ``noising``,
        corrupt (token replacement or noise) otherwise."""
        b = stack([self.pairs[r] for r in rows], embed.device)
        noise = self.noise(rows, embed)
        if noising:
            return Batch(b["clean"], b["corrupt"], None, noise, b["answer"], b["wrong"])
        return Batch(b["corrupt"], b["clean"], noise, None, b["answer"], b["wrong"])

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row values ``[R, ...]`` -> per-pair means ``[P, ...]``."""
        if self.samples == 1:
            return x
        out = torch.zeros(self.n_pairs, *x.shape[1:], dtype=x.dtype)
        out.index_add_(0, self.owner, x)
        return out / self.samples

    def settings(self) -> dict:
        """What the JSON outputs record about the corruption."""
        if self.draws is None:
            return {"kind": "tokens"}
        return {"kind": "gaussian_noise", "std": self.std, "scale": self.scale, "samples": self.samples,
                "seed": self.seed}


def embedding_std(model, pairs: list[Pair]) -> float:
    """Std of the input-embedding entries at the span tokens of ``pairs`` (every occurrence)."""
    emb = model.hf.get_input_embeddings()
    ids = torch.tensor([t for p in pairs for t in p.clean[p.span[0]:p.span[1]]], device=model.device)
    with torch.no_grad():
        return emb(ids[None]).float().std().item()


def rows(model, pairs: list[Pair], samples: int = SAMPLES, scale: float = SCALE, seed: int = 0,
         std: float | None = None) -> Rows:
    """The rows of ``pairs``; noise pairs get ``samples`` rows with seeded draws (``std``: override the
    ``scale x embedding std`` rule)."""
    if not pairs or pairs[0].span is None:
        return Rows(list(pairs), torch.arange(len(pairs)), len(pairs))
    if samples < 1:
        raise ValueError("samples must be >= 1")
    std = scale * embedding_std(model, pairs) if std is None else std
    d = model.hf.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(seed)
    expanded = [p for p in pairs for _ in range(samples)]
    draws = [torch.randn(p.span[1] - p.span[0], d, generator=g) * std for p in expanded]
    owner = torch.arange(len(pairs)).repeat_interleave(samples)
    return Rows(expanded, owner, len(pairs), draws, std, samples, scale, seed)
