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

Each method plans its own stages and checks the plan before any work (``scan``, ``patch``,
``trace``, ``circuit``; ``dry_run=True`` returns the plan instead of running):

>>> import causalscan as cs
>>> p = cs.scan("induction", cs.zoo.dataset_path("induction", "previous"), sites="head", confirm=4, exact_budget=0,
...             dry_run=True)
>>> sorted(p.stages), p.chunks["attribution rows"]
(['attribution', 'confirmation'], 8)
"""

from __future__ import annotations

import copy
import weakref
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import torch

from causalscan.errors import InputError
from causalscan.model.load import Model

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

    def check_gb(self, memory_gb: float | None = None) -> None:
        """:meth:`check` against ``memory_gb`` GiB on every device (None: what each device has free)."""
        self.check(None if memory_gb is None else {d: int(memory_gb * 2**30) for d in self.peak()})

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
    fake_hf = _fake(model)
    # what comes from the weights is fake; the rows' tokens, labels and noise stay real
    fake = Model(fake_hf, type(model.adapter)(fake_hf), model.tokenizer, model.name, model.card)
    fake.adapter.dictionaries = model.adapter.dictionaries  # real weights on real tensors: counted with the model's
    compute = build(fake, *args)
    with _Live([*fake_hf.parameters(), *fake_hf.buffers()]) as live:
        compute(unit)
    return dict(live.peak)


_FAKES: OrderedDict = OrderedDict()  # the last few fake copies (no data), by architecture, dtype and device


def _fake(model: Model) -> torch.nn.Module:
    """A copy of ``model.hf`` on fake tensors, built from its config (once per config, dtype and device)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    hf = model.hf
    dtype = next(hf.parameters()).dtype
    key = (type(hf), hf.config.to_json_string(use_diff=False), hf.config._attn_implementation, dtype, model.device)
    if key not in _FAKES:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.device(model.device):
            _FAKES[key] = AutoModelForCausalLM.from_config(copy.deepcopy(hf.config), dtype=dtype).eval()
        while len(_FAKES) > 4:
            _FAKES.popitem(last=False)
    _FAKES.move_to_end(key)
    return _FAKES[key]


def weights(model: Model) -> dict[str, int]:
    """Bytes of the parameters and buffers per device."""
    out: dict[str, int] = defaultdict(int)
    dicts = [t for d in model.adapter.dictionaries.values() for t in d.tensors()]
    for t in [*model.hf.parameters(), *model.hf.buffers(), *dicts]:
        out[str(t.device)] += t.numel() * t.element_size()
    return dict(out)


__all__ = ["Plan", "available", "simulate", "weights"]
