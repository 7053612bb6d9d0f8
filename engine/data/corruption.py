"""The rows a method runs: one per token pair, ``samples`` per Gaussian-noise pair (ROME), and
for datasets with multi-token answers one per scored continuation of each (teacher forcing:
the prompt followed by the continuation, :mod:`causalscan.data.metrics`).

A noise pair (``noise_span``) is run as ``samples`` rows, each with its own seeded draw of
Gaussian noise of std ``scale x`` the std of the input-embedding entries at the span tokens of the
whole dataset (ROME: ``scale = 3``, the std over the subject tokens of the prompts). The noise is
added to the output of the model's input embedding module at the span positions, so models that
scale or add to the embeddings afterwards (Gemma, GPT-2 positions) treat it like a token. Every
per-pair result sums over a pair's continuation rows and averages over its noise samples; the
rows of one sample share its draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from causalscan.data.metrics import Labels, rows_scored
from causalscan.data.pairs import Pair, stack

SAMPLES, SCALE = 10, 3.0


@dataclass
class Batch:
    """Rows of one forward, split by direction: the ``base`` run and the ``other`` run ``[B, T]``
    with their embedding noise (None where that run is not noised), and what the metric scores."""

    base: torch.Tensor
    other: torch.Tensor
    base_noise: torch.Tensor | None
    other_noise: torch.Tensor | None
    labels: Labels


@dataclass
class Rows:
    """Rows of a dataset: ``pairs[r]`` is row ``r``'s pair, ``owner[r]`` its index in the dataset.

    ``draws[r]``: the noise of row ``r`` ``[span, d_model]`` (None for token pairs); ``std``: the
    noise std (None for token pairs). With multi-token answers each row's pair holds its prompts
    followed by the continuation (``keep`` = K positions scored), ``targets`` [R, K] and ``sign`` [R].
    """

    pairs: list[Pair]
    owner: torch.Tensor
    n_pairs: int
    draws: list[torch.Tensor] | None = None
    std: float | None = None
    samples: int = 1
    scale: float | None = None
    seed: int | None = None
    targets: torch.Tensor | None = None
    sign: torch.Tensor | None = None

    @property
    def keep(self) -> int:
        """Logit positions each row scores: 1, or the longest continuation."""
        return 1 if self.targets is None else self.targets.shape[1]

    def buckets(self) -> list[list[int]]:
        """Row ids of each token length, shortest first."""
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(self.pairs):
            by_len.setdefault(len(p.clean), []).append(i)
        return [by_len[t] for t in sorted(by_len)]

    def batches(self, size: int) -> list[list[int]]:
        """Row ids in batches of at most ``size``, each of one token length (shortest first)."""
        return [idx[lo : lo + size] for idx in self.buckets() for lo in range(0, len(idx), size)]

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
        cont = [None, None] if self.targets is None else [x[rows].to(embed.device) for x in (self.targets, self.sign)]
        labels = Labels(b["answer"], b["wrong"], *cont)
        if noising:
            return Batch(b["clean"], b["corrupt"], None, noise, labels)
        return Batch(b["corrupt"], b["clean"], noise, None, labels)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row values ``[R, ...]`` -> per-pair values ``[P, ...]``: the sum over continuation rows,
        the mean over noise samples."""
        if self.samples == 1 and self.targets is None:
            return x
        out = torch.zeros(self.n_pairs, *x.shape[1:], dtype=x.dtype)
        out.index_add_(0, self.owner, x)
        return out / self.samples

    def settings(self) -> dict:
        """What the JSON outputs record about the corruption."""
        if self.draws is None:
            return {"kind": "tokens"}
        return {
            "kind": "gaussian_noise",
            "std": self.std,
            "scale": self.scale,
            "samples": self.samples,
            "seed": self.seed,
        }


def embedding_std(model, pairs: list[Pair]) -> float:
    """Std of the input-embedding entries at the span tokens of ``pairs`` (every occurrence)."""
    emb = model.hf.get_input_embeddings()
    ids = torch.tensor([t for p in pairs for t in p.clean[p.span[0] : p.span[1]]], device=model.device)
    with torch.no_grad():
        return emb(ids[None]).float().std().item()


def rows(
    model,
    pairs: list[Pair],
    samples: int = SAMPLES,
    scale: float = SCALE,
    seed: int = 0,
    std: float | None = None,
    metric: str = "logit_diff",
) -> Rows:
    """The rows of ``pairs``; noise pairs get ``samples`` rows with seeded draws (``std``: override the
    ``scale x embedding std`` rule); multi-token answers one row per continuation ``metric`` scores."""
    if not pairs or pairs[0].span is None:
        out = Rows(list(pairs), torch.arange(len(pairs)), len(pairs))
    else:
        if samples < 1:
            raise ValueError("samples must be >= 1")
        std = scale * embedding_std(model, pairs) if std is None else std
        d = model.hf.get_input_embeddings().weight.shape[1]
        g = torch.Generator().manual_seed(seed)
        expanded = [p for p in pairs for _ in range(samples)]
        draws = [torch.randn(p.span[1] - p.span[0], d, generator=g) * std for p in expanded]
        owner = torch.arange(len(pairs)).repeat_interleave(samples)
        out = Rows(expanded, owner, len(pairs), draws, std, samples, scale, seed)
    return continuations(out, metric) if any(p.multi_token for p in pairs) else out


def continuations(rows: Rows, metric: str) -> Rows:
    """Each row once per continuation ``metric`` scores, its prompts followed by the continuation but
    its last token (padded to the longest, ``K - 1`` tokens), with ``targets`` [R', K] and ``sign``."""
    scored = rows_scored(metric)
    k = max(len(getattr(p, c)) for p in rows.pairs for c in scored)
    pairs, owner, draws, targets, sign = [], [], [], [], []
    for r, p in enumerate(rows.pairs):
        for c in scored:
            cont = getattr(p, c)
            ext = cont[:-1] + (cont[-1],) * (k - len(cont))  # the padding is never attended to by a target
            pairs.append(Pair(p.clean + ext, p.corrupt + ext, p.answer, p.wrong, p.line, p.span, p.roles))
            owner.append(int(rows.owner[r]))
            targets.append(list(cont) + [-1] * (k - len(cont)))
            sign.append(1.0 if c == "answer" else -1.0)
            if rows.draws is not None:
                draws.append(rows.draws[r])
    return Rows(
        pairs,
        torch.tensor(owner),
        rows.n_pairs,
        draws if rows.draws is not None else None,
        rows.std,
        rows.samples,
        rows.scale,
        rows.seed,
        torch.tensor(targets),
        torch.tensor(sign),
    )
