"""The training loop and directory writer shared by every zoo recipe.

A recipe gives a model, a batch sampler ``sample(gen, batch) -> (ids [B, T], loss_mask [B, T-1])``
(the mask selects which next-token predictions are trained) and hyper-parameters; ``fit`` trains
it deterministically on CPU and ``save`` writes a normal Hugging Face directory with a card.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

Sampler = Callable[[torch.Generator, int], tuple[torch.Tensor, torch.Tensor]]


def masked_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over ``mask`` [B, T-1]; ``logits`` [B, T, V], ``ids`` [B, T]."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    mask = mask.flatten().to(nll.dtype)
    return (nll * mask).sum() / mask.sum().clamp_min(1)


def fit(
    model: nn.Module,
    sample: Sampler,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    warmup: int = 100,
    weight_decay: float = 0.01,
    log_every: int = 200,
    quiet: bool = False,
) -> dict:
    """Train ``model`` in place with AdamW, linear warm-up and cosine decay to 10% of ``lr``.

    Returns the recipe facts recorded in the card (steps, batch, lr, seed, final loss, seconds).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    )
    model.train()
    start, avg = time.perf_counter(), None
    for step in range(steps):
        ids, mask = sample(gen, batch)
        loss = masked_loss(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if not quiet and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {avg:.4f}  {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    model.eval()
    return {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "optimizer": "AdamW(0.9, 0.98), cosine to 10%, grad clip 1.0",
        "final_loss": round(avg, 4),
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
    }


def train_new(
    cls: type[nn.Module],
    config,
    sample: Sampler,
    tokenizer,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    quiet: bool = False,
):
    """A seeded fresh ``cls(config)`` trained by :func:`fit`: returns ``(Model, recipe facts)``."""
    from causalscan.model.load import load

    torch.manual_seed(seed)
    hf = cls(config)
    recipe = fit(hf, sample, steps=steps, batch=batch, lr=lr, seed=seed, quiet=quiet)
    return load(hf, tokenizer=tokenizer), recipe


def save(out: str | Path, model: nn.Module, tokenizer, card: dict, datasets: dict[str, list[dict]]) -> Path:
    """Write ``model`` (safetensors), ``tokenizer``, ``card.json`` and ``<name>.jsonl`` datasets to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name, records in datasets.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def without_replacement(gen: torch.Generator, rows: int, n: int, low: int, high: int) -> torch.Tensor:
    """``rows`` draws of ``n`` distinct ids from ``[low, high)``: [rows, n]."""
    return torch.rand(rows, high - low, generator=gen).argsort(dim=1)[:, :n] + low
