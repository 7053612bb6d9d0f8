"""Exact activation patching, many patches per forward.

Each patch ``(site, layer, index, position)`` is measured on every prompt pair: run the base
prompt (clean when noising, corrupt when denoising) with the component's activation taken from
the other prompt, and read the metric. Rows of one forward are (pair, patch) combinations that
share a start: a patch at ``layer`` and position ``p`` leaves every block before ``layer`` and
every position before ``p`` as in the base run, so the forward starts at ``layer`` from the
cached residual and reuses the cached keys and values of positions ``< p``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from causalscan import corruption, runner
from causalscan.adapters import SITES
from causalscan.bindings import ops
from causalscan.corruption import Rows
from causalscan.data import as_dataset
from causalscan.errors import InputError
from causalscan.load import Model, load
from causalscan.metrics import get as get_metric
from causalscan.results import PatchResult, SweepSlot

BY_POSITION = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


@dataclass(frozen=True)
class Component:
    """A node: ``site`` at ``layer``, component ``index`` (head / neuron; 0 for residual sites),
    ``position`` (None: all positions)."""

    site: str
    layer: int
    index: int = 0
    position: int | None = None

    def __str__(self) -> str:
        pos = "" if self.position is None else f"@{self.position}"
        return f"{self.site}.L{self.layer}.{self.index}{pos}"


def parse_sweep(spec: str) -> tuple[str, bool]:
    """``"head"`` -> (head, all positions); ``"head:pos"``; ``"resid_pre"`` (by position by
    default); ``"resid_pre:all"``."""
    site, _, mode = spec.strip().partition(":")
    if site not in SITES:
        raise InputError(f"unknown site {site!r} in sweep {spec!r}; sites: {', '.join(SITES)}", field="sites")
    if mode not in ("", "pos", "all"):
        raise InputError(f"unknown sweep mode {mode!r} in {spec!r}; use {site}:pos or {site}:all", field="sites")
    return site, (mode == "pos") or (mode == "" and site in BY_POSITION)


def sweep_name(site: str, by_pos: bool) -> str:
    """``head``, ``head_pos``, ``resid_pre``, ``resid_pre_all``: the site, marked when not its default."""
    return site + ("" if by_pos == (site in BY_POSITION) else "_pos" if by_pos else "_all")


def sweep_components(model: Model, site: str, by_pos: bool, seq: int | None) -> tuple[list[Component], tuple]:
    """Every component of a sweep, and the result shape (``[L, T, C]`` squeezed of C == 1)."""
    ad = model.adapter
    ad.check_site(site)
    n_comp = ad.shape(site)[0]
    comps = [
        Component(site, layer, c, p)
        for layer in range(ad.n_layers)
        for p in (range(seq) if by_pos else [None])
        for c in range(n_comp)
    ]
    shape = (ad.n_layers,) + ((seq,) if by_pos else ()) + ((n_comp,) if n_comp > 1 else ())
    return comps, shape


def _row_bytes(model: Model, seq: int, new: int, n_layers: int, tapped_width: int) -> int:
    """Rough peak bytes of one row of a no-grad forward over ``new`` of ``seq`` positions."""
    ad, el = model.adapter, next(model.hf.parameters()).element_size()
    kv = 2 * ad.n_layers * seq * ad.n_kv_heads * ad.d_head
    live = new * (6 * ad.d_model + 3 * ad.d_mlp + 2 * ad.n_heads * seq + 2 * tapped_width)
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    return el * (kv + live + 2 * vocab) + 64 * n_layers


def _default_budget(model: Model) -> int:
    dev = model.device
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free * 0.5)
    return 1 << 30


def build_sweeps(model: Model, sites: str | Sequence[str], lengths: list[int], dataset_name: str
                 ) -> tuple[list[SweepSlot], list[Component]]:
    """The slots and the flat component list of sweeps ``sites`` (by-position sweeps need one length)."""
    slots: list[SweepSlot] = []
    comps: list[Component] = []
    for spec in [sites] if isinstance(sites, str) else sites:
        site, by_pos = parse_sweep(spec)
        if by_pos and len(lengths) > 1:
            raise InputError(f"sweep {spec!r} is by position: every pair needs the same token length, "
                             f"found lengths {lengths}", file=dataset_name, field="sites")
        cs, shape = sweep_components(model, site, by_pos, lengths[0])
        slots.append(SweepSlot(sweep_name(site, by_pos), len(comps), len(comps) + len(cs), shape))
        comps += cs
    return slots, comps


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
    progress=None,
    samples: int = corruption.SAMPLES,
    noise_scale: float = corruption.SCALE,
    seed: int = 0,
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

    >>> res = patch(load("random:gpt2-tiny"), pairs, sites="head")
    >>> res.tensors()["exact/head"].shape
    torch.Size([2, 4])
    """
    t0 = time.perf_counter()
    model = load(model)
    ds = as_dataset(dataset)
    check_direction(direction)
    metric_name, metric_fn = get_metric(metric)
    pairs = ds.tokenize(model.tokenizer, model.vocab_size)
    lengths = sorted({len(p.clean) for p in pairs})

    slots: list[SweepSlot] = []
    comps: list[Component] = []
    if components is not None:
        comps = list(components)
        for c in comps:
            check_component(model, c, lengths[0])
        slots.append(SweepSlot("components", 0, len(comps), (len(comps),)))
    else:
        slots, comps = build_sweeps(model, sites, lengths, ds.name)

    rows = corruption.rows(model, pairs, samples, noise_scale, seed)
    patched, clean_m, corrupt_m, n_forwards = measure(model, rows, [[c] for c in comps], direction, metric_fn,
                                                      memory_budget, min_tokens, progress)
    return PatchResult(
        model=model.name, dataset=ds.name, dataset_sha256=ds.sha256, direction=direction, metric=metric_name,
        components=comps, slots=slots, patched=patched, clean=clean_m, corrupt=corrupt_m,
        timings={"patch_s": time.perf_counter() - t0, "forwards": n_forwards}, corruption=rows.settings(),
    )


