"""Result objects: ranked components, tensors per sweep, and their files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from causalscan.metrics import normalise


@dataclass(frozen=True)
class SweepSlot:
    """Components ``[start, stop)`` of a result form the sweep ``name`` shaped ``shape``."""

    name: str
    start: int
    stop: int
    shape: tuple


@dataclass
class PatchResult:
    """Exact patching: metric under each patch, per pair.

    ``patched`` [P, n]; ``clean``/``corrupt`` [P]; ``effect`` = patched - base run [P, n].
    """

    model: str
    dataset: str
    dataset_sha256: str
    direction: str
    metric: str
    components: list
    slots: list[SweepSlot]
    patched: torch.Tensor
    clean: torch.Tensor
    corrupt: torch.Tensor
    timings: dict = field(default_factory=dict)

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
        out = {}
        for kind, vec in self.summary().items():
            for s in self.slots:
                out[f"{kind}/{s.name}"] = vec[s.start:s.stop].reshape(s.shape).contiguous()
        return out

    def top(self, k: int = 10) -> list[dict]:
        """The ``k`` components of largest mean |effect|, with their statistics."""
        summ = self.summary()
        order = summ["exact_abs"].argsort(descending=True)[:k]
        return [
            {"component": str(self.components[j]), "site": self.components[j].site, "layer": self.components[j].layer,
             "index": self.components[j].index, "position": self.components[j].position,
             "exact": summ["exact"][j].item(), "exact_abs": summ["exact_abs"][j].item(),
             "exact_norm": summ["exact_norm"][j].item()}
            for j in order.tolist()
        ]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.top(len(self.components)))

    def to_json(self, top: int = 50) -> dict:
        from causalscan.versions import versions

        return {
            "kind": "patch",
            "model": self.model,
            "dataset": {"path": self.dataset, "sha256": self.dataset_sha256, "pairs": len(self.clean)},
            "settings": {"direction": self.direction, "metric": self.metric,
                         "sweeps": {s.name: list(s.shape) for s in self.slots}},
            "baselines": {"clean": self.clean.mean().item(), "corrupt": self.corrupt.mean().item()},
            "components": self.top(top),
            "timings": self.timings,
            "versions": versions(),
        }

    def save(self, out_dir: str | Path, top: int = 50) -> Path:
        """Write ``scan.json`` and ``scores.safetensors`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.float().cpu() for k, v in self.tensors().items()}, str(out / "scores.safetensors"))
        (out / "scan.json").write_text(json.dumps(self.to_json(top), indent=2))
        return out
