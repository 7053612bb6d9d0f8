"""Behaviour modes: steered completions grouped without labels, named, scored and ranked.

A completion (the token ids a steered or unsteered row generated) is a TF-IDF vector of its token
n-grams on the model's own tokenizer (unigrams and bigrams, the end token included, those seen in
at least two completions), or (``features="hidden"``) the model's own mean residual over the
completion's tokens, centred on all completions'; distinct completions are grouped by spherical k-means
(k-means++ start from a seeded generator, each weighted by how often it occurs). A mode is a group:

- **name**: its most distinctive n-grams (weight in the mode's centroid minus the overall one);
- **novelty**: ``1 - cos(centroid of the mode, centroid of the unsteered completions)``;
- a vector **produces** a mode when at least ``min_share`` of the held-out prompts (any decoding)
  land in it; **specificity**: ``learned / (learned + random)`` vectors producing it;
- **generalisation**: the largest share of held-out prompts on which a learned vector produces it;
- **score** = novelty x specificity x generalisation; modes and vectors are ranked by it (a
  vector by its best mode). Labelled detectors (:func:`detect`) count hits beside, never in, the score.

>>> x, names = ngram_features([[5, 6, 2], [5, 6], [7, 2]], end=[2])   # distinct completions
>>> names, x.shape
([(2,), (5,), (6,), (5, 6)], torch.Size([3, 4]))
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import torch

from causalscan.errors import InputError

MAX_FEATURES = 4096  # n-grams kept as features: the most frequent


def ngrams(ids: list[int], n: tuple[int, ...] = (1, 2)) -> Counter:
    return Counter(tuple(ids[i : i + k]) for k in n for i in range(len(ids) - k + 1))


def ngram_features(
    rows: list[list[int]],
    end: list[int] = (),
    weights: list[int] | None = None,
    n: tuple[int, ...] = (1, 2),
    max_features: int = MAX_FEATURES,
) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """TF-IDF rows ``[len(rows), F]`` (L2-normalised; a row with no kept n-gram is zero) of distinct
    token-id ``rows``, each standing for ``weights[i]`` completions (default 1), and the F n-grams
    (in >= 2 completions, the most frequent ``max_features``, sorted by length then ids). An empty
    row counts as one end token ``end[0]``."""
    weights = [1] * len(rows) if weights is None else list(weights)
    counts = [ngrams(list(r) or list(end[:1]), n) for r in rows]
    df: Counter = Counter()
    for c, wt in zip(counts, weights, strict=True):
        for g in c:
            df[g] += wt
    total = sum(weights)
    kept = sorted((g for g, k in df.items() if k >= 2), key=lambda g: (-df[g], len(g), g))[:max_features]
    names = sorted(kept, key=lambda g: (len(g), g))
    col = {g: j for j, g in enumerate(names)}
    x = torch.zeros(len(rows), len(names))
    for i, c in enumerate(counts):
        for g, k in c.items():
            if g in col:
                x[i, col[g]] = (1 + math.log(k)) * (math.log((1 + total) / (1 + df[g])) + 1)
    return torch.nn.functional.normalize(x, dim=-1), names


def centred(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rows of ``h`` [N, d] minus their ``w``-weighted mean, L2-normalised (what every completion
    shares, as a model's hidden states do, would otherwise make all of them alike)."""
    h = h.float()
    mean = (h * w[:, None]).sum(0) / w.sum()
    return torch.nn.functional.normalize(h - mean, dim=-1)


