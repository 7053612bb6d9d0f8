"""The graph of a model for circuits: the upstream nodes that write the residual stream, the
readers that read it, and the edges between them.

Upstream nodes, in this order: ``embed`` (the residual entering block 0: token and position
embeddings), then per layer each head's write ``z_h @ W_O[h]`` (``L3.H5``), the MLP's output
(``L3.MLP``) and, with feature nodes, the chosen latents of the layer's transcoder (``L3.F12``:
``f_12 W_dec[12]``; the MLP node is then the rest, the MLP's output minus those writes). Readers,
per layer: each head's query input (``L3.H5.q``), each key-value head's key and value inputs
(``L3.KV1.k``: under GQA a key/value head's readers are its query group, scored once), the MLP's
input (``L3.MLP.in``; with feature nodes, the rest's), each chosen latent's input (``L3.F12.in``,
through the transcoder's encoder), and last the ``logits``. A reader's *input* is the residual
before its layer norm; the edge ``u -> r`` is the part of it that ``u`` wrote. Each reader sees a
prefix of the upstream nodes: everything written before its layer, and in sequential blocks the
MLP and the latents also see their own layer's heads.

>>> import causalscan as cs
>>> g = Graph(cs.load("random:llama-tiny").adapter)     # 2 layers, 4 heads, 2 key-value heads
>>> g.n_up, g.n_read, int(g.valid().sum())
(11, 19, 82)
>>> g.edge_name(g.head(0, 1), g.reader("k", 1, 0))
'L0.H1 -> L1.KV0.k'
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from causalscan.errors import InputError
from causalscan.model import runner
from causalscan.model.adapters import Adapter
from causalscan.model.runner import hidden_in, with_hidden_in

QKV = ("q", "k", "v")


class Graph:
    """Node and reader numbering of one model (``ad``), the modules that read, and the valid edges.
    ``latents``: per layer with a transcoder, the latents that are nodes of their own."""

    def __init__(self, ad: Adapter, latents: dict[int, list[int]] | None = None):
        if ad.family.name in ("gemma2", "gemma3"):
            raise InputError(
                f"{ad.family.name} normalises the sum of its heads before the residual write, so a "
                "head's write is not its own: circuits need per-head writes",
                field="model",
            )
        if ad.post_ln:
            raise InputError("post-LN blocks have no reader inputs before a layer norm", field="model")
        self.ad = ad
        self.latents = {layer: sorted(js) for layer, js in sorted((latents or {}).items()) if js}
        for layer, js in self.latents.items():
            d = ad.dictionaries.get(layer)
            if d is None or not d.transcoder:
                raise InputError(f"latent nodes at layer {layer} need a transcoder there", field="sae")
            if not all(0 <= j < d.d_sae for j in js):
                raise InputError(f"latents at layer {layer} out of range [0, {d.d_sae})", field="latents")
        h, kv = ad.n_heads, ad.n_kv_heads
        n_lat = [len(self.latents.get(layer, ())) for layer in range(ad.n_layers)]
        self.offset = {"q": 0, "k": h, "v": h + kv, "mlp": h + 2 * kv, "latent": h + 2 * kv + 1}
        self.first = [1]  # first upstream node of each layer (and one past the last)
        self.rfirst = [0]  # first reader of each layer (the last entry: the logits)
        prefix = []
        for layer in range(ad.n_layers):
            before = self.first[-1]
            prefix += [before] * (h + 2 * kv) + [before if ad.parallel else before + h] * (1 + n_lat[layer])
            self.first.append(before + h + 1 + n_lat[layer])
            self.rfirst.append(self.rfirst[-1] + h + 2 * kv + 1 + n_lat[layer])
        self.n_up = self.first[-1]
        self.n_read = self.rfirst[-1] + 1
        self.per_layer = max(b - a for a, b in zip(self.rfirst, self.rfirst[1:], strict=False))  # readers, at most
        self.prefix = torch.tensor(prefix + [self.n_up])  # [n_read]: upstream nodes each reader sees

    # numbering --------------------------------------------------------------------------------
    def head(self, layer: int, h: int) -> int:
        return self.first[layer] + h

    def mlp(self, layer: int) -> int:
        return self.first[layer] + self.ad.n_heads

    def latent(self, layer: int, k: int) -> int:
        """Upstream id of the ``k``-th latent node of ``layer`` (latent ``self.latents[layer][k]``)."""
        return self.first[layer] + self.ad.n_heads + 1 + k

    def reader(self, kind: str, layer: int = 0, index: int = 0) -> int:
        """Reader id of ``kind`` (q, k, v, mlp, latent: the ``index``-th latent node, logits) at
        ``layer``, component ``index``."""
        if kind == "logits":
            return self.n_read - 1
        return self.rfirst[layer] + self.offset[kind] + index

    def reader_layer(self, r: int) -> int:
        """The block reader ``r`` reads at (the logits: the last)."""
        return min(int(torch.searchsorted(torch.tensor(self.rfirst), r, right=True)) - 1, self.ad.n_layers - 1)

    def valid(self) -> torch.Tensor:
        """``[n_up, n_read]`` bool: the edges of the graph (u written before r reads)."""
        return torch.arange(self.n_up)[:, None] < self.prefix[None, :]

    def node_name(self, u: int) -> str:
        if u == 0:
            return "embed"
        layer = int(torch.searchsorted(torch.tensor(self.first), u, right=True)) - 1
        i = u - self.first[layer]
        h = self.ad.n_heads
        if i < h:
            return f"L{layer}.H{i}"
        return f"L{layer}.MLP" if i == h else f"L{layer}.F{self.latents[layer][i - h - 1]}"

    def reader_of(self, r: int) -> tuple[str, int, int]:
        """``(kind, layer, index)`` of reader ``r`` (the logits: the last layer's, index 0)."""
        if r == self.n_read - 1:
            return "logits", self.ad.n_layers - 1, 0
        layer = self.reader_layer(r)
        i = r - self.rfirst[layer]
        h, kv = self.ad.n_heads, self.ad.n_kv_heads
        if i < h:
            return "q", layer, i
        if i < h + 2 * kv:
            return ("k", layer, i - h) if i < h + kv else ("v", layer, i - h - kv)
        return ("mlp", layer, 0) if i == h + 2 * kv else ("latent", layer, i - h - 2 * kv - 1)

    def reader_name(self, r: int) -> str:
        kind, layer, i = self.reader_of(r)
        if kind == "logits":
            return "logits"
        if kind == "mlp":
            return f"L{layer}.MLP.in"
        if kind == "latent":
            return f"L{layer}.F{self.latents[layer][i]}.in"
        return f"L{layer}.H{i}.q" if kind == "q" else f"L{layer}.KV{i}.{kind}"

    def edge_name(self, u: int, r: int) -> str:
        return f"{self.node_name(u)} -> {self.reader_name(r)}"

    def reader_node(self, r: int) -> str:
        """The node a reader belongs to: ``L1.H0`` for q (and k/v without GQA), ``L1.KV0`` for k/v
        under GQA, ``L1.MLP``, ``L1.F12``, ``logits``."""
        if r == self.n_read - 1:
            return "logits"
        node = self.reader_name(r).rsplit(".", 1)[0]
        return node.replace(".KV", ".H") if self.ad.n_kv_heads == self.ad.n_heads else node

    # modules ----------------------------------------------------------------------------------
    def norms(self, layer: int) -> tuple[nn.Module, nn.Module, nn.Module]:
        """``(norm before attention, norm before the MLP, module taking the normed MLP input)``."""
        blk = self.ad.blocks[layer]
        return tuple(blk.get_submodule(p) for p in self.ad.family.readers)

    def final_norm(self) -> nn.Module:
        return self.ad.model.get_submodule(self.ad.family.final_norm)


def latent_writes(g: Graph, layer: int, y: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The writes of ``layer``'s MLP node (the rest) ``[B, 1, T, d]`` and of its latent nodes
    ``[B, n, T, d]`` (``f_j W_dec[j]``), from the MLP's output ``y`` [B, T, d] and the latent nodes'
    activations ``f`` [B, T, n]."""
    w_dec = g.ad.dictionaries[layer].like(y).W_dec[g.latents[layer]]  # [n, d]
    writes = torch.einsum("btn,nd->bntd", f, w_dec)
    return (y - writes.sum(1))[:, None], writes


def write_taps(g: Graph, put: Callable[[int, torch.Tensor], None], skip: bool = False) -> list[runner.TapSpec]:
    """Read-only taps handing each upstream write to ``put(u0, w [B, C, T, d])`` (nodes ``u0 .. u0 + C``);
    ``skip``: not the MLP and latent writes of layers with latent nodes (an edge-patched forward writes
    those itself)."""
    ad = g.ad

    def heads(layer):
        w_o, _ = ad.weight("head", layer)
        return lambda z: put(g.head(layer, 0), torch.einsum("btcD,cDd->bctd", z.detach(), w_o))

    def mlp(layer):
        return lambda x: put(g.mlp(layer), x[:, :, 0].detach()[:, None])

    def with_latents(layer):  # the MLP's output, then its latents (feature taps run after site taps)
        seen = {}

        def keep(x):
            seen["y"] = x[:, :, 0].detach()

        def emit(f):  # [B, T, d_sae, 1]
            rest, writes = latent_writes(g, layer, seen.pop("y"), f[..., 0].detach()[..., g.latents[layer]])
            put(g.mlp(layer), rest)
            put(g.latent(layer, 0), writes)

        return [("mlp_out", layer, keep), ("feature", layer, emit)]

    taps = [("resid_pre", 0, lambda x: put(0, x[:, :, 0].detach()[:, None]))]
    for layer in range(ad.n_layers):
        taps.append(("head", layer, heads(layer)))
        if layer not in g.latents:
            taps.append(("mlp_out", layer, mlp(layer)))
        elif not skip:
            taps += with_latents(layer)
    return taps


def store_writes(g: Graph, store: dict, node_major: bool = False):
    """A ``put`` for :func:`write_taps` filling ``store["w"]`` [B, n_up, T, d] (``node_major``:
    [n_up, B, T, d]), fp32."""

    def put(u0, w):
        if node_major:
            w = w.transpose(0, 1)
        if "w" not in store:
            n = (g.n_up, w.shape[1]) if node_major else (w.shape[0], g.n_up)
            store["w"] = w.new_zeros(*n, w.shape[2], w.shape[3], dtype=torch.float32)
        if node_major:
            store["w"][u0 : u0 + w.shape[0]] = w
        else:
            store["w"][:, u0 : u0 + w.shape[1]] = w

    return put


@contextmanager
def pre_hooks(hooks: list[tuple[torch.nn.Module, Callable]]):
    """Forward pre-hooks ``fn(x) -> x'`` on the first input of each module, for the block's duration."""
    with ExitStack() as stack:
        for module, fn in hooks:

            def pre(mod, args, kwargs, fn=fn):
                new = fn(hidden_in(args, kwargs))
                return None if new is None else with_hidden_in(args, kwargs, new)

            stack.callback(module.register_forward_pre_hook(pre, with_kwargs=True).remove)
        yield


def norm_inputs(g: Graph, store: dict) -> list[tuple[torch.nn.Module, Callable]]:
    """Pre-hooks keeping each block's norm inputs (``store[("attn"|"mlp", layer)]``, detached)."""
    hooks = []
    for layer in range(g.ad.n_layers):
        ln_attn, ln_mlp, _ = g.norms(layer)
        keys = [("attn", layer)] + [("mlp", layer)] * (ln_mlp is ln_attn)

        def keep(x, keys=keys):
            for k in keys:
                store[k] = x.detach()

        hooks.append((ln_attn, keep))
        if ln_mlp is not ln_attn:
            hooks.append((ln_mlp, lambda x, k=("mlp", layer): store.__setitem__(k, x.detach())))
    return hooks
