"""Devices: a device name checked before any weight is loaded, and a model split across devices
(``device_map``) by accelerate."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from causalscan.errors import InputError


def split(hf: nn.Module, device_map: str | dict | os.PathLike) -> nn.Module:
    """``hf`` dispatched across devices by accelerate: every module's inputs follow it to its device,
    the logits come back to the input's device.

    ``device_map``: ``auto`` or ``balanced`` (accelerate's planners over the free memory of every GPU
    and the CPU, a block never cut), a dict ``{module name: "cpu" | "cuda:N" | N}`` covering every
    weight, or the path of a JSON file holding one. Disk offload is refused (weights that are not
    in memory would be read on every forward). A module mapped to ``cpu`` computes on the CPU (not
    accelerate's CPU offload, which would copy its weights to the GPU on every forward)."""
    try:
        import accelerate
    except ImportError as e:
        raise InputError("device_map needs accelerate: pip install accelerate", field="device_map") from e
    src = None
    if isinstance(device_map, str | os.PathLike) and str(device_map) not in ("auto", "balanced"):
        src = str(device_map)
        if not Path(src).is_file():
            raise InputError("not auto, balanced or a JSON file", file=src, field="device_map")
        try:
            device_map = json.loads(Path(src).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"invalid JSON ({e})", file=src, field="device_map") from None
    if device_map in ("auto", "balanced"):
        no_split = getattr(hf, "_no_split_modules", None) or []
        memory = (
            accelerate.utils.get_balanced_memory(hf, no_split_module_classes=no_split)
            if device_map == "balanced"
            else None
        )
        device_map = accelerate.infer_auto_device_map(hf, max_memory=memory, no_split_module_classes=no_split)
    if not isinstance(device_map, dict) or not device_map:
        raise InputError("a device map is a JSON object {module name: device}", file=src, field="device_map")
    device_map = {name: f"cuda:{dev}" if isinstance(dev, int) else str(dev) for name, dev in device_map.items()}
    names = {n for n, _ in hf.named_modules()}
    for name, dev in device_map.items():
        where = f"device_map[{name!r}]"
        if name not in names:
            raise InputError(
                f"{where}: the model has no module of that name (e.g. {sorted(names - {''})[:3]})",
                file=src,
                field="device_map",
            )
        if dev in ("disk", "meta"):
            raise InputError(
                f"{where}: {dev!r}: causalscan keeps every weight in memory (cpu or cuda:N)",
                file=src,
                field="device_map",
            )
        check_device(dev)
    # a module mapped to the CPU computes there (accelerate's default would stream its weights to the GPU)
    main = "cpu" if "cpu" in device_map.values() else None
    quiet = logging.getLogger("accelerate.big_modeling")  # it warns of meta weights it does not make here
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return accelerate.dispatch_model(hf, device_map, main_device=main, force_hooks=True)
    except ValueError as e:  # accelerate's message names the weights the map misses
        raise InputError(str(e).splitlines()[0][:300], file=src, field="device_map") from None
    finally:
        quiet.setLevel(level)


def check_device(device) -> torch.device | None:
    """``device`` as a torch device this machine has, before any weight is loaded; else :class:`InputError`."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"not a torch device: {device!r} (cpu, cuda, cuda:N)", field="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{device!r}: this machine has no CUDA device; use cpu", field="device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)", field="device")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"{device!r}: causalscan runs on cpu or cuda", field="device")
    return dev
