"""Per-architecture maps from sites to Hugging Face modules and shapes.

A site at a layer is read (and rewritten) at one module boundary of that layer's block:

    resid_pre   block input               [B, T, 1, d_model]
    resid_post  block output              [B, T, 1, d_model]
    resid_mid   resid_pre + attn_out      [B, T, 1, d_model]   (sequential blocks only)
    attn_out    attention's residual write [B, T, 1, d_model]
    mlp_out     MLP's residual write      [B, T, 1, d_model]
    head        input of the attention output projection, per head   [B, T, H, d_head]
    neuron      input of the MLP down projection                     [B, T, d_mlp, 1]
    q, k, v     projection outputs per head (k, v per key-value head) [B, T, H|H_kv, d_head]

Reading heads and neurons at projection inputs makes every ``attn_implementation`` work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from causalscan.errors import InputError

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head", "neuron", "q", "k", "v")
# with dictionaries attached (:mod:`causalscan.model.features`): their latents and error terms
FEATURE_SITES = ("feature", "feature_error")


@dataclass(frozen=True)
class Family:
    """Where each site lives in one architecture's block (paths relative to the block)."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # path from the CausalLM to the ModuleList of blocks
    head: str  # attention output projection; its input is the per-head output z
    attn_out: str  # module whose output is added to the residual by attention
    neuron: str  # MLP down projection; its input is the neuron activations
    mlp_out: str  # module whose output is added to the residual by the MLP
    qkv: tuple[str, ...]  # (q, k, v) modules, or one fused module
    qkv_layout: str = "split"  # split | gpt2 (q|k|v blocks) | neox ([H, 3, Dh]) | phi3 (q|k|v, GQA)
    # readers of the residual stream (circuits): the norm before attention, the norm before the MLP,
    # the module whose input is the normed MLP input, and the final norm (path from the CausalLM)
    readers: tuple[str, str, str] = ("input_layernorm", "post_attention_layernorm", "mlp")
    final_norm: str = "model.norm"
    # the MLP activation (relevance rules: the identity rule) and the gated MLP's two branches (the
    # half rule; one fused module for both, or none for an ungated MLP)
    act: str = "mlp.act_fn"
    gates: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")


_LLAMA = dict(
    layers="model.layers",
    head="self_attn.o_proj",
    attn_out="self_attn.o_proj",
    neuron="mlp.down_proj",
    mlp_out="mlp.down_proj",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
)
_GEMMA2 = dict(
    _LLAMA,
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    readers=("input_layernorm", "pre_feedforward_layernorm", "mlp"),
)

