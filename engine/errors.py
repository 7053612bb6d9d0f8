"""The one exception type for errors a user can cause (bad file, field, spec, architecture)."""

from __future__ import annotations

import math


class InputError(ValueError):
    """Bad input: the message names the file, line and field where it can. The CLI exits 2."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None):
        where = ":".join(str(p) for p in (file, line) if p is not None)
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{message}" if where else f"{what}{message}")
        self.file, self.line, self.field = file, line, field


def is_int(x) -> bool:
    """An int that is not a bool (JSON ``true`` is not token 1, nor layer 1)."""
    return isinstance(x, int) and not isinstance(x, bool)


def check_vector(v, d: int, field: str) -> None:
    """Raise :class:`InputError` unless ``v`` is a finite, non-zero tensor of shape ``[d]``."""
    import torch

    if not isinstance(v, torch.Tensor) or v.shape != (d,) or not torch.isfinite(v).all() or not v.norm() > 0:
        raise InputError(f"must be a finite non-zero tensor [{d}]", field=field)


def check_number(
    value, field: str, lo: float | None = None, hi: float | None = None, *, integer: bool = False, open_lo: bool = False
) -> None:
    """Raise :class:`InputError` unless ``value`` is a finite number (an int with ``integer``) in
    ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""
    kind = "an integer" if integer else "a finite number"
    ok = isinstance(value, int) if integer else isinstance(value, int | float) and math.isfinite(value)
    if isinstance(value, bool) or not ok:
        raise InputError(f"must be {kind}, not {value!r}", field=field)
    if lo is not None and (value <= lo if open_lo else value < lo) or hi is not None and value > hi:
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise InputError(f"must be in {'(' if open_lo else '['}{lo_s}, {hi_s}], not {value!r}", field=field)


# The range of every numeric setting, by its API name (the CLI's option with ``-`` for ``_``), as
# ``(lo, hi, integer, open_lo)``. Upper bounds keep a typo from allocating or looping without end.
_SEED_MAX = 2**63 - 1
RANGES: dict[str, tuple] = {
    "samples": (1, 10_000, True, False),
    "noise_scale": (0, 1e6, False, True),
    "seed": (0, _SEED_MAX, True, False),
    "top": (0, None, True, False),
    "batch_size": (1, 1 << 20, True, False),
    "confirm": (0, 1 << 24, True, False),
    "confirm_random": (0, 1 << 24, True, False),
    "fn_subsets": (0, 100_000, True, False),
    "fn_p": (0, 1, False, True),
    "window": (1, 1 << 16, True, False),
    "n": (1, 1 << 16, True, False),
    "radius": (0, 1e12, False, True),
    "p": (0, 1e3, False, True),
    "q": (0, 1e3, False, True),
    "max_new_tokens": (1, 1 << 20, True, False),
    "steps": (1, 1_000_000, True, False),
    "lr": (0, 1e6, False, True),
    "alpha": (None, None, False, False),
    "index": (0, None, True, False),
    "layer": (0, None, True, False),
    "source": (0, None, True, False),
    "target": (0, None, True, False),
    "memory_budget": (1, None, True, False),
    "memory_budget_mb": (1, None, True, False),
    "min_tokens": (0, None, True, False),
    "ig_steps": (1, 1000, True, False),
    "exact_budget": (0, 1e9, False, False),
    "edges": (1, 1 << 24, True, False),
    "refine": (0, 64, True, False),
    "actors": (1, 1 << 16, True, False),
    "memory_gb": (0, None, False, True),
    "max_logits": (1, 1 << 20, True, False),
    "latents": (1, 1 << 20, True, False),
    "max_features": (0, None, True, False),
    "logit_prob": (0, 1, False, True),
    "node_threshold": (0, 1, False, True),
    "edge_threshold": (0, 1, False, True),
}


def check_options(**values) -> None:
    """Check each named setting against :data:`RANGES` (``None`` means "the default", and ``"auto"``
    a radius to be found); :class:`InputError` names the first that is out of range."""
    for field, value in values.items():
        if value is None or field == "radius" and value == "auto":
            continue
        lo, hi, integer, open_lo = RANGES[field]
        check_number(value, field, lo, hi, integer=integer, open_lo=open_lo)


def check_type(value, types, field: str, what: str) -> None:
    """Raise :class:`InputError` unless ``value`` is one of ``types`` (``what`` says which in words)."""
    if not isinstance(value, types):
        raise InputError(f"must be {what}, not {type(value).__name__} {value!r:.60}", field=field)


def names(value, field: str, example: str) -> list[str]:
    """A comma-separated string (empty pieces skipped) or a list of non-empty strings -> the names;
    else :class:`InputError`."""
    items = [s for s in value.split(",") if s.strip()] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items or not all(isinstance(s, str) and s.strip() for s in items):
        raise InputError(f"must name at least one (e.g. {example!r}), not {value!r:.60}", field=field)
    return [s.strip() for s in items]