def check_direction(direction: str) -> None:
    if direction not in ("noising", "denoising"):
        raise InputError(f"direction must be noising or denoising, not {direction!r}", field="direction")


def check_component(model: Model, c: Component, seq: int) -> None:
    model.adapter.check_site(c.site, c.layer)
    if not 0 <= c.index < model.adapter.shape(c.site)[0]:
        raise InputError(f"{c}: index out of range", field="components")
    if c.position is not None and not 0 <= c.position < seq:
        raise InputError(f"{c}: position out of range", field="components")


@torch.no_grad()
def measure(model: Model, rows: Rows, groups: list[list[Component]], direction: str, metric_fn,
            memory_budget: int | None = None, min_tokens: int | None = None, progress=None) -> tuple:
    """The metric with each group of components patched together, per pair.

    Returns ``patched`` [P, G], ``clean`` and ``corrupt`` [P] (means over each pair's rows) and the
    number of forwards.
    """
    budget = memory_budget or _default_budget(model)
    if min_tokens is None:
        min_tokens = 16384 if model.device.type == "cuda" else 2048
    n = len(rows.pairs)
    patched = torch.empty(n, len(groups))
    clean_m, corrupt_m = torch.empty(n), torch.empty(n)
    n_forwards = 0
    for seq in sorted({len(p.clean) for p in rows.pairs}):
        idx = [i for i, p in enumerate(rows.pairs) if len(p.clean) == seq]
        res = _patch_bucket(model, rows, idx, groups, direction, metric_fn, budget, progress, min_tokens)
        r = torch.tensor(idx)
        patched[r], clean_m[r], corrupt_m[r] = res[0], res[1], res[2]
        n_forwards += res[3]
    return rows.mean(patched), rows.mean(clean_m), rows.mean(corrupt_m), n_forwards


def start(group: list[Component]) -> tuple[int, int]:
    """The earliest (layer, position) a patch of ``group`` changes."""
    return min(c.layer for c in group), min(c.position or 0 for c in group)


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


