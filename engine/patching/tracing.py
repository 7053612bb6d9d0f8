"""ROME causal tracing: token x layer effects of restoring clean states, MLP and attention outputs.

The corrupt run (Gaussian noise on the ``noise_span`` tokens, ROME's recipe; or the corrupt
prompt of a token pair, Zhang & Nanda's recommendation) is re-run with clean values restored at
one token ``t``:

- ``state``: the residual stream after block ``l`` (``resid_post``), one layer;
- ``mlp`` / ``attn``: the MLP / attention outputs (``mlp_out`` / ``attn_out``) of the ``window``
  layers centred on ``l`` (ROME: ``[l - w//2, l + w - w//2)`` clipped to the model), and, when
  ``window > 1``, the single-layer grids ``mlp_single`` / ``attn_single`` beside them.

Each (kind, token, layer) is one group of components restored together by the batched exact
patching engine (:func:`causalscan.patching.exact.measure`, denoising): restores that start at layer
``l`` and token ``t`` reuse the corrupt run's residual and keys/values before them, and many run
per forward. The effect is ``metric(restored) - metric(corrupt)`` (ROME's indirect effect when the
metric is ``prob``), averaged over noise samples and then pairs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from causalscan import memplan
from causalscan.data import corruption
from causalscan.data.inputs import prepare
from causalscan.data.sweeps import Component
from causalscan.errors import InputError, check_options, names
from causalscan.executor import get as get_executor
from causalscan.patching.exact import measure, memory_stage
from causalscan.patching.planner import planned
from causalscan.progress import Progress
from causalscan.progress import check as check_progress
from causalscan.results import Result

KINDS = {"state": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}
WINDOW = 10


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers a window of ``window`` centred on ``layer`` restores (ROME's convention)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def grids(kinds, window: int) -> dict[str, tuple[str, int]]:
    """``{grid name: (site, window)}``: ``state`` is always one layer; with ``window > 1`` the
    ``mlp``/``attn`` grids get ``*_single`` one-layer twins."""
    out = {}
    for kind in names(kinds, "kinds", "state,mlp"):
        if kind not in KINDS:
            raise InputError(f"unknown trace kind {kind!r}; kinds: {', '.join(KINDS)}", field="kinds")
        out[kind] = (KINDS[kind], 1 if kind == "state" else window)
        if kind != "state" and window > 1:
            out[f"{kind}_single"] = (KINDS[kind], 1)
    return out


@torch.no_grad()
def trace(
    model,
    dataset,
    kinds=("state", "mlp", "attn"),
    window: int = WINDOW,
    metric="prob",
    samples: int = corruption.SAMPLES,
    noise_scale: float = corruption.SCALE,
    seed: int = 0,
    memory_budget: int | None = None,
    progress: Progress | None = None,
    executor=None,
    memory_gb: float | None = None,
    dry_run: bool = False,
) -> TraceResult | memplan.Plan:
    """Causal tracing grids ``[T, L]`` of ``dataset`` (all pairs of one token length), or ``[R, L]``
    over the roles a dataset names (``positions``; pairs of any lengths).

    ``kinds``: ``state``, ``mlp``, ``attn``; ``window``: layers restored together for ``mlp`` and
    ``attn`` (1: single layer); ``metric``: ``prob`` (ROME's p(answer)), ``logit_diff``, ... ;
    ``samples``/``noise_scale``/``seed``: Gaussian corruption of ``noise_span`` pairs;
    ``progress(stage, done, total)``: called after each unit of batched forwards; ``executor``: where
    they run (None: this process; :class:`causalscan.executor.Ray`: a Ray cluster's actors);
    ``memory_gb``, ``dry_run``: the memory plan, as in :func:`causalscan.patch`.

    >>> import causalscan as cs
    >>> tr = trace("facts", cs.zoo.dataset_path("facts", "subjects"), window=1)
    >>> sorted(tr.effects), tr.effects["mlp"].shape     # [pairs, tokens, layers]
    (['attn', 'mlp', 'state'], torch.Size([96, 5, 4]))
    """
    t0 = time.perf_counter()
    check_options(window=window, memory_budget=memory_budget, memory_gb=memory_gb)
    check_progress(progress)
    get_executor(executor)
    inp = prepare(model, dataset, metric, samples=samples, noise_scale=noise_scale, seed=seed)
    roles = inp.dataset.roles
    if len(inp.lengths) > 1 and not roles:
        raise InputError(
            f"tracing gives a token x layer grid: every pair needs the same token length, found "
            f'lengths {inp.lengths}; or name positions on every pair ("positions")',
            file=inp.dataset.name,
        )
    where, n_layers = (list(roles) if roles else list(range(inp.lengths[0]))), inp.model.adapter.n_layers
    names, groups = trace_groups(inp, kinds, window)
    work = planned(inp.model, inp.rows, groups, memory_budget)
    plan = memplan.Plan(memplan.weights(inp.model))
    memory_stage(plan, inp.model, inp.rows, groups, "denoising", inp.metric_fn, work, "patching")
    if dry_run:
        return plan
    plan.check_gb(memory_gb)
    m = measure(
        inp.model,
        inp.rows,
        groups,
        "denoising",
        inp.metric_fn,
        progress=progress,
        stage="trace",
        executor=executor,
        work=work,
    )
    effect = (m.patched - m.corrupt[:, None]).reshape(len(inp.pairs), len(names), len(where), n_layers)
    first = inp.pairs[0]
    tokens = list(roles) if roles else inp.tokens()
    return TraceResult(
        **inp.header(),
        window=window,
        effects={name: effect[:, i] for i, name in enumerate(names)},
        clean=m.clean,
        corrupt=m.corrupt,
        tokens=tokens,
        span=None if roles else first.span,
        timings={"trace_s": time.perf_counter() - t0, "forwards": m.forwards},
    )


def trace_groups(inp, kinds, window: int) -> tuple[dict[str, tuple[str, int]], list[list[Component]]]:
    """The grids (:func:`grids`) and the restored groups of every grid, position (or role) and layer."""
    roles = inp.dataset.roles
    where, n_layers = (list(roles) if roles else list(range(inp.lengths[0]))), inp.model.adapter.n_layers
    names = grids(kinds, window)
    return names, [
        [Component(site, lay, 0, t) for lay in window_layers(layer, w, n_layers)]
        for site, w in names.values()
        for t in where
        for layer in range(n_layers)
    ]


@dataclass(kw_only=True)
class TraceResult(Result):
    """Causal tracing: ``effects[grid]`` [P, T, L] of ``metric(restored) - metric(corrupt)`` per pair
    (means over noise samples); ``clean``/``corrupt`` [P]; ``tokens``: the first pair's tokens,
    ``span``: its noised token positions (None for token pairs)."""

    FILE: ClassVar[str] = "trace.json"
    TOP: ClassVar[int] = 20

    window: int
    effects: dict[str, torch.Tensor]
    tokens: list[str]
    span: tuple[int, int] | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """``trace/<grid>`` [T, L] mean effect and ``trace_norm/<grid>``: its share of clean - corrupt."""
        gap = self.clean.mean().item() - self.corrupt.mean().item()
        out = {}
        for name, e in self.effects.items():
            out[f"trace/{name}"] = e.mean(0)
            out[f"trace_norm/{name}"] = e.mean(0) / gap if gap else torch.full_like(e[0], float("nan"))
        return out

    def top(self, k: int = 10, grid: str | None = None) -> list[dict]:
        """The ``k`` restorations of largest mean effect (over every grid, or one)."""
        t = self.tensors()
        cells = [
            (name, pos, layer)
            for name in ([grid] if grid else self.effects)
            for pos in range(len(self.tokens))
            for layer in range(self.effects[name].shape[-1])
        ]
        vals = torch.tensor([t[f"trace/{n}"][p, la].item() for n, p, la in cells])
        return [
            {
                "grid": cells[j][0],
                "position": cells[j][1],
                "token": self.tokens[cells[j][1]],
                "layer": cells[j][2],
                "effect": vals[j].item(),
                "recovered": t[f"trace_norm/{cells[j][0]}"][cells[j][1], cells[j][2]].item(),
            }
            for j in vals.argsort(descending=True)[:k].tolist()
        ]

    def n_rows(self) -> int:
        return sum(e[0].numel() for e in self.effects.values())

    def to_json(self, top: int = 20) -> dict:
        check_options(top=top)
        return self._document(
            "trace",
            {"window": self.window, "direction": "denoising"},
            tokens=self.tokens,
            span=list(self.span) if self.span else None,
            grids={k: v.tolist() for k, v in self.tensors().items() if k.startswith("trace/")},
            top=self.top(top),
        )

    def notes(self, doc: dict) -> list[str]:
        t, base = doc["timings"], doc["baselines"]
        return [
            f"trace: {len(self.clean)} pairs, {t['forwards']} forwards, {t['trace_s']:.2f}s; "
            f"{self.metric} clean {base['clean']:.4f}, corrupt {base['corrupt']:.4f}"
        ]

    def lines(self, doc: dict) -> list[str]:
        """Each grid as text: share of ``clean - corrupt`` recovered, tokens x layers (noised tokens starred)."""
        t, out = self.tensors(), []
        a, b = self.span or (0, 0)
        names = [("*" if a <= i < b else "") + tok.strip() for i, tok in enumerate(self.tokens)]
        width = max(len(n) for n in names) + 1
        for grid in self.effects:
            g = t[f"trace_norm/{grid}"]
            out.append(f"{grid} (recovered share; layers 0..{g.shape[1] - 1})")
            out += [
                f"  {name:<{width}}" + " ".join(f"{v:5.2f}" for v in row.tolist())
                for name, row in zip(names, g, strict=True)
            ]
        return out


__all__ = ["KINDS", "WINDOW", "TraceResult", "trace", "window_layers"]
