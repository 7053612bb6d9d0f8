"""The memory plan: a run's peak memory per device, predicted before it runs, and a refusal when it cannot fit.

The plan runs the heaviest unit of each stage (the largest attribution batch; the first patched
forwards of the longest bucket, with the earliest-starting groups) on a copy of the model built
from its config on fake tensors (``FakeTensorMode``: shapes, dtypes and devices, no data, no
arithmetic), through the engine's own code, and tracks the bytes of every tensor storage alive at
each step, per device. A stage's peak plus the weights is the prediction: it follows every
family, attention implementation, site and method the engines support without a formula per
case. What it does not see: allocator caching and fragmentation, and the framework's own
workspace (BLAS, thread pools); the CPU bench measures how far that puts the prediction from the
process's resident peak.

>>> import causalscan as cs
>>> from causalscan.inputs import prepare
>>> inp = prepare("induction", cs.zoo.dataset_path("induction", "previous"), "logit_diff", "noising")
>>> p = scan_plan(inp, ["head"], batch_size=8, confirm=4)
>>> sorted(p.stages), p.chunks["attribution rows"]
(['attribution', 'exact patching'], 8)
"""

from __future__ import annotations

import copy
import weakref
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch

from causalscan.errors import InputError
from causalscan.inputs import Inputs
from causalscan.load import Model

GiB = float(1 << 30)


@dataclass
class Plan:
    """``weights`` (bytes per device), each stage's peak above the weights (bytes per device) and
    the chunk sizes the engines will use."""

    weights: dict[str, int]
    stages: dict[str, dict[str, int]] = field(default_factory=dict)
    chunks: dict[str, int] = field(default_factory=dict)

    def peak(self) -> dict[str, int]:
        """Predicted peak bytes per device: the weights plus the heaviest stage there."""
        devices = set(self.weights) | {d for s in self.stages.values() for d in s}
        return {
            d: self.weights.get(d, 0) + max((s.get(d, 0) for s in self.stages.values()), default=0)
            for d in sorted(devices)
        }

    def check(self, limit: dict[str, int] | None = None) -> None:
        """:class:`InputError` naming the bytes needed where the peak exceeds ``limit`` (bytes per
        device; default: what each device has available now)."""
        limit = limit if limit is not None else available(list(self.peak()))
        for dev, need in self.peak().items():
            if dev in limit and need > limit[dev]:
                w = self.weights.get(dev, 0) / GiB
                raise InputError(
                    f"the run needs {need / GiB:.2f} GiB on {dev} (weights {w:.2f} GiB + its heaviest "
                    f"stage), {limit[dev] / GiB:.2f} GiB is available; lower --batch-size or "
                    f"--memory-budget-mb, or use a smaller dtype",
                    field="memory",
                )

    def to_json(self) -> dict:
        return {
            "peak_bytes": self.peak(),
            "weights_bytes": self.weights,
            "stages_bytes": self.stages,
            "chunks": self.chunks,
        }

    def __str__(self) -> str:
        lines = [
            f"{dev}: predicted peak {b / GiB:.3f} GiB (weights {self.weights.get(dev, 0) / GiB:.3f} GiB)"
            for dev, b in self.peak().items()
        ]
        lines += [f"  {name}: +{b / GiB:.3f} GiB on {dev}" for name, s in self.stages.items() for dev, b in s.items()]
        lines += [f"  {name}: {n}" for name, n in self.chunks.items()]
        return "\n".join(lines)


def available(devices: list[str]) -> dict[str, int]:
    """Bytes each device has free now: ``MemAvailable`` of the machine for ``cpu``, the free memory of a GPU."""
    out = {}
    for dev in devices:
        if dev.startswith("cuda"):
            out[dev] = torch.cuda.mem_get_info(torch.device(dev))[0]
        elif dev == "cpu":
            try:
                with open("/proc/meminfo") as f:
                    info = dict(line.split(":", 1) for line in f)
                out[dev] = int(info["MemAvailable"].split()[0]) * 1024
            except (OSError, KeyError, ValueError):  # not Linux: no refusal on cpu
                pass
    return out


