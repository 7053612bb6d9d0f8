"""Output files: directories checked before any work, every file replaced atomically (written beside
under a name unique to the process, then renamed), so a full disk or a crash never leaves a
truncated result in place of the last good one."""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from causalscan.errors import InputError


def finite(doc):
    """NaN and infinities -> None (recursively), so a document is strict JSON."""
    if isinstance(doc, float) and not math.isfinite(doc):
        return None
    if isinstance(doc, dict):
        return {k: finite(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [finite(v) for v in doc]
    return doc


def strict_json(doc, indent: int | None = 2) -> str:
    """``doc`` as strict JSON: no bare NaN or Infinity, which JSON parsers other than Python's reject."""
    return json.dumps(finite(doc), indent=indent, allow_nan=False)


def out_dir(path: str | Path) -> Path:
    """``path`` as an output directory that exists and takes files; else :class:`InputError`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError("is a file, not a directory for the outputs", file=str(path), field="out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = _temp(path / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write here ({e.strerror or e})", file=str(path), field="out") from None
    return path


def out_file(path: str | Path) -> Path:
    """``path`` as an output file whose directory takes files (and which is not a directory)."""
    path = Path(path)
    if path.is_dir():
        raise InputError("is a directory, not a file", file=str(path), field="out")
    out_dir(path.parent if str(path.parent) else ".")
    return path


def write(path: str | Path, data: str | bytes | Callable[[Path], None]) -> Path:
    """Replace ``path`` atomically with ``data`` (text, bytes, or a function writing the temp file)."""
    path = Path(path)
    tmp = _temp(path)
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write ({e.strerror or e}); the previous file, if any, is intact",
                         file=str(path), field="out") from None
    return path


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
