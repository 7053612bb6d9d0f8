"""Weights and tokenizers from disk: a Hugging Face directory (safetensors only: a pickle is never
opened; every weight present, used, shaped as the config says and finite; custom code only with
``trust_remote_code``) or a GGUF file, dequantised by ``transformers``' own GGUF loader (the
``gguf`` and ``accelerate`` packages: ``pip install 'causalscan[gguf]'``), its tokenizer rebuilt
from the file's vocabulary. Every error is an :class:`~causalscan.errors.InputError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from torch import nn

from causalscan.errors import InputError

PICKLE = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def load_directory(
    path: Path, dtype: torch.dtype, attn_implementation: str | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """A Hugging Face directory's CausalLM from safetensors only, every weight present and used and
    finite; anything else is an :class:`InputError` naming the file."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise InputError("not a Hugging Face model directory (no config.json)", file=str(path))
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"invalid config.json ({e})", file=str(cfg_file)) from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise InputError("config.json names no model_type", file=str(cfg_file), field="model_type")
    if "auto_map" in cfg and not trust_remote_code:
        raise InputError(
            "the model's architecture is custom code shipped with the checkpoint; causalscan runs it "
            "only with trust_remote_code=True",
            file=str(cfg_file),
            field="auto_map",
        )
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLE for p in path.glob(pattern))
        hint = (
            (
                f"only pickled weights ({', '.join(pickled)}), which causalscan never unpickles; convert them to "
                "safetensors where you trust the file (transformers: model.save_pretrained(dir, "
                "safe_serialization=True))"
            )
            if pickled
            else "no *.safetensors weights"
        )
        raise InputError(hint, file=str(path))
    kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # unsupported type, bad safetensors, shape mismatch: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"cannot load this model ({type(e).__name__}: {first[:300]})", file=str(path)) from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            raise InputError(
                f"{len(keys)} {kind.replace('_', ' ')} in the weights, e.g. {', '.join(keys[:3])}: "
                "the checkpoint does not match config.json",
                file=str(path),
            )
    for name, param in hf.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise InputError(f"weight {name} holds NaN or infinite values", file=str(path))
    return hf.eval()


def gguf_file(path: Path) -> Path | None:
    """The GGUF file ``path`` names, or the one a directory without ``config.json`` holds; None if neither."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise InputError(
            f"holds {len(found)} GGUF files ({', '.join(f.name for f in found)}): name one", file=str(path)
        )
    return found[0] if found else None


def load_gguf(file: Path, dtype: torch.dtype, attn_implementation: str | None = None) -> tuple[nn.Module, object]:
    """The model and tokenizer of a GGUF file, dequantised to ``dtype`` by ``transformers``."""
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as e:
        raise InputError(
            f"loading a GGUF file needs the gguf extra: pip install 'causalscan[gguf]' ({e.name} is missing)",
            file=str(file),
        ) from None
    kwargs = dict(gguf_file=file.name, dtype=dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(file.parent, **kwargs).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except Exception as e:  # transformers and gguf raise many types for a bad file
        raise InputError(
            f"cannot load this GGUF file: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=str(file)
        ) from None
    return hf, tokenizer


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer saved in ``path``. A plain ``tokenizers`` pipeline (ours, the zoo's) loads as
    saved; ``AutoTokenizer`` would rebuild it as the model family's own tokenizer class."""
    cfg_file = path / "tokenizer_config.json"
    cls = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast") and (path / "tokenizer.json").is_file():
        return transformers.PreTrainedTokenizerFast.from_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