class _Live(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of tensor storages alive, per device, and their peak, for every op run under it; the
    storages of ``held`` (the weights) are there already, so their views count nothing."""

    def __init__(self, held=()):
        super().__init__()
        self.live: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self.seen = torch.utils.weak.WeakIdKeyDictionary()
        for t in held:
            self.seen[t.untyped_storage()] = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self.seen:
                    n, dev = st.nbytes(), str(t.device)
                    self.seen[st] = n
                    self.live[dev] += n
                    self.peak[dev] = max(self.peak[dev], self.live[dev])
                    weakref.finalize(st, self._free, dev, n)
        return out

    def _free(self, dev: str, n: int) -> None:
        self.live[dev] -= n


def simulate(model: Model, build, args: tuple, unit) -> dict[str, int]:
    """Peak bytes per device above the weights of ``build(model, *args)(unit)`` (a stage of
    :mod:`causalscan.executor`) run on a fake copy of ``model`` built from its config."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    hf = model.hf
    config = copy.deepcopy(hf.config)
    dtype = next(hf.parameters()).dtype
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device(model.device):
        fake_hf = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    # outside the mode: what comes from the weights is fake, the rows' tokens, labels and noise stay real
    fake = Model(fake_hf, type(model.adapter)(fake_hf), model.tokenizer, model.name, model.card)
    compute = build(fake, *args)
    with _Live([*fake_hf.parameters(), *fake_hf.buffers()]) as live:
        compute(unit)
    return dict(live.peak)


def weights(model: Model) -> dict[str, int]:
    """Bytes of the parameters and buffers per device."""
    out: dict[str, int] = defaultdict(int)
    for t in [*model.hf.parameters(), *model.hf.buffers()]:
        out[str(t.device)] += t.numel() * t.element_size()
    return dict(out)


def _heaviest_batch(inp: Inputs, batch_size: int) -> int:
    batches = inp.rows.batches(batch_size)
    return max(range(len(batches)), key=lambda i: len(batches[i]) * len(inp.rows.pairs[batches[i][0]].clean))


def patching_stage(
    plan: Plan,
    inp: Inputs,
    groups: list,
    direction: str,
    memory_budget: int | None = None,
    min_tokens: int | None = None,
    name: str = "exact patching",
) -> None:
    """Add the patching stage of ``groups`` (its longest bucket's first unit) and its rows per forward."""
    from causalscan.patching import patch_units, planned

    if not groups:
        return
    work = planned(inp.model, inp.rows, groups, memory_budget, min_tokens)
    b = max(range(len(work)), key=lambda i: len(inp.rows.pairs[work[i][0][0]].clean))
    plan.stages[name] = simulate(inp.model, patch_units, (inp.rows, groups, direction, inp.metric_fn, work), (b, 0))
    plan.chunks["rows per patched forward"] = max((len(fw.pairs) for *_, fws in work for fw in fws), default=0)


def scan_plan(
    inp: Inputs,
    sites,
    method: str = "atp*",
    batch_size: int = 8,
    confirm: int = 32,
    confirm_random: int | None = None,
    direction: str = "noising",
    graddrop: bool = False,
    ig_steps: int | None = None,
    ig_path: str = "inputs",
    memory_budget: int | None = None,
) -> Plan:
    """The plan of :func:`causalscan.scan` with these settings: the attribution stage (its largest
    batch) and exact patching of ``confirm + confirm_random`` nodes (the earliest ones: the
    longest forwards)."""
    from causalscan.scan import IG_STEPS, attribution_units
    from causalscan.sweeps import build_sweeps

    sweeps, comps = build_sweeps(inp.model, sites, inp.lengths, inp.dataset.name, inp.dataset.roles)
    plan = Plan(weights(inp.model), chunks={"attribution rows": batch_size})
    steps = (IG_STEPS if ig_steps is None else ig_steps) if method == "atp-ig" else 0
    args = (replace(inp, model=None), sweeps, direction, method == "atp*", graddrop, batch_size, steps, ig_path)
    plan.stages["attribution"] = simulate(inp.model, attribution_units, args, _heaviest_batch(inp, batch_size))
    k = confirm + (confirm if confirm_random is None else confirm_random)
    patching_stage(plan, inp, [[c] for c in comps[:k]], direction, memory_budget)
    return plan


__all__ = ["Plan", "available", "patching_stage", "scan_plan", "simulate", "weights"]
