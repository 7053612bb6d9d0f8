"""The attribution stage of a scan over a whole dataset: batches of rows of one token length, each
attributed by :func:`causalscan.patching.attribution.attribute` on an executor (this process or Ray
actors), summed per pair in batch order and checkpointed as they finish, so a run resumes and a Ray
run equals a local one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from causalscan.checkpoint import Checkpoint, run
from causalscan.data.inputs import Inputs
from causalscan.data.sweeps import Sweep
from causalscan.executor import get as executor_get
from causalscan.patching import attribution
from causalscan.progress import Progress


class Stage(NamedTuple):
    """What :func:`attribution_units` takes after the model (which an executor sends apart, once): the
    prepared inputs without their model, the sweeps and the method's settings."""

    inp: Inputs
    sweeps: list[Sweep]
    direction: str
    qk_fix: bool
    graddrop: bool
    batch_size: int
    ig_steps: int
    ig_path: str
    rules: str | None = None  # RelP's attention rule (None: the plain gradient)
    plain_sites: frozenset[str] = frozenset()  # with rules: sites scored by the plain backward (AtP)

    @classmethod
    def of(cls, inp: Inputs, *settings) -> Stage:
        """The stage of ``inp`` (its model dropped) with ``settings`` in field order after ``inp``."""
        return cls(replace(inp, model=None), *settings)


def estimate(
    model, stage: Stage, n_nodes: int, ck: Checkpoint | None = None, progress: Progress | None = None, executor=None
) -> dict:
    """The attribution stage of ``model`` on ``stage``: per-pair sums over each pair's rows, ``signed``
    (and ``graddrop``) ``[P, n]`` and the ``clean``/``corrupt`` metrics ``[P]``, one batch of
    ``batch_size`` rows (of one token length) at a time, on ``executor`` (:mod:`causalscan.executor`);
    resumed from and written to ``ck`` as it goes."""
    inp = stage.inp
    n_pairs, per_row = len(inp.pairs), 1.0 / inp.rows.samples
    sums = {"signed": torch.zeros(n_pairs, n_nodes), "clean": torch.zeros(n_pairs), "corrupt": torch.zeros(n_pairs)}
    if stage.graddrop:
        sums["graddrop"] = torch.zeros(n_pairs, n_nodes)

    def add(sums, part):
        for name in ("signed", "graddrop", "clean", "corrupt"):
            if name in sums:
                sums[name].index_add_(0, part["owner"], per_row * part[name])

    n = len(inp.rows.batches(stage.batch_size))
    return run(
        ck, sums, n, lambda todo: executor_get(executor).map(model, attribution_units, stage, todo), add, progress
    )


def attribution_units(
    model,
    inp: Inputs,
    sweeps: list[Sweep],
    direction: str,
    qk_fix: bool,
    graddrop: bool,
    batch_size: int,
    ig_steps: int,
    ig_path: str,
    rules: str | None = None,
    plain_sites: frozenset[str] = frozenset(),
):
    """``compute(i)``: attribution batch ``i`` of ``inp.rows.batches(batch_size)`` on ``model``, as the
    per-row ``signed`` (and ``graddrop``) ``[B, n]``, ``clean``/``corrupt`` metrics [B] and their
    pairs ``owner`` [B]."""
    inp = replace(inp, model=model)
    rows, noising, roles = inp.rows, direction == "noising", inp.dataset.roles
    batches = rows.batches(batch_size)
    embed = inp.model.hf.get_input_embeddings().weight

    def compute(i: int) -> dict:
        batch = batches[i]
        b = rows.batch(batch, noising, embed)

        def metric(logits, clean_logprobs):
            return inp.metric_fn(logits, b.labels, clean_logprobs)

        role_pos = torch.tensor([[rows.pairs[j].roles[r] for r in roles] for j in batch]) if roles else None
        out = attribution.attribute(
            inp.model.adapter,
            b.base,
            b.other,
            metric,
            sweeps,
            qk_fix=qk_fix,
            graddrop=graddrop,
            base_is_clean=noising,
            base_noise=b.base_noise,
            other_noise=b.other_noise,
            role_pos=role_pos,
            keep=rows.keep,
            ig_steps=ig_steps,
            ig_path=ig_path,
            rules=rules,
            plain_sites=plain_sites,
        )
        part = {
            name: torch.cat([out[name][sw.name].flatten(1) for sw in sweeps], 1).cpu()
            for name in (("signed", "graddrop") if graddrop else ("signed",))
        }
        clean_run, corrupt_run = (out["base"], out["other"]) if noising else (out["other"], out["base"])
        return {**part, "clean": clean_run.cpu(), "corrupt": corrupt_run.cpu(), "owner": rows.owner[batch]}

    return compute


def heaviest_batch(inp: Inputs, batch_size: int) -> int:
    """The attribution batch of most row-positions (the memory plan's unit)."""
    batches = inp.rows.batches(batch_size)
    return max(range(len(batches)), key=lambda i: len(batches[i]) * len(inp.rows.pairs[batches[i][0]].clean))