def _patch_bucket(model: Model, rows: Rows, idx: list[int], groups: list[list[Component]], direction: str,
                  metric_fn, budget: int, progress, min_tokens: int) -> tuple:
    """Patched metric [R, G] and clean/corrupt metrics [R] for rows ``idx`` (equal length)."""
    ad, dev = model.adapter, model.device
    noising = direction == "noising"
    b = rows.batch(idx, noising, model.hf.get_input_embeddings().weight)
    base_ids = b.base
    seq = base_ids.shape[1]
    starts = [start(g) for g in groups]
    sources = sorted({(c.site, c.layer) for g in groups for c in g})
    base_logits, base_acts, kv = runner.run_with_cache(ad, base_ids, [("resid_pre", s) for s in {s[0] for s in starts}],
                                                       noise=b.base_noise)
    src_acts: dict = {}
    src_logits = runner.forward(ad, b.other, [runner.capture(ad, s, layer, src_acts) for s, layer in sources],
                                noise=b.other_noise)
    base_logits, src_logits = base_logits[:, -1], src_logits[:, -1]
    clean_logits = base_logits if noising else src_logits
    ref = torch.log_softmax(clean_logits.float(), -1)
    ans, wrong = b.answer, b.wrong
    base_m = metric_fn(base_logits, ans, wrong, ref)
    src_m = metric_fn(src_logits, ans, wrong, ref)
    clean_m, corrupt_m = (base_m, src_m) if noising else (src_m, base_m)

    n = len(idx)
    out = torch.empty(n, len(groups))
    n_forwards = 0
    for layer, pos, members in plan(starts, n, seq, min_tokens):
        sites = {c.site for j in members for c in groups[j]}
        width = sum(ad.shape(s)[0] * ad.shape(s)[1] for s in sites)
        per_row = _row_bytes(model, seq, seq - pos, ad.n_layers - layer, width)
        chunk = max(1, budget // per_row)
        pair_idx = torch.arange(n).repeat_interleave(len(members))
        group_idx = torch.tensor(members).repeat(n)
        for lo in range(0, len(pair_idx), chunk):
            pi, gi = pair_idx[lo:lo + chunk], group_idx[lo:lo + chunk]
            r = pi.to(dev)
            logits = _run_rows(model, groups, r, gi, layer, pos, base_ids, base_acts, src_acts, kv)
            out[pi, gi] = metric_fn(logits, ans[r], wrong[r], ref[r]).float().cpu()
            n_forwards += 1
            if progress:
                progress(n_forwards)
    return out, clean_m.float().cpu(), corrupt_m.float().cpu(), n_forwards + 2


def _run_rows(model, groups, pi, gi, layer, pos, base_ids, base_acts, src_acts, kv) -> torch.Tensor:
    """One forward: row r is base row ``pi[r]`` with every component of ``groups[gi[r]]`` patched."""
    ad = model.adapter
    n_rows, new = len(pi), base_ids.shape[1] - pos
    by_site: dict[tuple[str, int], list[tuple[int, Component]]] = defaultdict(list)
    for r, j in enumerate(gi.tolist()):
        for c in groups[j]:
            by_site[(c.site, c.layer)].append((r, c))
    taps = []
    for (site, lay), members in by_site.items():
        mask = torch.zeros(n_rows, new, ad.shape(site)[0], dtype=torch.bool)
        every = [(r, c.index) for r, c in members if c.position is None]
        one = [(r, c.position - pos, c.index) for r, c in members if c.position is not None]
        if every:
            r, c = torch.tensor(every).T
            mask[r, :, c] = True
        if one:
            r, t, c = torch.tensor(one).T
            mask[r, t, c] = True
        mask = mask.to(pi.device)
        source = src_acts[(site, lay)][pi, pos:]
        taps.append((site, lay, lambda x, m=mask, s=source: ops.perturb(x, "patch", m, source=s)))
    resid = base_acts[("resid_pre", layer)][pi, pos:, 0]
    past = kv.cache(pi, pos, layer, model.hf.config)
    return runner.forward(ad, base_ids[pi, pos:], taps, start_layer=layer, resid=resid, past=past)[:, -1]
