"""A sparse dictionary at a site: an SAE (reads and writes one site) or a transcoder (reads the MLP's
input, writes its output), with SAELens's encoders.

``pre = norm(x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc`` [.., d_sae], then

==================  ================================================================
``standard``         ``f = relu(pre)``
``jumprelu``         ``f = relu(pre) * (pre > threshold)``
``topk``             the ``k`` largest of ``pre`` kept, ``relu``, the rest 0 (``topk_transcoder`` too)
``gated``            ``f = (x W_enc + b_gate > 0) * relu(x W_enc * exp(r_mag) + b_mag)``
==================  ================================================================

and ``decode(f) = denorm(f @ W_dec + b_dec)`` (+ ``x @ W_skip.T`` for a skip transcoder). ``norm``
is SAELens's ``normalize_activations``: ``none``, ``constant_norm_rescale`` (``x sqrt(d_in) /
|x|``) or ``layer_norm``; its scale is held per position (:class:`Norm`), so ``decode`` is linear
in ``f``. Transcoders take the ``norm`` of their input and write without ``denorm``, as SAELens.

>>> import torch
>>> d = Dictionary("standard", "resid_pre", 0, torch.eye(3), torch.zeros(3), torch.eye(3), torch.zeros(3))
>>> f, norm = d.encode(torch.tensor([[1.0, -2.0, 3.0]]))
>>> f, d.decode(f, norm)
(tensor([[1., 0., 3.]]), tensor([[1., 0., 3.]]))
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import torch

# SAELens's architectures, and ``topk_transcoder`` (a TopK transcoder, as ``causalscan sae train`` makes;
# SAELens names none)
ARCHITECTURES = (
    "standard",
    "jumprelu",
    "topk",
    "gated",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "topk_transcoder",
)
NORMS = ("none", "constant_norm_rescale", "layer_norm")
TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "topk_transcoder")
TOPK = ("topk", "topk_transcoder")


class Norm(NamedTuple):
    """The input normalisation of one call, per position [.., 1]: ``x_n = (x - shift) * scale``,
    undone on the way out as ``out * unscale + shift``."""

    shift: torch.Tensor | float
    scale: torch.Tensor | float
    unscale: torch.Tensor | float


@dataclass
class Dictionary:
    """Weights and placement of one dictionary: read at ``site`` of ``layer``, written back there
    (an SAE) or at ``out_site`` (a transcoder). ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
    ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``; ``threshold [d_sae]`` (JumpReLU), ``k`` (TopK),
    ``W_skip [d_out, d_in]`` (skip transcoder), ``b_gate``, ``r_mag``, ``b_mag`` [d_sae] (gated)."""

    architecture: str
    site: str
    layer: int
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor | None = None
    k: int | None = None
    W_skip: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    r_mag: torch.Tensor | None = None
    b_mag: torch.Tensor | None = None
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"
    out_site: str | None = None
    name: str = "dictionary"
    hook_name: str | None = None  # the TransformerLens hook it was trained at, as its cfg says
    _cast: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def transcoder(self) -> bool:
        return self.architecture in TRANSCODERS

    @property
    def writes(self) -> str:
        """The site the reconstruction replaces: ``site`` for an SAE, ``out_site`` for a transcoder."""
        return self.out_site or self.site

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        """Every weight tensor of the dictionary."""
        return [v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)]

    def like(self, x: torch.Tensor) -> Dictionary:
        """This dictionary's tensors on ``x``'s device and dtype (made once per device and dtype)."""
        key = (x.device, x.dtype)
        if self.W_enc.device == x.device and self.W_enc.dtype == x.dtype:
            return self
        if key not in self._cast:
            moved = {
                f.name: getattr(self, f.name).to(x.device, x.dtype)
                for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            }
            self._cast[key] = replace(self, **moved, _cast={})
        return self._cast[key]

    def normalise(self, x: torch.Tensor) -> Norm:
        """The per-position normalisation of input ``x`` [.., d_in] (held constant downstream)."""
        if self.normalize_activations == "constant_norm_rescale":
            scale = self.d_in**0.5 / x.norm(dim=-1, keepdim=True)
            return Norm(0.0, scale, 1.0 / scale)
        if self.normalize_activations == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            return Norm(mu, 1.0 / (std + 1e-5), std)
        return Norm(0.0, 1.0, 1.0)

    def pre(self, x: torch.Tensor, norm: Norm | None = None) -> torch.Tensor:
        """The encoder's pre-activation [.., d_sae] of input ``x`` [.., d_in]."""
        d = self.like(x)
        norm = d.normalise(x) if norm is None else norm
        x = (x - norm.shift) * norm.scale
        if d.apply_b_dec_to_input:
            x = x - d.b_dec
        return x @ d.W_enc + (d.b_gate if d.architecture == "gated" else d.b_enc)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Norm]:
        """Latents ``f`` [.., d_sae] of input ``x`` [.., d_in], and the input's normalisation."""
        d = self.like(x)
        norm = d.normalise(x)
        pre = d.pre(x, norm)
        arch = d.architecture
        if arch in ("jumprelu", "jumprelu_transcoder"):
            return pre.relu() * (pre > d.threshold), norm
        if arch in TOPK:
            top = pre.topk(d.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()), norm
        if arch == "gated":
            gate = pre > 0
            mag = (pre - d.b_gate) * d.r_mag.exp() + d.b_mag
            return gate * mag.relu(), norm
        return pre.relu(), norm

    def decode(self, f: torch.Tensor, norm: Norm, x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction [.., d_out] of latents ``f`` [.., d_sae] (linear in ``f`` for a fixed
        ``norm``); a skip transcoder adds ``x @ W_skip.T`` of its input ``x``."""
        d = self.like(f)
        out = f @ d.W_dec + d.b_dec
        if d.W_skip is not None:
            out = out + x @ d.W_skip.T
        if d.transcoder:
            return out
        return out * norm.unscale + norm.shift

    def direction(self, latent: int) -> torch.Tensor:
        """Latent ``latent``'s decoder row [d_out], in the site's own units (a steering direction)."""
        return self.W_dec[latent]


__all__ = ["ARCHITECTURES", "NORMS", "TOPK", "TRANSCODERS", "Dictionary", "Norm"]