def kmeans(
    x: torch.Tensor, w: torch.Tensor, k: int, seed: int = 0, iters: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of unit rows ``x`` [N, F] weighted by ``w`` [N]: ``(labels [N], centroids
    [k', F])`` with ``k' <= k`` (a k-means++ start stops when every row is a centre; empty groups
    are dropped and the rest renumbered by weight). Zero rows get label ``-1``."""
    gen = torch.Generator().manual_seed(seed)
    live = x.norm(dim=-1) > 0
    xs, ws = x[live], w[live].float()
    labels = torch.full((len(x),), -1, dtype=torch.long)
    if not len(xs):
        return labels, torch.zeros(0, x.shape[1])
    centres = [int(torch.multinomial(ws, 1, generator=gen))]
    for _ in range(k - 1):
        dist = (1 - (xs @ xs[centres].T).max(1).values).clamp_min(0)
        if not (ws * dist).sum() > 1e-9:
            break
        centres.append(int(torch.multinomial(ws * dist**2, 1, generator=gen)))
    c = xs[centres]
    lab = (xs @ c.T).argmax(1)
    for _ in range(iters):
        sums = torch.zeros_like(c).index_add_(0, lab, xs * ws[:, None])
        keep = sums.norm(dim=-1) > 0
        c = torch.nn.functional.normalize(sums[keep], dim=-1)
        new = (xs @ c.T).argmax(1)
        if len(c) == keep.numel() and torch.equal(new, lab):
            break
        lab = new
    weight = torch.zeros(len(c)).index_add_(0, lab, ws)
    order = weight.argsort(descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    labels[live] = rank[lab]
    return labels, c[order]


def describe(
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    names: list[tuple[int, ...]],
    decode,
    top: int = 3,
) -> list[list[str]]:
    """Per mode, its ``top`` most distinctive n-grams as text (``decode(ids) -> str``)."""
    overall = (x * w[:, None]).sum(0) / w.sum()
    out = []
    for m in range(int(labels.max()) + 1 if len(labels) else 0):
        sel = labels == m
        cen = (x[sel] * w[sel, None]).sum(0) / w[sel].sum()
        lift = cen - overall
        best = [j for j in lift.argsort(descending=True, stable=True)[:top].tolist() if cen[j] > 0]
        out.append([decode(list(names[j])) for j in best])
    return out


def novelty(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, w_base: torch.Tensor) -> list[float]:
    """``1 - cos(centroid of mode m, centroid of the unsteered rows)`` per mode; ``w`` [N]: how often
    each row occurs, ``w_base`` [N]: how often among the unsteered completions."""
    ref = (x * w_base[:, None]).sum(0)
    out = []
    for m in range(int(labels.max()) + 1 if len(labels) else 0):
        sel = labels == m
        cen = (x[sel] * w[sel, None]).sum(0)
        out.append(1.0 - float(torch.nn.functional.cosine_similarity(cen, ref, dim=0).clamp(0, 1)))
    return out


def shares(mode_of: torch.Tensor, n_modes: int) -> torch.Tensor:
    """``mode_of`` [V, S, P] (each completion's mode, ``-1`` none) -> ``[V, n_modes]``: the share of
    the P prompts on which any of the S decodings of vector v lands in mode m."""
    v, _, p = mode_of.shape
    hit = torch.zeros(v, n_modes, p, dtype=torch.bool)
    for m in range(n_modes):
        hit[:, m] = (mode_of == m).any(1)
    return hit.float().mean(-1)


def score_modes(share: torch.Tensor, learned: torch.Tensor, nov: list[float], min_share: float) -> list[dict]:
    """Per mode: learned and random vectors producing it (share >= ``min_share`` and > 0), its
    specificity, generalisation (the best learned share) and score."""
    prod = (share >= min_share) & (share > 0)
    out = []
    for m, n in enumerate(nov):
        n_l, n_r = int(prod[learned, m].sum()), int(prod[~learned, m].sum())
        spec = n_l / (n_l + n_r) if n_l + n_r else 0.0
        gen = float(share[learned, m].max()) if learned.any() else 0.0
        out.append(
            {
                "mode": m,
                "novelty": n,
                "learned_vectors": n_l,
                "random_vectors": n_r,
                "specificity": spec,
                "generalisation": gen,
                "score": n * spec * gen,
            }
        )
    return out


def rank_vectors(share: torch.Tensor, modes: list[dict]) -> list[tuple[int, int, float]]:
    """``(vector, best mode, score)`` for every vector, best first: a vector's score in mode m is
    novelty x specificity of m x its share of held-out prompts in m."""
    weight = torch.tensor([m["novelty"] * m["specificity"] for m in modes])
    if not len(weight):
        return [(v, -1, 0.0) for v in range(len(share))]
    val, best = (share * weight).max(1)
    order = sorted(range(len(share)), key=lambda v: (-float(val[v]), v))
    return [(v, int(best[v]), float(val[v])) for v in order]


def detectors(look_for: list[str] | None, rules=None) -> list[tuple]:
    """``(name, compiled regex)`` from phrases (matched literally) and rules ``{"name", "regex"}`` or
    ``{"name", "keyword"}`` (a keyword matches in any case): a list of dicts, or a JSONL file of them
    (a bad rule raises :class:`InputError` naming the file and line)."""
    from causalscan.data.prompts import read_jsonl

    if isinstance(look_for, str):
        look_for = [look_for]
    out = []
    for p in look_for or []:
        if not isinstance(p, str) or not p:
            raise InputError(f"must be a non-empty string, not {p!r:.60}", field="look_for")
        out.append((p, re.compile(re.escape(p))))
    where, lines = "detectors", None
    if isinstance(rules, str | Path):
        where = str(rules)
        rules, lines = read_jsonl(rules)
    for i, r in enumerate(rules or []):
        at = dict(file=where, line=lines[i] if lines else i + 1)
        if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not r["name"]:
            raise InputError("each detector needs a non-empty string 'name'", field="name", **at)
        kinds = [k for k in ("regex", "keyword") if k in r]
        if len(kinds) != 1 or not isinstance(r[kinds[0]], str) or not r[kinds[0]]:
            raise InputError("give exactly one of 'regex' or 'keyword' (a non-empty string)", field="regex", **at)
        try:
            pat = re.compile(r["regex"]) if "regex" in r else re.compile(re.escape(r["keyword"]), re.IGNORECASE)
        except re.error as e:
            raise InputError(f"not a regular expression ({e})", field="regex", **at) from None
        out.append((r["name"], pat))
    if len({name for name, _ in out}) != len(out):
        raise InputError("detector names must be distinct", field="detectors")
    return out


def detect(texts: list[list[list[str]]], dets: list[tuple]) -> dict[str, list[float]]:
    """Per detector, per vector, the share of prompts where any decoding's text (``texts[v][s][p]``) matches."""
    out = {}
    for name, pat in dets:
        out[name] = [
            sum(any(pat.search(t[s][p]) for s in range(len(t))) for p in range(len(t[0]))) / len(t[0]) for t in texts
        ]
    return out
