"""Exact activation patching, many patches per forward.

Each patch ``(site, layer, index, position)`` is measured on every prompt pair: run the base
prompt (clean when noising, corrupt when denoising) with the component's activation taken from
the other prompt, and read the metric. Rows of one forward are (pair, patch) combinations that
share a start: a patch at ``layer`` and position ``p`` leaves every block before ``layer`` and
every position before ``p`` as in the base run, so the forward starts at ``layer`` from the
cached residual and reuses the cached keys and values of positions ``< p``.

:func:`measure` is the engine: any groups of components patched together (one node each for
``patch`` and the scan's confirmation, random subsets for the false-negative bound, windows of
layers for causal tracing), on the rows of a dataset of any token lengths.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from causalscan import corruption, runner
from causalscan.bindings import ops
from causalscan.corruption import Rows
from causalscan.errors import check_options
from causalscan.executor import get as get_executor
from causalscan.inputs import prepare
from causalscan.load import Model
from causalscan.progress import Progress, report
from causalscan.progress import check as check_progress
from causalscan.results import PatchResult
from causalscan.sweeps import Component, build_sweeps, component_list


def _row_bytes(model: Model, seq: int, new: int, n_layers: int, tapped_width: int, keep: int = 1) -> int:
    """Rough peak bytes of one row of a no-grad forward over ``new`` of ``seq`` positions, ``keep`` logits."""
    ad, el = model.adapter, next(model.hf.parameters()).element_size()
    kv = 2 * ad.n_layers * seq * ad.n_kv_heads * ad.d_head
    live = new * (6 * ad.d_model + 3 * ad.d_mlp + 2 * ad.n_heads * seq + 2 * tapped_width)
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    return el * (kv + live + 2 * keep * vocab) + 64 * n_layers


def default_budget(model: Model) -> int:
    """Bytes per batched forward by default: 1 GiB on CPU, half the free memory of a GPU."""
    dev = model.device
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free * 0.5)
    return 1 << 30


@torch.no_grad()
def patch(
    model,
    dataset,
    components: Iterable[Component] | None = None,
    sites: str | Sequence[str] = ("head",),
    direction: str = "noising",
    metric="logit_diff",
    memory_budget: int | None = None,
    min_tokens: int | None = None,
    progress: Progress | None = None,
    samples: int = corruption.SAMPLES,
    noise_scale: float = corruption.SCALE,
    seed: int = 0,
    executor=None,
) -> PatchResult:
    """Exact effects of patching each component, every prompt pair, many patches per forward.

    ``components``: explicit :class:`Component` list (result ``exact/components`` ``[n]``);
    otherwise ``sites``: sweeps such as ``"head"`` (``[L, H]``), ``"head:pos"`` (``[L, T, H]``),
    ``"resid_pre"`` (``[L, T]``), ``"mlp_out:all"`` (``[L]``), ``"neuron"`` (``[L, d_mlp]``).
    ``direction``: ``noising`` (run clean, patch corrupt in) or ``denoising``.
    ``memory_budget``: bytes per forward (default: 1 GiB on CPU, half the free GPU memory).
    ``min_tokens``: merge start groups until a forward has this many row-positions (default
    2048 on CPU, 16384 on GPU; 0 never merges).
    ``samples``, ``noise_scale``, ``seed``: Gaussian-noise corruption of ``noise_span`` pairs
    (:mod:`causalscan.corruption`); every per-pair value is the mean over the samples.
    ``progress(stage, done, total)``: called after each unit of batched forwards.
    ``executor``: where the forwards run (None: this process; :class:`causalscan.executor.Ray`: a
    Ray cluster's actors, with the same result).

    >>> import causalscan as cs
    >>> pairs = [{"clean": "a b c d", "corrupt": "a b e d", "answer": "c", "wrong": "e"}]
    >>> res = patch(cs.load("random:gpt2-tiny"), pairs, sites=["head", "resid_pre"])   # the tokenizer adds BOS
    >>> res.tensors()["exact/head"].shape, res.tensors()["exact/resid_pre"].shape
    (torch.Size([2, 4]), torch.Size([2, 5]))
    """
    t0 = time.perf_counter()
    check_options(memory_budget=memory_budget, min_tokens=min_tokens)
    check_progress(progress)
    inp = prepare(model, dataset, metric, direction, samples, noise_scale, seed)
    if components is not None:
        sweeps, comps = component_list(inp.model, components, inp.lengths[0], inp.dataset.roles)
    else:
        sweeps, comps = build_sweeps(inp.model, sites, inp.lengths, inp.dataset.name, inp.dataset.roles)
    m = measure(
        inp.model,
        inp.rows,
        [[c] for c in comps],
        direction,
        inp.metric_fn,
        memory_budget,
        min_tokens,
        progress,
        executor=executor,
    )
    return PatchResult(
        **inp.header(),
        direction=direction,
        components=comps,
        sweeps=sweeps,
        patched=m.patched,
        clean=m.clean,
        corrupt=m.corrupt,
        tokens=inp.tokens(),
        timings={"patch_s": time.perf_counter() - t0, "forwards": m.forwards},
    )


class Measured(NamedTuple):
    """The metric with each group patched, ``patched`` [P, G]; the unpatched ``clean`` and ``corrupt``
    runs [P] (each a mean over the pair's rows); the number of forwards run."""

    patched: torch.Tensor
    clean: torch.Tensor
    corrupt: torch.Tensor
    forwards: int

    def effect(self, direction: str) -> torch.Tensor:
        """``patched - base`` [P, G]: the base run is clean when noising, corrupt when denoising."""
        return self.patched - (self.clean if direction == "noising" else self.corrupt)[:, None]


class Forward(NamedTuple):
    """One batched forward: rows ``pairs[r]`` (base row ids) x ``groups[r]`` (group ids), started at
    block ``layer`` and position ``pos``."""

    layer: int
    pos: int
    pairs: torch.Tensor
    groups: torch.Tensor


@torch.no_grad()
def measure(
    model: Model,
    rows: Rows,
    groups: list[list[Component]],
    direction: str,
    metric_fn,
    memory_budget: int | None = None,
    min_tokens: int | None = None,
    progress: Progress | None = None,
    stage: str = "patch",
    executor=None,
) -> Measured:
    """The metric with each group of components patched together, per pair, in ``direction``.

    Rows of each token length run as one bucket: a base run (its residuals and keys/values
    cached at the groups' start layers), an other run (activations at the patched sites), then
    the planned forwards, each within ``memory_budget`` bytes. An empty group is the base run.
    ``executor``: where the buckets' forwards run (:mod:`causalscan.executor`), in units of at
    most ``UNIT_FORWARDS`` forwards of one bucket; every value is written to its own place, so the
    result does not depend on the order. ``progress(stage, done, total)`` is called after each unit.
    """
    work = planned(model, rows, groups, memory_budget, min_tokens)
    units = [(b, lo) for b, (*_, fws) in enumerate(work) for lo in range(0, max(1, len(fws)), UNIT_FORWARDS)]
    total, done = sum(2 + len(fw) for *_, fw in work), 0
    n = len(rows.pairs)
    patched, clean_m, corrupt_m = torch.empty(n, len(groups)), torch.empty(n), torch.empty(n)
    empty = [j for j, g in enumerate(groups) if not g]
    seen = set()
    for u, part in get_executor(executor).map(model, patch_units, (rows, groups, direction, metric_fn, work), units):
        b, lo = units[u]
        idx, _, fws = work[b]
        r = torch.tensor(idx)
        if b not in seen:  # the bucket's unpatched runs come with each of its units
            seen.add(b)
            clean_m[r], corrupt_m[r] = part["clean"], part["corrupt"]
            patched[r[:, None], torch.tensor(empty, dtype=torch.long)] = part["base"][:, None]
            done += 2
        for fw, value in zip(fws[lo : lo + UNIT_FORWARDS], part["values"], strict=True):
            patched[r[fw.pairs], fw.groups] = value
            done += 1
        report(progress, stage, done, total)
    return Measured(rows.mean(patched), rows.mean(clean_m), rows.mean(corrupt_m), total)


# planned forwards per unit of work (an executor's scheduling grain): one, since the planner fills
# each forward up to the memory budget, leaving a bucket only a few (one per layer, often)
UNIT_FORWARDS = 1


def patch_units(model: Model, rows: Rows, groups: list[list[Component]], direction: str, metric_fn, work: list):
    """``compute((b, lo))``: the metric of bucket ``b``'s planned forwards ``lo .. lo + UNIT_FORWARDS``
    (``values``, one tensor [rows] per forward) and the bucket's unpatched ``clean``, ``corrupt`` and
    ``base`` metrics [rows]; the bucket's runs are cached for its next units."""
    cached: dict[int, _Bucket] = {}

    @torch.no_grad()
    def compute(unit: tuple[int, int]) -> dict:
        b, lo = unit
        idx, starts, fws = work[b]
        if b not in cached:
            cached.clear()  # one bucket's cache at a time: units come bucket by bucket
            cached[b] = _Bucket(model, rows, idx, groups, starts, direction, metric_fn)
        bucket = cached[b]
        return {
            "clean": bucket.clean,
            "corrupt": bucket.corrupt,
            "base": bucket.base_metric,
            "values": [bucket.run(fw) for fw in fws[lo : lo + UNIT_FORWARDS]],
        }

    return compute


def default_min_tokens(device: torch.device) -> int:
    """Row-positions a merged forward gathers by default: enough to fill a GPU, fewer on a CPU."""
    return 16384 if torch.device(device).type == "cuda" else 2048


def planned(
    model: Model,
    rows: Rows,
    groups: list[list[Component]],
    memory_budget: int | None = None,
    min_tokens: int | None = None,
) -> list[tuple[list[int], list[tuple[int, int]], list[Forward]]]:
    """Per bucket of equal-length rows: ``(row ids, each group's start, the planned forwards)``."""
    budget = memory_budget or default_budget(model)
    if min_tokens is None:
        min_tokens = default_min_tokens(model.device)
    work = []
    for idx in rows.buckets():
        roles = rows.pairs[idx[0]].roles or {}
        earliest = {r: min(rows.pairs[i].roles[r] for i in idx) for r in roles}  # of each role in the bucket
        starts = [start(g, earliest) for g in groups]
        seq = len(rows.pairs[idx[0]].clean)
        work.append((idx, starts, forwards(model, groups, starts, len(idx), seq, budget, min_tokens, rows.keep)))
    return work


def cost(model: Model, rows: Rows, groups: list[list[Component]]) -> float:
    """What :func:`measure` of ``groups`` costs, in plain forward + backward passes of ``rows`` (taken
    as four forwards): the blocks x positions its planned forwards recompute, plus one output layer per
    forward row, against the same of every row's full forward."""
    n_layers, work, floor = model.adapter.n_layers, 0.0, 0.0
    for idx, _, fws in planned(model, rows, groups):
        seq = len(rows.pairs[idx[0]].clean)
        work += sum(len(fw.pairs) * ((n_layers - fw.layer) * (seq - fw.pos) + _HEAD) for fw in fws)
        floor += 4 * len(idx) * (n_layers * seq + _HEAD)
    return work / floor


_HEAD = 4  # the output layer of one row, in block x positions (a 49k vocabulary against 30 blocks)


def start(group: list[Component], earliest: dict[str, int] | None = None) -> tuple[int, int]:
    """The earliest (layer, position) a patch of ``group`` changes (a role at ``earliest[role]``, its
    earliest position among the rows; an empty group changes nothing: the end)."""
    if not group:
        return (1 << 30, 1 << 30)
    return min(c.layer for c in group), min(_position(c, earliest) for c in group)


def _position(c: Component, earliest: dict[str, int] | None) -> int:
    if c.position is None:
        return 0
    return earliest[c.position] if isinstance(c.position, str) else c.position


def plan(starts: list[tuple[int, int]], n_pairs: int, seq: int, min_tokens: int) -> list[tuple[int, int, list[int]]]:
    """Forwards as ``(start_layer, start_pos, group ids)`` for groups starting at ``starts``.

    A patch starting at (layer, p) may start at any earlier layer and position: what is recomputed
    there equals the base run. Groups of one start layer are merged, in position order, until a
    forward carries ``min_tokens`` row-positions, so by-position sweeps do not pay the
    per-forward overhead hundreds of times; a merged forward starts at its members' earliest
    position. Layers are never merged: starting a block earlier costs a whole block per row.
    """
    by_start: dict[tuple[int, int], list[int]] = defaultdict(list)
    for j, s in enumerate(starts):
        by_start[s].append(j)
    out: list[tuple[int, int, list[int]]] = []
    for (layer, pos), members in sorted(by_start.items()):
        if out:
            l0, p0, acc = out[-1]
            if l0 == layer and n_pairs * len(acc) * (seq - p0) < min_tokens:
                out[-1] = (l0, min(p0, pos), acc + members)
                continue
        out.append((layer, pos, list(members)))
    return out


def forwards(
    model: Model,
    groups: list[list[Component]],
    starts: list[tuple[int, int]],
    n_pairs: int,
    seq: int,
    budget: int,
    min_tokens: int,
    keep: int = 1,
) -> list[Forward]:
    """The planned forwards of ``n_pairs`` base rows of length ``seq``, each row-chunk within ``budget``.
    Empty groups run in none: their metric is the base run's."""
    ad = model.adapter
    live = [j for j, g in enumerate(groups) if g]
    out = []
    for layer, pos, members in plan([starts[j] for j in live], n_pairs, seq, min_tokens):
        members = [live[j] for j in members]
        sites = {c.site for j in members for c in groups[j]}
        width = sum(ad.shape(s)[0] * ad.shape(s)[1] for s in sites)
        chunk = max(1, budget // _row_bytes(model, seq, seq - pos, ad.n_layers - layer, width, keep))
        pair_ids = torch.arange(n_pairs).repeat_interleave(len(members))
        group_ids = torch.tensor(members).repeat(n_pairs)
        out += [
            Forward(layer, pos, pair_ids[lo : lo + chunk], group_ids[lo : lo + chunk])
            for lo in range(0, len(pair_ids), chunk)
        ]
    return out


def _take(t: torch.Tensor, rows: torch.Tensor, pos: int) -> torch.Tensor:
    """``t[rows, pos:]`` indexed on ``t``'s device (a split model's layers sit on different devices)."""
    return t[rows.to(t.device), pos:]


class _Bucket:
    """The base and other runs of rows ``idx`` (equal length), cached for patched forwards."""

    def __init__(
        self,
        model: Model,
        rows: Rows,
        idx: list[int],
        groups: list[list[Component]],
        starts: list[tuple[int, int]],
        direction: str,
        metric_fn,
    ):
        ad = model.adapter
        self.model, self.groups, self.metric_fn = model, groups, metric_fn
        self.pairs = [rows.pairs[i] for i in idx]  # role positions per row
        noising = direction == "noising"
        b = rows.batch(idx, noising, model.hf.get_input_embeddings().weight)
        self.base_ids, self.labels, self.keep = b.base, b.labels, rows.keep
        start_layers = {s[0] for s in starts if s[0] < ad.n_layers}
        base_logits, self.base_resid, self.kv = runner.run_with_cache(
            ad, b.base, [("resid_pre", layer) for layer in start_layers], self.keep, noise=b.base_noise
        )
        self.sources: dict = {}
        patched_sites = sorted({(c.site, c.layer) for g in groups for c in g})
        other_logits = runner.forward(
            ad,
            b.other,
            [runner.capture(ad, s, layer, self.sources) for s, layer in patched_sites],
            logits_to_keep=self.keep,
            noise=b.other_noise,
        )
        self.clean_logprobs = torch.log_softmax((base_logits if noising else other_logits).float(), -1)
        base_m, other_m = self.metric(base_logits, slice(None)), self.metric(other_logits, slice(None))
        self.base_metric = base_m
        self.clean, self.corrupt = (base_m, other_m) if noising else (other_m, base_m)

    def _at(self, c: Component, row: torch.Tensor) -> int:
        """The token position ``c`` patches in base row ``row`` (a role resolves per pair)."""
        return self.pairs[int(row)].roles[c.position] if isinstance(c.position, str) else c.position

    def metric(self, logits: torch.Tensor, rows) -> torch.Tensor:
        return self.metric_fn(logits, self.labels.take(rows), self.clean_logprobs[rows]).float().cpu()

    def run(self, fw: Forward) -> torch.Tensor:
        """The metric of one planned forward [rows]: base row ``fw.pairs[r]`` with every component of
        ``groups[fw.groups[r]]`` patched from the other run."""
        ad = self.model.adapter
        rows = fw.pairs.to(self.base_ids.device)
        n_rows, new = len(rows), self.base_ids.shape[1] - fw.pos
        by_site: dict[tuple[str, int], list[tuple[int, Component]]] = defaultdict(list)
        for r, j in enumerate(fw.groups.tolist()):
            for c in self.groups[j]:
                by_site[(c.site, c.layer)].append((r, c))
        taps = []
        for (site, layer), members in by_site.items():
            mask = torch.zeros(n_rows, new, ad.shape(site)[0], dtype=torch.bool)
            every = [(r, c.index) for r, c in members if c.position is None]
            one = [(r, self._at(c, fw.pairs[r]) - fw.pos, c.index) for r, c in members if c.position is not None]
            if every:
                r, c = torch.tensor(every).T
                mask[r, :, c] = True
            if one:
                r, t, c = torch.tensor(one).T
                mask[r, t, c] = True
            source = _take(self.sources[(site, layer)], rows, fw.pos)
            mask = mask.to(source.device)
            taps.append((site, layer, lambda x, m=mask, s=source: ops.perturb(x, "patch", m, source=s)))
        resid = _take(self.base_resid[("resid_pre", fw.layer)], rows, fw.pos)[:, :, 0]
        past = self.kv.cache(rows, fw.pos, fw.layer, self.model.hf.config)
        logits = runner.forward(
            ad,
            self.base_ids[rows, fw.pos :],
            taps,
            start_layer=fw.layer,
            resid=resid,
            past=past,
            logits_to_keep=self.keep,
        )
        return self.metric(logits, rows)
