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


def check_number(value, field: str, lo: float | None = None, hi: float | None = None, *, integer: bool = False,
                 open_lo: bool = False) -> None:
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
