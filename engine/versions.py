"""Versions and machine facts recorded with every result."""

from __future__ import annotations

import platform

__version__ = "0.1.0"  # the package version (pyproject.toml reads it here)


def versions() -> dict:
    import torch
    import transformers

    out = {
        "causalscan": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out