FAMILIES = (
    Family(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        "attn.c_proj",
        "attn.c_proj",
        "mlp.c_proj",
        "mlp.c_proj",
        ("attn.c_attn",),
        "gpt2",
        ("ln_1", "ln_2", "mlp"),
        "transformer.ln_f",
        act="mlp.act",
        gates=(),
    ),
    Family(
        "gpt_neox",
        ("gpt_neox",),
        "gpt_neox.layers",
        "attention.dense",
        "attention.dense",
        "mlp.dense_4h_to_h",
        "mlp.dense_4h_to_h",
        ("attention.query_key_value",),
        "neox",
        final_norm="gpt_neox.final_layer_norm",
        act="mlp.act",
        gates=(),
    ),
    Family("llama", ("llama",), **_LLAMA),
    Family("mistral", ("mistral",), **_LLAMA),
    Family("qwen2", ("qwen2",), **_LLAMA),
    Family("qwen3", ("qwen3",), **_LLAMA),
    Family("gemma", ("gemma",), **_LLAMA),
    Family("gemma2", ("gemma2",), **_GEMMA2),
    Family("gemma3", ("gemma3_text",), **_GEMMA2),
    Family(
        "phi",
        ("phi",),
        "model.layers",
        "self_attn.dense",
        "self_attn.dense",
        "mlp.fc2",
        "mlp.fc2",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        readers=("input_layernorm", "input_layernorm", "mlp"),
        final_norm="model.final_layernorm",
        act="mlp.activation_fn",
        gates=(),
    ),
    Family(
        "phi3",
        ("phi3",),
        "model.layers",
        "self_attn.o_proj",
        "self_attn.o_proj",
        "mlp.down_proj",
        "mlp.down_proj",
        ("self_attn.qkv_proj",),
        "phi3",
        act="mlp.activation_fn",
        gates=("mlp.gate_up_proj",),
    ),
    Family(
        "opt",
        ("opt",),
        "model.decoder.layers",
        "self_attn.out_proj",
        "self_attn.out_proj",
        "fc2",
        "fc2",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        readers=("self_attn_layer_norm", "final_layer_norm", "fc1"),
        final_norm="model.decoder.final_layer_norm",
        act="activation_fn",
        gates=(),
    ),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported() -> list[str]:
    """HF ``model_type`` values with an adapter."""
    return sorted(_BY_TYPE)


def _in_features(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.in_features
    return m.weight.shape[0]  # transformers' Conv1D stores [in, out]


def _out_features(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    return m.weight.shape[1]


class Adapter:
    """Sites of one loaded model: modules, shapes, and views of raw module tensors.

    >>> from causalscan.model.load import load
    >>> ad = Adapter(load("random:llama-tiny").hf)      # any supported HF *ForCausalLM
    >>> ad.shape("head"), ad.shape("k"), ad.shape("neuron")   # (components, dim) per site
    ((4, 16), (2, 16), (128, 1))
    """

    def __init__(self, model: nn.Module):
        mt = getattr(model.config, "model_type", None)
        if mt not in _BY_TYPE:
            raise InputError(f"unsupported architecture {mt!r}; supported model types: {', '.join(supported())}")
        self.model = model
        self.family = _BY_TYPE[mt]
        self.config = model.config
        self.blocks: nn.ModuleList = model.get_submodule(self.family.layers)
        self.n_layers = len(self.blocks)
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.d_model = cfg.hidden_size
        block = self.blocks[0]
        self.d_head = _in_features(block.get_submodule(self.family.head)) // self.n_heads
        self.d_mlp = _in_features(block.get_submodule(self.family.neuron))
        if self.family.qkv_layout == "split":
            kv_width = _out_features(block.get_submodule(self.family.qkv[1]))
        elif self.family.qkv_layout == "phi3":
            kv_width = (_out_features(block.get_submodule(self.family.qkv[0])) - self.n_heads * self.d_head) // 2
        else:
            kv_width = self.n_heads * self.d_head
        self.n_kv_heads = kv_width // self.d_head
        self.parallel = bool(getattr(cfg, "use_parallel_residual", mt == "phi"))
        self.post_ln = mt == "opt" and not getattr(cfg, "do_layer_norm_before", True)
        self.dictionaries: dict = {}  # layer -> causalscan.model.dictionary.Dictionary

    def __repr__(self) -> str:
        return (
            f"Adapter({self.family.name}: layers={self.n_layers}, d_model={self.d_model}, heads={self.n_heads}"
            f"/{self.n_kv_heads}kv x {self.d_head}, d_mlp={self.d_mlp})"
        )

    # shapes ---------------------------------------------------------------------------------
    def shape(self, site: str) -> tuple[int, int]:
        """``(components, dims)`` of a site: its view is ``[B, T, C, D]``."""
        self.check_site(site)
        if site in FEATURE_SITES:
            d = next(iter(self.dictionaries.values()))  # one d_sae per run (features.sites.attach)
            return (d.d_sae, 1) if site == "feature" else (1, d.d_out)
        if site == "head" or site == "q":
            return self.n_heads, self.d_head
        if site in ("k", "v"):
            return self.n_kv_heads, self.d_head
        if site == "neuron":
            return self.d_mlp, 1
        return 1, self.d_model

    def layers(self, site: str) -> list[int]:
        """The layers ``site`` exists at: every layer, or for a feature site those with a dictionary."""
        self.check_site(site)
        return sorted(self.dictionaries) if site in FEATURE_SITES else list(range(self.n_layers))

    def check_site(self, site: str, layer: int | None = None) -> None:
        if site in FEATURE_SITES:
            if not self.dictionaries:
                raise InputError(f"site {site!r} needs a dictionary: --sae DIR (sae= in Python)", field="site")
            if layer is not None and layer not in self.dictionaries:
                raise InputError(
                    f"no dictionary at layer {layer}; dictionaries at layers {sorted(self.dictionaries)}", field="layer"
                )
            return
        if site not in SITES:
            raise InputError(f"unknown site {site!r}; sites: {', '.join(SITES + FEATURE_SITES)}", field="site")
        if site == "resid_mid" and (self.parallel or self.post_ln):
            raise InputError(
                f"{self.family.name} blocks have no resid_mid (parallel or post-LN residual)", field="site"
            )
        if layer is not None and not 0 <= layer < self.n_layers:
            raise InputError(f"layer {layer} out of range [0, {self.n_layers})", field="layer")

    # module boundaries ----------------------------------------------------------------------
    def hook_point(self, site: str, layer: int) -> tuple[nn.Module, str]:
        """``(module, "in" | "out")`` where ``site`` is read at ``layer`` (not resid_mid)."""
        self.check_site(site, layer)
        block, f = self.blocks[layer], self.family
        if site == "resid_pre":
            return block, "in"
        if site == "resid_post":
            return block, "out"
        if site == "head":
            return block.get_submodule(f.head), "in"
        if site == "neuron":
            return block.get_submodule(f.neuron), "in"
        if site == "attn_out":
            return block.get_submodule(f.attn_out), "out"
        if site == "mlp_out":
            return block.get_submodule(f.mlp_out), "out"
        if site in ("q", "k", "v"):
            name = f.qkv["qkv".index(site)] if f.qkv_layout == "split" else f.qkv[0]
            return block.get_submodule(name), "out"
        raise InputError(f"site {site!r} has no single hook point", field="site")

    def view(self, raw: torch.Tensor, site: str, batch: int, seq: int) -> torch.Tensor:
        """A view ``[B, T, C, D]`` of the raw module tensor (``[B, T, W]`` or ``[B*T, W]``)."""
        raw = raw.view(batch, seq, raw.shape[-1])
        c, d = self.shape(site)
        layout = self.family.qkv_layout
        if site in ("q", "k", "v") and layout != "split":
            i = "qkv".index(site)
            if layout == "neox":
                return raw.unflatten(-1, (self.n_heads, 3 * self.d_head))[..., i * self.d_head : (i + 1) * self.d_head]
            qw, kw = self.n_heads * self.d_head, self.n_kv_heads * self.d_head
            start = (0, qw, qw + kw)[i]
            raw = raw[..., start : start + (qw if i == 0 else kw)]
        return raw.unflatten(-1, (c, d))

    def weight(self, site: str, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A q/k/v projection's weight ``[d_model, C, D]`` and bias ``[C, D]`` (or None) per component,
        so that component ``c`` of the site is ``x @ W[:, c] + b[c]``; for ``head``, the output
        projection's ``[C, D, d_model]``: head ``c`` writes ``z_c @ W[c]`` (its bias is shared)."""
        module, _ = self.hook_point(site, layer)
        w = module.weight if not isinstance(module, nn.Linear) else module.weight.T  # [in, out]
        if site == "head":
            return w.unflatten(0, self.shape("head")), None
        b = None if module.bias is None else self.view(module.bias[None], site, 1, 1)[0, 0]
        return self.view(w, site, 1, w.shape[0])[0], b

    def write(self, raw: torch.Tensor, site: str, batch: int, seq: int, new: torch.Tensor) -> torch.Tensor:
        """The raw module tensor with the site's view replaced by ``new`` [B, T, C, D]."""
        if site in ("q", "k", "v") and self.family.qkv_layout != "split":
            out = raw.clone()
            self.view(out, site, batch, seq).copy_(new)
            return out
        return new.reshape(raw.shape)
