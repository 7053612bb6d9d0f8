"""ROME causal tracing: token x layer effects of restoring clean states, MLP and attention outputs.

The corrupt run (Gaussian noise on the ``noise_span`` tokens, ROME's recipe; or the corrupt
prompt of a token pair, Zhang & Nanda's recommendation) is re-run with clean values restored at
one token ``t``:

- ``state``: the residual stream after block ``l`` (``resid_post``), one layer;
- ``mlp`` / ``attn``: the MLP / attention outputs (``mlp_out`` / ``attn_out``) of the ``window``
  layers centred on ``l`` (ROME: ``[l - w//2, l + w - w//2)`` clipped to the model), and, when
  ``window > 1``, the single-layer grids ``mlp_single`` / ``attn_single`` beside them.

Each (kind, token, layer) is one group of components restored together by the batched exact
patching engine (:func:`causalscan.patching.measure`, denoising): restores that start at layer
``l`` and token ``t`` reuse the corrupt run's residual and keys/values before them, and many run
per forward. The effect is ``metric(restored) - metric(corrupt)`` (ROME's indirect effect when the
metric is ``prob``), averaged over noise samples and then pairs.
"""

from __future__ import annotations

import time

import torch

from causalscan import corruption
from causalscan.errors import InputError, check_options, names
from causalscan.inputs import prepare
from causalscan.patching import measure
from causalscan.progress import Progress
from causalscan.progress import check as check_progress
from causalscan.results import TraceResult
from causalscan.sweeps import Component

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
) -> TraceResult:
    """Causal tracing grids ``[T, L]`` of ``dataset`` (all pairs of one token length), or ``[R, L]``
    over the roles a dataset names (``positions``; pairs of any lengths).

    ``kinds``: ``state``, ``mlp``, ``attn``; ``window``: layers restored together for ``mlp`` and
    ``attn`` (1: single layer); ``metric``: ``prob`` (ROME's p(answer)), ``logit_diff``, ... ;
    ``samples``/``noise_scale``/``seed``: Gaussian corruption of ``noise_span`` pairs;
    ``progress(stage, done, total)``: called after each unit of batched forwards; ``executor``: where
    they run (None: this process; :class:`causalscan.executor.Ray`: a Ray cluster's actors).

    >>> import causalscan as cs
    >>> tr = trace("facts", cs.zoo.dataset_path("facts", "subjects"), window=1)
    >>> sorted(tr.effects), tr.effects["mlp"].shape     # [pairs, tokens, layers]
    (['attn', 'mlp', 'state'], torch.Size([96, 5, 4]))
    """
    t0 = time.perf_counter()
    check_options(window=window, memory_budget=memory_budget)
    check_progress(progress)
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
    m = measure(
        inp.model,
        inp.rows,
        groups,
        "denoising",
        inp.metric_fn,
        memory_budget,
        progress=progress,
        stage="trace",
        executor=executor,
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


__all__ = ["KINDS", "WINDOW", "trace", "window_layers"]
