"""Load a model for causalscan: a local HF directory, a GGUF file (or a directory holding one), a built
HF model, a zoo name, or ``random:``.

A GGUF file is dequantised by ``transformers``' own GGUF loader to the requested dtype (it needs
the ``gguf`` and ``accelerate`` packages: ``pip install 'causalscan[gguf]'``), its tokenizer
rebuilt from the file's vocabulary.

``random:<family>[-<size>]`` builds a seeded model with random weights from a config of ``SIZES``
(``tiny`` to ``1b``, and the shapes of SmolLM2-135M and Llama-2-7B for benchmarks) and a word-level
tokenizer; nothing is downloaded.
Every load checks the adapter: a run with taps at every site must give the model's own logits,
and the residual decomposition ``resid_pre + attn_out + mlp_out = resid_post`` must hold.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn

from causalscan import runner
from causalscan.adapters import FAMILIES, SITES, Adapter
from causalscan.errors import InputError
from causalscan.vocab import word_tokenizer

ZOO_DIR = Path(__file__).parent / "zoo" / "models"

# (layers, d_model, heads, kv_heads, d_mlp, vocab)
SIZES = {
    "tiny": (2, 64, 4, 2, 128, 512),
    "small": (4, 256, 8, 4, 1024, 2048),
    "medium": (8, 512, 8, 4, 2048, 4096),
    "1b": (16, 2048, 32, 8, 8192, 32000),
    "135m": (30, 576, 9, 3, 1536, 49152),  # SmolLM2-135M, the real tier's shape (tied embeddings)
    "7b": (32, 4096, 32, 32, 11008, 32000),  # Llama-2-7B's shape
}
TIED = {"135m"}  # sizes whose unembedding is the embedding
RANDOM_FAMILIES = tuple(f.name for f in FAMILIES)


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


def random_config(family: str, size: str = "tiny") -> transformers.PretrainedConfig:
    """A small config of ``family`` (see ``RANDOM_FAMILIES``) at ``size`` (see ``SIZES``)."""
    if family not in RANDOM_FAMILIES:
        raise InputError(f"unknown random family {family!r}; families: {', '.join(RANDOM_FAMILIES)}", field="model")
    if size not in SIZES:
        raise InputError(f"unknown random size {size!r}; sizes: {', '.join(SIZES)}", field="model")
    n_layers, d, h, kv, d_mlp, vocab = SIZES[size]
    std = 0.1 if size == "tiny" else 0.02
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)  # vocab.SPECIALS
    common = dict(
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=n_layers,
        num_attention_heads=h,
        intermediate_size=d_mlp,
        max_position_embeddings=512,
        initializer_range=std,
        **ids,
        **({"tie_word_embeddings": True} if size in TIED else {}),
    )
    gqa = dict(common, num_key_value_heads=kv)
    t = transformers
    if family == "gpt2":
        return t.GPT2Config(
            vocab_size=vocab,
            n_embd=d,
            n_layer=n_layers,
            n_head=h,
            n_inner=d_mlp,
            n_positions=512,
            initializer_range=std,
            **ids,
        )
    if family == "gpt_neox":
        return t.GPTNeoXConfig(**common, rotary_pct=0.25, use_parallel_residual=True)
    if family == "llama":
        return t.LlamaConfig(**gqa)
    if family == "mistral":
        return t.MistralConfig(**gqa, sliding_window=256)
    if family == "qwen2":
        return t.Qwen2Config(**gqa)
    if family == "qwen3":
        return t.Qwen3Config(**gqa, head_dim=d // h)
    if family == "gemma":  # explicit head_dim, not d_model / heads
        return t.GemmaConfig(**gqa, head_dim=2 * d // h)
    if family == "gemma2":
        return t.Gemma2Config(**gqa, head_dim=2 * d // h, query_pre_attn_scalar=2 * d // h, sliding_window=256)
    if family == "gemma3":
        return t.Gemma3TextConfig(**gqa, head_dim=2 * d // h, query_pre_attn_scalar=2 * d // h, sliding_window=256)
    if family == "phi":
        return t.PhiConfig(**common, partial_rotary_factor=0.5)
    if family == "phi3":
        return t.Phi3Config(**gqa)
    return t.OPTConfig(
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=n_layers,
        num_attention_heads=h,
        ffn_dim=d_mlp,
        word_embed_proj_dim=d,
        max_position_embeddings=512,
        init_std=std,
        **ids,
    )


def random_model(
    family: str,
    size: str = "tiny",
    seed: int = 0,
    dtype=torch.float32,
    attn_implementation: str | None = None,
    device: str = "cpu",
) -> nn.Module:
    """A seeded HF CausalLM with random weights (``attn_implementation``: HF's default if None).

    Drawn on the CPU, so every device gets the same weights; ``device="cuda"`` draws them there
    (other numbers) for shapes too large to build on the CPU first."""
    config = random_config(family, size)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


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
) -> Model:
    """Load ``spec``: a :class:`Model`, an HF CausalLM, a local HF directory, a ``.gguf`` file (or a
    directory holding one), a zoo name, or ``random:<family>[-<size>]``.

    ``device_map`` splits the model across devices instead of ``device``: ``auto`` (fill each GPU in
    turn, then the CPU), ``balanced`` (the same share of blocks on every GPU), a JSON file or a dict
    ``{module name: device}`` (:func:`split`).

    >>> m = load("random:llama-tiny")
    >>> m.adapter.n_layers
    2
    """
    if isinstance(spec, Model):
        return spec
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
    return model


def split(hf: nn.Module, device_map: str | dict | os.PathLike) -> nn.Module:
    """``hf`` dispatched across devices by accelerate: every module's inputs follow it to its device,
    the logits come back to the input's device.

    ``device_map``: ``auto`` or ``balanced`` (accelerate's planners over the free memory of every GPU
    and the CPU, a block never cut), a dict ``{module name: "cpu" | "cuda:N" | N}`` covering every
    weight, or the path of a JSON file holding one. Disk offload is refused (weights that are not
    in memory would be read on every forward). A module mapped to ``cpu`` computes on the CPU (not
    accelerate's CPU offload, which would copy its weights to the GPU on every forward)."""
    try:
        import accelerate
    except ImportError as e:
        raise InputError("device_map needs accelerate: pip install accelerate", field="device_map") from e
    src = None
    if isinstance(device_map, str | os.PathLike) and str(device_map) not in ("auto", "balanced"):
        src = str(device_map)
        if not Path(src).is_file():
            raise InputError("not auto, balanced or a JSON file", file=src, field="device_map")
        try:
            device_map = json.loads(Path(src).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"invalid JSON ({e})", file=src, field="device_map") from None
    if device_map in ("auto", "balanced"):
        no_split = getattr(hf, "_no_split_modules", None) or []
        memory = (
            accelerate.utils.get_balanced_memory(hf, no_split_module_classes=no_split)
            if device_map == "balanced"
            else None
        )
        device_map = accelerate.infer_auto_device_map(hf, max_memory=memory, no_split_module_classes=no_split)
    if not isinstance(device_map, dict) or not device_map:
        raise InputError("a device map is a JSON object {module name: device}", file=src, field="device_map")
    device_map = {name: f"cuda:{dev}" if isinstance(dev, int) else str(dev) for name, dev in device_map.items()}
    names = {n for n, _ in hf.named_modules()}
    for name, dev in device_map.items():
        where = f"device_map[{name!r}]"
        if name not in names:
            raise InputError(
                f"{where}: the model has no module of that name (e.g. {sorted(names - {''})[:3]})",
                file=src,
                field="device_map",
            )
        if dev in ("disk", "meta"):
            raise InputError(
                f"{where}: {dev!r}: causalscan keeps every weight in memory (cpu or cuda:N)",
                file=src,
                field="device_map",
            )
        check_device(dev)
    # a module mapped to the CPU computes there (accelerate's default would stream its weights to the GPU)
    main = "cpu" if "cpu" in device_map.values() else None
    quiet = logging.getLogger("accelerate.big_modeling")  # it warns of meta weights it does not make here
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return accelerate.dispatch_model(hf, device_map, main_device=main, force_hooks=True)
    except ValueError as e:  # accelerate's message names the weights the map misses
        raise InputError(str(e).splitlines()[0][:300], file=src, field="device_map") from None
    finally:
        quiet.setLevel(level)


def check_dtype(dtype) -> torch.dtype | None:
    """A floating torch dtype, from itself or its name (``"bfloat16"``); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    found = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise InputError(f"must be a floating torch dtype (float32, bfloat16, float16), not {dtype!r}", field="dtype")
    return found


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


def check_device(device) -> torch.device | None:
    """``device`` as a torch device this machine has, before any weight is loaded; else :class:`InputError`."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"not a torch device: {device!r} (cpu, cuda, cuda:N)", field="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{device!r}: this machine has no CUDA device; use cpu", field="device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)", field="device")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"{device!r}: causalscan runs on cpu or cuda", field="device")
    return dev


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
