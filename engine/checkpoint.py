"""Partial results of a long job, written as it goes, so that a rerun with the same settings resumes.

One safetensors file holds the job's accumulators and, in its metadata, the settings key and the
finished work units; it is replaced atomically (written beside, then renamed), so an interrupted
write leaves the previous state. A rerun whose settings key differs starts from scratch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def key(settings: dict) -> str:
    """A digest of the job's settings (anything that changes its results)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(model: torch.nn.Module) -> str:
    """A cheap digest of the weights: the sums of every parameter, in order."""
    with torch.no_grad():
        sums = torch.stack([p.detach().float().sum() for p in model.parameters()])
    return hashlib.sha256(sums.cpu().numpy().tobytes()).hexdigest()[:16]


class Checkpoint:
    """``directory/<name>.partial.safetensors``: tensors plus the finished units of one job."""

    def __init__(self, directory: str | Path, name: str, settings_key: str, every_s: float = 30.0):
        self.path = Path(directory) / f"{name}.partial.safetensors"
        self.key, self.every_s, self.last = settings_key, every_s, time.monotonic()

    def load(self) -> tuple[dict[str, torch.Tensor], set[int]] | None:
        """The saved tensors and finished units, if the file exists and has this job's key."""
        if not self.path.is_file():
            return None
        with safe_open(str(self.path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != self.key:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}, set(json.loads(meta["done"]))

    def save(self, tensors: dict[str, torch.Tensor], done: set[int], force: bool = False) -> bool:
        """Write if ``every_s`` has passed since the last write (or ``force``); True if written."""
        if not force and time.monotonic() - self.last < self.every_s:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"key": self.key, "done": json.dumps(sorted(done))})
        os.replace(tmp, self.path)
        self.last = time.monotonic()
        return True

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
