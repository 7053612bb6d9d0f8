"""Record what each attention layer computes with: queries and keys after rotary embeddings and
q/k norms, values, the mask, the scale and the logit softcap.

The HF attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)``; inside
:func:`recording` that lookup returns a wrapper that stores its arguments and calls the function
the model would have used, so any ``attn_implementation`` works and the model's own position
encoding is what gets recorded. :func:`bias` rebuilds the additive mask and :func:`pattern` the
attention probabilities from a record.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from causalscan.model.adapters import Adapter


@dataclass
class Record:
    """One layer's attention inputs: ``q`` [B, H, T, Dh], ``k``/``v`` [B, Hkv, T, Dh] (detached)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    softcap: float | None
    sliding_window: int | None

    def bias(self) -> torch.Tensor:
        """Additive fp32 mask broadcastable to [B, H, T, T]: 0 where a query sees a key, else -inf."""
        t, tk = self.q.shape[2], self.k.shape[2]
        m = self.mask
        if m is None:
            i = torch.arange(t, device=self.q.device)[:, None] + (tk - t)
            j = torch.arange(tk, device=self.q.device)[None]
            ok = j <= i
            if self.sliding_window:
                ok &= j > i - self.sliding_window
            m = ok
        m = m[..., :tk]
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf"))
        return m.float()

    def pattern(self) -> torch.Tensor:
        """The attention probabilities [B, H, T, Tk] in fp32 (the model's own, up to rounding)."""
        grp = self.q.shape[1] // self.k.shape[1]
        s = (self.q.float() @ self.k.float().repeat_interleave(grp, 1).transpose(-1, -2)) * self.scaling
        if self.softcap:
            s = self.softcap * torch.tanh(s / self.softcap)
        return torch.softmax(s + self.bias(), -1)


@contextmanager
def interposed(ad: Adapter, call):
    """Inside the block, the attention function of ``ad``'s layers is ``call(inner, layer, module,
    query, key, value, attention_mask, *args, **kwargs)``, where ``inner`` is the function the model
    would have used (any ``attn_implementation``); other models' layers call ``inner`` directly.
    Nested blocks compose (the inner one calls the outer one's wrapper as ``inner``)."""
    owner = {id(m): i for i, blk in enumerate(ad.blocks) for m in blk.modules()}
    impl = ad.model.config._attn_implementation
    had = impl in ALL_ATTENTION_FUNCTIONS._local_mapping
    before = ALL_ATTENTION_FUNCTIONS._local_mapping.get(impl)
    inner_default = ALL_ATTENTION_FUNCTIONS._global_mapping.get(impl) if not had else before

    def wrapper(module, *args, **kwargs):
        inner = inner_default or sys.modules[type(module).__module__].eager_attention_forward
        layer = owner.get(id(module))
        if layer is None:
            return inner(module, *args, **kwargs)
        return call(inner, layer, module, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[impl] = wrapper
    try:
        yield
    finally:
        if had:
            ALL_ATTENTION_FUNCTIONS[impl] = before
        else:
            del ALL_ATTENTION_FUNCTIONS[impl]


@contextmanager
def recording(ad: Adapter, layers, store: dict):
    """Inside the block, every forward stores ``store[layer] = Record(...)`` for ``layers``."""
    layers = set(layers)
    if not layers:
        yield store
        return

    def record(inner, layer, module, query, key, value, attention_mask, *args, **kwargs):
        if layer in layers:
            scaling = kwargs.get("scaling")
            store[layer] = Record(
                query.detach(),
                key.detach(),
                value.detach(),
                attention_mask,
                query.shape[-1] ** -0.5 if scaling is None else float(scaling),
                kwargs.get("softcap"),
                kwargs.get("sliding_window"),
            )
        return inner(module, query, key, value, attention_mask, *args, **kwargs)

    with interposed(ad, record):
        yield store
