"""Partial results of a long job, written as it goes, so that a rerun with the same settings resumes.

One safetensors file holds the job's accumulators and, in its metadata, the settings key, the
finished work units and a digest of both; it is replaced atomically (written beside under a name
unique to the process, then renamed), so an interrupted write leaves the previous state. A rerun
whose settings key differs starts from scratch. A file that cannot be read, whose digest does not
match, or whose tensors or units are not what the job expects is set aside (renamed
``*.bad-<time>``, with a warning naming it) and the job starts afresh: never a wrong resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from causalscan import files
from causalscan.errors import check_type

log = logging.getLogger("causalscan")


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
        check_type(directory, str | os.PathLike, "checkpoint", "a directory path")
        self.path = Path(directory) / f"{name}.partial.safetensors"
        self.key, self.every_s, self.last = settings_key, every_s, time.monotonic()

    def load(
        self, shapes: dict[str, tuple] | None = None, units: int | None = None
    ) -> tuple[dict[str, torch.Tensor], set[int]] | None:
        """The saved tensors and finished units, if the file exists and has this job's key. ``shapes``:
        the tensors the job expects (None in a shape: any size); ``units``: the number of work units.
        A damaged or foreign-shaped file is set aside and None returned."""
        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != self.key:
                    return None
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            done = json.loads(meta["done"])
            _check(tensors, done, meta.get("digest"), self.key, shapes, units)
        except Exception as e:  # any damage: never resume from it
            bad = self.path.with_name(f"{self.path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.path, bad)
            log.warning("checkpoint %s is damaged (%s): set aside as %s; starting afresh", self.path, e, bad.name)
            return None
        return tensors, set(done)

    def save(self, tensors: dict[str, torch.Tensor], done: set[int], force: bool = False) -> bool:
        """Write if ``every_s`` has passed since the last write (or ``force``); True if written."""
        if not force and time.monotonic() - self.last < self.every_s:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        units = sorted(done)
        meta = {"key": self.key, "done": json.dumps(units), "digest": digest(tensors, units, self.key)}
        files.write(self.path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        self.last = time.monotonic()
        return True

    @contextmanager
    def held(self, state: Callable[[], tuple | None]) -> Iterator[None]:
        """Lock the checkpoint's directory against a second writer while the block runs; on Ctrl-C
        write ``state()`` (``(tensors, done)``, or None mid-update) before the interrupt goes on."""
        with files.lock(self.path.parent):
            try:
                yield
            except KeyboardInterrupt:
                now = state()
                if now is not None and now[1]:
                    self.save(*now, force=True)
                raise

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def run(
    ck: Checkpoint | None,
    sums: dict[str, torch.Tensor],
    n: int,
    parts: Callable[[list[int]], Iterator[tuple[int, object]]],
    add: Callable[[dict, object], None],
    progress=None,
    stage: str = "attribution",
) -> dict[str, torch.Tensor]:
    """Work units ``0 .. n-1`` into the accumulators ``sums``: ``parts(todo)`` computes the units
    ``todo`` and yields ``(unit, part)`` in any order (an executor's ``map``); ``add(sums, part)``
    adds one in. Parts are added in unit order whatever order they come in, so the sums do not
    depend on who computed what. Finished units are resumed from ``ck`` and written to it as they
    go (and on Ctrl-C, unless it lands mid-addition). Returns the sums."""
    from causalscan.progress import report

    done: set[int] = set()
    saved = ck.load({k: tuple(v.shape) for k, v in sums.items()}, n) if ck else None
    if saved:
        sums, done = saved
        log.info("resuming from %s: %d/%d batches done", ck.path, len(done), n)
    todo = [i for i in range(n) if i not in done]
    waiting: dict[int, object] = {}  # parts that came before an earlier unit's
    consistent = True
    with ck.held(lambda: (sums, done) if consistent else None) if ck else contextlib.nullcontext():
        nxt = 0
        for j, part in parts(todo):
            waiting[j] = part
            while nxt < len(todo) and nxt in waiting:
                consistent = False  # sums hold part of this unit until done names it
                add(sums, waiting.pop(nxt))
                done.add(todo[nxt])
                consistent = True
                nxt += 1
                if ck:
                    ck.save(sums, done, force=len(done) == n)
                report(progress, stage, len(done), n)
    return sums


def digest(tensors: dict[str, torch.Tensor], done: list[int], settings_key: str) -> str:
    """sha256 over the settings key, the finished units and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(f"{settings_key}|{json.dumps(done)}".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"|{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check(tensors: dict, done, saved_digest, settings_key: str, shapes: dict | None, units: int | None) -> None:
    """Raise ValueError unless the file's contents are what it says and what the job expects."""
    if not (isinstance(done, list) and all(isinstance(u, int) and not isinstance(u, bool) for u in done)):
        raise ValueError("its list of finished units is not a list of integers")
    if len(set(done)) != len(done) or units is not None and any(not 0 <= u < units for u in done):
        raise ValueError(f"its finished units are not distinct units of 0..{units}")
    if saved_digest != digest(tensors, done, settings_key):
        raise ValueError("its digest does not match its contents")
    if shapes is not None:
        if set(tensors) != set(shapes):
            raise ValueError(f"it holds {sorted(tensors)}, the job needs {sorted(shapes)}")
        for name, want in shapes.items():
            got = tuple(tensors[name].shape)
            if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got, strict=True)):
                raise ValueError(f"{name} has shape {list(got)}, the job needs {list(want)}")
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{name} holds NaN or infinite values")
