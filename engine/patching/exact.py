"""Exact activation patching, many patches per forward.

Each patch ``(site, layer, index, position)`` is measured on every prompt pair: run the base
prompt (clean when noising, corrupt when denoising) with the component's activation taken from
the other prompt, and read the metric. Rows of one forward are (pair, patch) combinations that
share a start: a patch at ``layer`` and position ``p`` leaves every block before ``layer`` and
every position before ``p`` as in the base run, so the forward starts at ``layer`` from the
cached residual and reuses the cached keys and values of positions ``< p``.

:func:`measure` is the engine: any groups of components patched together (one node each for
``patch`` and the scan's confirmation, random subsets for the false-negative bound, windows of
layers for causal tracing), on the rows of a dataset of any token lengths, in the forwards that
:mod:`causalscan.patching.planner` plans. :func:`memory_stage` adds its heaviest unit to a memory plan.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch

from causalscan import memplan
from causalscan.bindings import ops
from causalscan.data.corruption import Rows
from causalscan.data.sweeps import Component
from causalscan.executor import get as get_executor
from causalscan.model import runner
from causalscan.model.load import Model
from causalscan.patching.planner import Forward, Work, planned
from causalscan.progress import Progress, report


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
    work: Work | None = None,
) -> Measured:
    """The metric with each group of components patched together, per pair, in ``direction``.

    Rows of each token length run as one bucket: a base run (its residuals and keys/values
    cached at the groups' start layers), an other run (activations at the patched sites), then
    the planned forwards, each within ``memory_budget`` bytes. An empty group is the base run.
    ``executor``: where the buckets' forwards run (:mod:`causalscan.executor`), in units of at
    most ``UNIT_FORWARDS`` forwards of one bucket; every value is written to its own place, so the
    result does not depend on the order. ``progress(stage, done, total)`` is called after each unit.
    ``work``: the plan of ``groups`` (:func:`causalscan.patching.planner.planned`), if made already.
    """
    work = planned(model, rows, groups, memory_budget, min_tokens) if work is None else work
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


def patch_units(model: Model, rows: Rows, groups: list[list[Component]], direction: str, metric_fn, work: Work):
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


def memory_stage(
    plan: memplan.Plan,
    model: Model,
    rows: Rows,
    groups: list[list[Component]],
    direction: str,
    metric_fn,
    work: Work,
    name: str = "exact patching",
) -> None:
    """Add the stage ``name`` of measuring ``groups`` by the plan ``work`` to ``plan``: its longest
    bucket's first unit, simulated (:func:`causalscan.memplan.simulate`), and its rows per forward."""
    if not groups:
        return
    b = max(range(len(work)), key=lambda i: len(rows.pairs[work[i][0][0]].clean))
    plan.stages[name] = memplan.simulate(model, patch_units, (rows, groups, direction, metric_fn, work), (b, 0))
    rows_per = max((len(fw.pairs) for *_, fws in work for fw in fws), default=0)
    plan.chunks["rows per patched forward"] = max(plan.chunks.get("rows per patched forward", 0), rows_per)


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
