"""The model zoo: small bundled models with planted, documented mechanisms.

Each model is a Hugging Face directory in ``zoo/models/NAME`` (config.json, model.safetensors,
tokenizer files, ``card.json``, datasets as ``<name>.jsonl``), produced by the recipe module
``causalscan.zoo.NAME``: ``train(out)`` is the recipe and ``check(model, card)`` re-verifies the
card's claims from scratch by means independent of a scan (attention scores, ablation, accuracy).
May import: base, model, data, patching.

>>> import causalscan
>>> from causalscan import zoo
>>> zoo.names()
['backdoor', 'facts', 'induction']
>>> model = causalscan.load("induction")      # the shipped weights
>>> zoo.check(model)                          # [] when every claim of the card holds
[]
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from causalscan.errors import InputError

MODELS_DIR = Path(__file__).parent / "models"
RECIPES = ("backdoor", "facts", "induction")


def names() -> list[str]:
    return sorted(RECIPES)


def _known(name: str) -> str:
    if name not in RECIPES:
        raise InputError(f"unknown zoo model {name!r}; zoo models: {', '.join(names())}", field="name")
    return name


def recipe(name: str):
    """The recipe module of ``name`` (``train``, ``check``, ``dataset``)."""
    return importlib.import_module(f"causalscan.zoo.{_known(name)}")


def path(name: str) -> Path:
    """Directory of the shipped model ``name``."""
    return MODELS_DIR / _known(name)


def card(name: str) -> dict:
    p = path(name) / "card.json"
    if not p.is_file():
        raise InputError(
            f"zoo model {name!r} is not built (no {p}); run `causalscan zoo train {name} --out DIR`", field="name"
        )
    return json.loads(p.read_text())


def dataset_path(name: str, dataset: str | None = None) -> Path:
    """A dataset shipped with ``name`` (default: the first in its card)."""
    ds = card(name)["datasets"]
    dataset = dataset or next(iter(ds))
    if dataset not in ds:
        raise InputError(f"zoo model {name!r} has no dataset {dataset!r}; datasets: {', '.join(ds)}", field="dataset")
    return path(name) / f"{dataset}.jsonl"


def train(name: str, out: str | Path, seed: int = 0, quiet: bool = False) -> Path:
    """Run ``name``'s recipe, writing a fresh model directory (with card and datasets) to ``out``."""
    return recipe(name).train(out, seed=seed, quiet=quiet)


def check(model, card_: dict | None = None) -> list[str]:
    """The claims of ``model``'s card that do not hold on ``model`` (re-measured from scratch).
    Attention scores need eager attention: the model is switched to it."""
    card_ = card_ or model.card
    if not card_:
        raise InputError("model has no zoo card", field="model")
    if model.hf.config._attn_implementation != "eager":
        model.hf.set_attn_implementation("eager")
    return recipe(card_["name"]).check(model, card_)


__all__ = ["MODELS_DIR", "card", "check", "dataset_path", "names", "path", "recipe", "train"]
