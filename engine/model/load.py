"""Load a model for causalscan: a local HF directory or a GGUF file (or a directory holding one;
:mod:`causalscan.model.weights`), a built HF model, a zoo name, or ``random:<family>[-<size>]``
(:mod:`causalscan.model.random_models`), on one device or split across several
(:mod:`causalscan.model.devices`).

Every load checks the adapter: a run with taps at every site must give the model's own logits,
and the residual decomposition ``resid_pre + attn_out + mlp_out = resid_post`` must hold.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from causalscan.errors import InputError
from causalscan.model import runner
from causalscan.model.adapters import SITES, Adapter
from causalscan.model.devices import check_device, split
from causalscan.model.random_models import RANDOM_FAMILIES, random_model
from causalscan.model.vocab import word_tokenizer
from causalscan.model.weights import gguf_file, load_directory, load_gguf, load_tokenizer

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo" / "models"  # the zoo's shipped model directories


@dataclass
class Model:
    """A loaded model: the HF module, its adapter and tokenizer."""

    hf: nn.Module
    adapter: Adapter
    tokenizer: object | None
    name: str
    card: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device (the first block's, on a split model)."""
        return self.hf.get_input_embeddings().weight.device

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's position table (or its configured context) covers, if it says."""
        cfg = self.hf.config
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def check_length(
        self, n_tokens: int, file: str | None = None, line: int | None = None, field: str = "clean"
    ) -> None:
        """:class:`InputError` if ``n_tokens`` positions run past :attr:`max_positions`."""
        limit = self.max_positions
        if limit is not None and n_tokens > limit:
            raise InputError(
                f"{n_tokens} tokens run past the model's {limit} positions", file=file, line=line, field=field
            )

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding (token ids must lie below)."""
        return self.hf.get_input_embeddings().weight.shape[0]

    def __repr__(self) -> str:
        return f"Model({self.name!r}, {self.adapter!r})"


def load(
    spec,
    *,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | os.PathLike | None = None,
    attn_implementation: str | None = None,
    seed: int = 0,
    check: bool = True,
    trust_remote_code: bool = False,
    sae=None,
) -> Model:
    """Load ``spec``: a :class:`Model`, an HF CausalLM, a local HF directory, a ``.gguf`` file (or a
    directory holding one), a zoo name, or ``random:<family>[-<size>]``.

    ``device_map`` splits the model across devices instead of ``device``: ``auto`` (fill each GPU in
    turn, then the CPU), ``balanced`` (the same share of blocks on every GPU), a JSON file or a dict
    ``{module name: device}`` (:func:`causalscan.model.devices.split`).
    ``sae``: dictionary folders in SAELens's format (or :class:`causalscan.model.dictionary.Dictionary`
    objects) attached to the model, for the sites ``feature`` and ``feature_error``
    (:func:`causalscan.model.features.attach`; on a :class:`Model` given, attached to it).

    >>> m = load("random:llama-tiny")
    >>> m.adapter.n_layers
    2
    """
    if isinstance(spec, Model):
        return _with_sae(spec, sae)
    if device is not None and device_map is not None:
        raise InputError("give device or device_map, not both", field="device_map")
    device = check_device(device)
    dtype = check_dtype(dtype)
    card: dict = {}
    if not isinstance(spec, nn.Module | str | os.PathLike):
        raise InputError(f"must be a Model, an HF module, a path or a name, not {type(spec).__name__}", field="model")
    if isinstance(spec, nn.Module):
        hf, name = spec.eval(), type(spec).__name__
    elif isinstance(spec, str | os.PathLike) and str(spec).startswith("random:"):
        family, _, size = str(spec)[len("random:") :].partition("-")
        hf = random_model(family, size or "tiny", seed, dtype or torch.float32, attn_implementation)
        tokenizer = tokenizer or word_tokenizer()
        name = str(spec)
    elif (gguf := gguf_file(Path(spec))) is not None:
        hf, gguf_tokenizer = load_gguf(gguf, dtype or torch.float32, attn_implementation)
        tokenizer = tokenizer or gguf_tokenizer
        name = gguf.stem
    else:
        path = Path(spec)
        if not path.is_dir() and (ZOO_DIR / str(spec)).is_dir():
            path = ZOO_DIR / str(spec)
        if not path.is_dir():
            zoo = sorted(p.name for p in ZOO_DIR.iterdir() if p.is_dir()) if ZOO_DIR.is_dir() else []
            raise InputError(
                f"no model directory, zoo model or random: spec named {str(spec)!r}; "
                f"zoo models: {', '.join(zoo) or '(none)'}; random families: "
                f"{', '.join(RANDOM_FAMILIES)}",
                field="model",
            )
        hf = load_directory(path, dtype or torch.float32, attn_implementation, trust_remote_code)
        if tokenizer is None and any(path.glob("tokenizer*.json")):
            tokenizer = load_tokenizer(path, trust_remote_code)
        if (path / "card.json").is_file():
            card = json.loads((path / "card.json").read_text())
        name = path.name
    if device is not None:
        hf = hf.to(device)
    if device_map is not None:
        hf = split(hf, device_map)
    model = Model(hf, Adapter(hf), tokenizer, name, card)
    if check:
        check_adapter(model)
    return _with_sae(model, sae)


def _with_sae(model: Model, sae) -> Model:
    if sae is None or sae == []:
        return model
    from causalscan.model.features import attach

    return attach(model, sae)


def check_dtype(dtype) -> torch.dtype | None:
    """A floating torch dtype, from itself or its name (``"bfloat16"``); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    found = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise InputError(f"must be a floating torch dtype (float32, bfloat16, float16), not {dtype!r}", field="dtype")
    return found


@torch.no_grad()
def check_adapter(model: Model, seq: int = 7) -> None:
    """Raise if taps change the logits or the captured sites do not decompose the residual."""
    ad, hf = model.adapter, model.hf
    gen = torch.Generator().manual_seed(0)
    vocab = hf.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, seq), generator=gen).to(model.device)
    ref = hf(input_ids=ids, logits_to_keep=0).logits
    store: dict = {}
    sites = [s for s in SITES if not (s == "resid_mid" and (ad.parallel or ad.post_ln))]
    taps = [runner.capture(ad, s, layer, store) for layer in range(ad.n_layers) for s in sites]
    taps += [(s, layer, lambda x: x.clone()) for layer in range(ad.n_layers) for s in sites]
    got = runner.forward(ad, ids, taps, logits_to_keep=0)
    rel = 1e-4 if ref.dtype == torch.float32 else 2e-2
    err = (got - ref).abs().max().item()
    if err > rel * max(ref.abs().max().item(), 1.0):
        raise RuntimeError(f"adapter check failed for {ad.family.name}: taps changed logits by {err:.3g}")
    if ad.post_ln:
        return
    for layer in range(ad.n_layers):
        pre, post = store[("resid_pre", layer)], store[("resid_post", layer)]
        rebuilt = pre + store[("attn_out", layer)] + store[("mlp_out", layer)]
        res = (rebuilt - post).abs().max().item()
        if res > rel * post.abs().max().item() + 1e-5:
            raise RuntimeError(
                f"adapter check failed for {ad.family.name}: resid_pre + attn_out + mlp_out "
                f"!= resid_post at layer {layer} (max error {res:.3g})"
            )
        if layer + 1 < ad.n_layers and not torch.equal(post, store[("resid_pre", layer + 1)]):
            raise RuntimeError(
                f"adapter check failed for {ad.family.name}: resid_post[{layer}] != resid_pre[{layer + 1}]"
            )
