"""``causalscan.patch``: exact activation patching of whole sweeps, many patches per forward
(:mod:`causalscan.patching.exact`), its memory plan and its result.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from causalscan import memplan
from causalscan.data import corruption
from causalscan.data.inputs import prepare
from causalscan.data.metrics import normalise
from causalscan.data.sweeps import Component, Sweep, build_sweeps, component_list, per_sweep, role_names, shapes
from causalscan.errors import check_options
from causalscan.executor import get as get_executor
from causalscan.patching.exact import measure, memory_stage
from causalscan.patching.planner import planned
from causalscan.progress import Progress
from causalscan.progress import check as check_progress
from causalscan.results import Result


@dataclass(kw_only=True)
class PatchResult(Result):
    """Exact patching: metric under each patch, per pair.

    ``patched`` [P, n]; ``clean``/``corrupt`` [P]; ``effect`` = patched - base run [P, n].
    """

    direction: str
    components: list
    sweeps: list[Sweep]
    patched: torch.Tensor
    tokens: list[str] | None = None  # the first pair's prompt, for figure axes

    @property
    def base(self) -> torch.Tensor:
        return self.clean if self.direction == "noising" else self.corrupt

    @property
    def effect(self) -> torch.Tensor:
        """``L(patched) - L(base)`` per pair and component, [P, n]."""
        return self.patched - self.base[:, None]

    def summary(self) -> dict[str, torch.Tensor]:
        """Per component [n]: signed mean effect, mean |effect|, normalised patched metric."""
        clean, corrupt = self.clean.mean().item(), self.corrupt.mean().item()
        return {
            "exact": self.effect.mean(0),
            "exact_abs": self.effect.abs().mean(0),
            "exact_norm": normalise(self.patched.mean(0), clean, corrupt),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"exact/head": [L, H], "exact_abs/head": ..., "exact_norm/head": ...}`` per sweep."""
        return per_sweep(self.summary(), self.sweeps)

    def top(self, k: int = 10) -> list[dict]:
        """The ``k`` components of largest mean |effect|, with their statistics."""
        summ = self.summary()
        order = summ["exact_abs"].argsort(descending=True)[:k]
        return [
            {
                **self.components[j].row(),
                "exact": summ["exact"][j].item(),
                "exact_abs": summ["exact_abs"][j].item(),
                "exact_norm": summ["exact_norm"][j].item(),
            }
            for j in order.tolist()
        ]

    def to_json(self, top: int = 50) -> dict:
        check_options(top=top)
        settings = {"direction": self.direction, "sweeps": shapes(self.sweeps), "roles": role_names(self.sweeps)}
        return self._document("patch", settings, tokens=self.tokens, components=self.top(top))

    def notes(self, doc: dict) -> list[str]:
        return [f"patch: {doc['timings']['forwards']} forwards in {doc['timings']['patch_s']:.2f}s"]

    def lines(self, doc: dict) -> list[str]:
        return [
            f"{row['component']:<28} effect {row['exact']:+.4f}  |effect| {row['exact_abs']:.4f}"
            for row in doc["components"][:10]
        ]


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
    memory_gb: float | None = None,
    dry_run: bool = False,
) -> PatchResult | memplan.Plan:
    """Exact effects of patching each component, every prompt pair, many patches per forward.

    ``components``: explicit :class:`Component` list (result ``exact/components`` ``[n]``);
    otherwise ``sites``: sweeps such as ``"head"`` (``[L, H]``), ``"head:pos"`` (``[L, T, H]``),
    ``"resid_pre"`` (``[L, T]``), ``"mlp_out:all"`` (``[L]``), ``"neuron"`` (``[L, d_mlp]``);
    with dictionaries attached (``cs.load(..., sae=DIR)``) ``"feature"`` (``[L_sae, T, d_sae]``,
    latents; one that is off in both runs has effect 0 and costs no forward) and
    ``"feature_error"`` (``[L_sae, T]``).
    ``direction``: ``noising`` (run clean, patch corrupt in) or ``denoising``.
    ``memory_budget``: bytes per forward (default: 1 GiB on CPU, half the free GPU memory).
    ``min_tokens``: merge start groups until a forward has this many row-positions (default
    2048 on CPU, 16384 on GPU; 0 never merges).
    ``samples``, ``noise_scale``, ``seed``: Gaussian-noise corruption of ``noise_span`` pairs
    (:mod:`causalscan.data.corruption`); every per-pair value is the mean over the samples.
    ``progress(stage, done, total)``: called after each unit of batched forwards.
    ``executor``: where the forwards run (None: this process; :class:`causalscan.executor.Ray`: a
    Ray cluster's actors, with the same result). The run's peak memory is predicted first
    (:mod:`causalscan.memplan`) and a run that cannot fit in ``memory_gb`` GiB per device (default:
    what each device has free) is refused; ``dry_run=True`` returns that plan instead of running.

    >>> import causalscan as cs
    >>> pairs = [{"clean": "a b c d", "corrupt": "a b e d", "answer": "c", "wrong": "e"}]
    >>> res = patch(cs.load("random:gpt2-tiny"), pairs, sites=["head", "resid_pre"])   # the tokenizer adds BOS
    >>> res.tensors()["exact/head"].shape, res.tensors()["exact/resid_pre"].shape
    (torch.Size([2, 4]), torch.Size([2, 5]))
    """
    t0 = time.perf_counter()
    check_options(memory_budget=memory_budget, min_tokens=min_tokens, memory_gb=memory_gb)
    check_progress(progress)
    get_executor(executor)
    inp = prepare(model, dataset, metric, direction, samples, noise_scale, seed)
    if components is not None:
        sweeps, comps = component_list(inp.model, components, inp.lengths[0], inp.dataset.roles)
    else:
        sweeps, comps = build_sweeps(inp.model, sites, inp.lengths, inp.dataset.name, inp.dataset.roles)
    groups = [[c] for c in comps]
    if any(c.site == "feature" for c in comps):  # an off latent's effect is 0: no forward for it
        from causalscan.model.features import active

        on = active(inp.model, inp.rows, comps)
        groups = [g if on[j] else [] for j, g in enumerate(groups)]
    work = planned(inp.model, inp.rows, groups, memory_budget, min_tokens)
    plan = memplan.Plan(memplan.weights(inp.model))
    memory_stage(plan, inp.model, inp.rows, groups, direction, inp.metric_fn, work, "patching")
    if dry_run:
        return plan
    plan.check_gb(memory_gb)
    m = measure(inp.model, inp.rows, groups, direction, inp.metric_fn, progress=progress, executor=executor, work=work)
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
