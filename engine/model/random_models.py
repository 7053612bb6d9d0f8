"""Seeded models with random weights for every family, built from a config: nothing is downloaded.

``random:<family>[-<size>]`` (:func:`causalscan.load`) builds one from :func:`random_config` at a
size of ``SIZES`` (``tiny`` to ``1b``, and the shapes of SmolLM2-135M and Llama-2-7B for benchmarks),
with a word-level tokenizer.

>>> random_config("llama", "tiny").num_key_value_heads
2
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

from causalscan.errors import InputError
from causalscan.model.adapters import FAMILIES

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
