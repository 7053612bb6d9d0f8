"""What the commands share at run time: the model loaded from the options, the dataset (``--data`` or
the zoo model's), progress on stderr, the ``--ray`` executor, and the job of the methods on a
dataset of pairs (``patch``, ``scan``, ``trace``, ``circuit``)."""

from __future__ import annotations

import contextlib
import logging
import sys

from causalscan import zoo
from causalscan.data.pairs import Dataset
from causalscan.errors import InputError
from causalscan.progress import Bars, log


class _Stderr(logging.Handler):
    """Log records as plain lines on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def shown(args) -> bool:
    """Progress on stderr: always, but under ``--json`` only with ``--progress``."""
    return getattr(args, "progress", False) or not args.json


def bars(args) -> Bars:
    """Progress bars and notes on stderr; both silent under ``--json`` unless ``--progress``."""
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        log.addHandler(_Stderr())
    log.setLevel(logging.INFO if shown(args) else logging.WARNING)
    args.bars = Bars(enabled=shown(args))  # closed by main if the command is interrupted
    return args.bars


def load(args):
    """The model of ``--model`` on ``--device`` (default: cuda if there is one) or ``--device-map``."""
    import torch
    from transformers.utils import logging as hf_logging

    import causalscan

    split = getattr(args, "device_map", None)  # steer has no --device-map
    if split is not None and getattr(args, "ray", None) is not None:
        raise InputError(
            "--device-map with --ray: each Ray actor holds the whole model on its own device", field="device_map"
        )
    device = None if split else args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"loading {args.model} on {device or f'the devices of {split}'}", file=sys.stderr, flush=True)
    if shown(args):  # transformers' own weight-loading bar follows ours
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    return causalscan.load(
        args.model, device=device, device_map=split, dtype=getattr(torch, args.dtype), sae=getattr(args, "sae", None)
    )


@contextlib.contextmanager
def executor(args):
    """``--ray``: a :class:`causalscan.executor.Ray` on that cluster, closed afterwards; else None."""
    if args.ray is None:
        if args.actors is not None:
            raise InputError("--actors needs --ray", field="actors")
        yield None
        return
    import torch

    from causalscan.executor import Ray

    gpus = 1 if args.device in (None, "cuda") and torch.cuda.is_available() else 0
    with Ray(args.ray or None, args.actors, gpus_per_actor=gpus) as ex:
        print(f"ray: {ex.n} actors", file=sys.stderr, flush=True)
        yield ex


def prompts(args) -> list[str] | None:
    """``--prompt`` (repeatable) and ``--prompts FILE`` together; None when neither is given."""
    from causalscan.data.prompts import read_prompts

    out = list(args.prompt or []) + (read_prompts(args.prompts) if args.prompts else [])
    return out or None


def dataset(args, prefer: str | None = None) -> Dataset:
    """``--data`` (or the dataset a zoo ``--model`` ships: ``prefer`` if it has one, else its first),
    every pair in the chat template with ``--chat``."""
    if args.data:
        path = args.data
    elif args.model in zoo.names():
        path = str(zoo.dataset_path(args.model, prefer if prefer in zoo.card(args.model)["datasets"] else None))
    else:
        raise InputError("--data is required unless --model is a zoo model", field="data")
    ds = Dataset.from_jsonl(path)
    return Dataset([{**r, "chat": True} for r in ds.records], ds.name, ds.lines) if args.chat else ds


def run_job(args, fn, prefer: str | None = None, **settings) -> dict:
    """The job of a method on a dataset of pairs: the dataset, the model, then the memory plan alone
    (``--dry-run``) or the method on the ``--ray`` executor (refused if its plan cannot fit
    ``--memory-gb``), its result saved in ``--out``, its notes on stderr and its lines on stdout."""
    ds = dataset(args, prefer)
    model = load(args)
    common = dict(
        metric=args.metric,
        samples=args.samples,
        noise_scale=args.noise_scale,
        seed=args.seed,
        memory_gb=args.memory_gb,
        **settings,
    )
    if args.dry_run:
        return plan_only(fn(model, ds, dry_run=True, **common))
    with executor(args) as ex:
        res = fn(model, ds, progress=bars(args), executor=ex, **common)
    return finish(res, args)


def plan_only(plan) -> dict:
    """``--dry-run``: the memory plan on stderr, and as the command's document."""
    print(plan, file=sys.stderr)
    return {"plan": plan.to_json()}


def finish(res, args, **save) -> dict:
    """A finished result: saved in ``--out`` (``save``: more of ``res.save``'s options), its notes and
    lines said; its document."""
    doc = res.to_json(top=args.top)
    if args.out:
        res.save(args.out, top=args.top, **save)
        doc["out"] = str(args.out)
    say(res, doc, args)
    return doc


def say(res, doc: dict, args, *lines_args) -> None:
    """A result's notes on stderr, and without ``--json`` its lines on stdout."""
    for line in res.notes(doc):
        print(line, file=sys.stderr)
    if not args.json:
        for line in res.lines(doc, *lines_args):
            print(line)
