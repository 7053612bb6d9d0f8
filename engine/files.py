"""Output files: directories checked before any work, every file replaced atomically (written beside
under a name unique to the process, then renamed), so a full disk or a crash never leaves a
truncated result in place of the last good one."""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from causalscan.errors import InputError

MIN_FREE = 1 << 20  # a full disk is refused before any work; a write that still runs out keeps the last file


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
    free = shutil.disk_usage(path).free
    if free < MIN_FREE:
        raise InputError(
            f"only {free >> 10} KiB free on this disk; the outputs need at least {MIN_FREE >> 20} MiB",
            file=str(path),
            field="out",
        )
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
        raise InputError(
            f"cannot write ({e.strerror or e}); the previous file, if any, is intact", file=str(path), field="out"
        ) from None
    return path


_held: dict[Path, tuple] = {}  # directory -> (open lock file, depth): re-entrant within the process


@contextmanager
def lock(directory: str | Path) -> Iterator[None]:
    """Hold ``directory/.causalscan.lock`` (an ``flock``, released by the kernel if the process dies,
    so never stale) while the block runs; a second process gets :class:`InputError` at once."""
    import fcntl

    key = Path(directory).resolve()
    if key in _held:
        f, depth = _held[key]
        _held[key] = (f, depth + 1)
    else:
        key.mkdir(parents=True, exist_ok=True)
        f = open(key / ".causalscan.lock", "a+")  # noqa: SIM115 (held across the block)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise InputError(
                f"another causalscan run ({holder}) is writing here; wait for it or choose another --out",
                file=str(directory),
                field="out",
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        _held[key] = (f, 1)
    try:
        yield
    finally:
        f, depth = _held[key]
        if depth > 1:
            _held[key] = (f, depth - 1)
        else:
            del _held[key]
            f.close()  # releases the flock; the file stays (removing it would race a waiting writer)


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
