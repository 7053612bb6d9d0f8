"""Interventions: one op at a site, limited to layers, components and positions, with per-row
parameters, applied inside the forward pass through the ``perturb`` op.

Constructors: :func:`patch_from` (another run's activations, or any tensor of the site's shape),
:func:`mean` (mean ablation), :func:`add` (steering), :func:`zero`, :func:`scale`,
:func:`project_out` and :func:`clamp`. (Exact-patching *sweeps* are :func:`causalscan.patch`.)

>>> import torch
>>> import causalscan as cs
>>> from causalscan import interventions as iv
>>> model = cs.load("random:llama-tiny")
>>> ids = torch.tensor([[5, 6, 7, 8]])
>>> steer = iv.add("resid_post", vector=torch.ones(64), alpha=4.0, layers=1, positions=[-1])
>>> with iv.perturb(model, steer):
...     logits = model.hf(input_ids=ids).logits
>>> logits.shape
torch.Size([1, 4, 512])
>>> ablated = iv.perturb(model, iv.zero("head", layers=1, index=[0, 2]), input_ids=ids)   # function form
>>> bool((ablated[0, -1] != model.hf(input_ids=ids).logits[0, -1]).any())
True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from causalscan.bindings import ops
from causalscan.errors import InputError, check_number, check_type, is_int
from causalscan.model import runner

Index = int | Sequence[int] | torch.Tensor | None


@dataclass
class Intervention:
    """One op at ``site`` (see :mod:`causalscan.kernels.perturb` for the math).

    layers:    int, list, or None for every layer.
    index:     components (head / neuron ids), a bool ``[B, C]`` per-row mask, or None for all.
    positions: positions (negative counts from the end), a bool ``[B, T]`` mask, or None for all.
    source:    ``patch``/``mean`` values ``[B|1, T|1, C, D]`` (or ``[..., C*D]``), or per layer
               ``{layer: tensor}``.
    vector:    ``add`` vector ``[B|1, C, D]`` or ``[C*D]``.
    alpha:     per-row scalar ``[B]`` or a float (``add`` gain, ``scale`` factor, ``clamp`` value).
    direction: ``project_out``/``scale``/``clamp`` direction ``[B|1, C, D]`` or ``[C*D]``;
               normalised per component.
    """

    op: str
    site: str
    layers: int | Sequence[int] | None = None
    index: Index = None
    positions: Index = None
    source: torch.Tensor | Mapping[int, torch.Tensor] | None = None
    vector: torch.Tensor | None = None
    alpha: float | torch.Tensor | None = None
    direction: torch.Tensor | None = None

    def __post_init__(self):
        if self.op == "mean":
            self.op = "patch"
        if self.op not in ops.OPS:
            raise InputError(f"unknown op {self.op!r}; ops: mean, {', '.join(ops.OPS)}", field="op")
        need = {"patch": "source", "add": "vector", "project_out": "direction", "scale": "alpha", "clamp": "alpha"}
        if self.op in need and getattr(self, need[self.op]) is None:
            raise InputError(f"{self.op} needs {need[self.op]}", field=need[self.op])
        check_type(self.site, str, "site", "a site name")
        layers = [self.layers] if isinstance(self.layers, int) else self.layers
        if layers is not None and (not isinstance(layers, Sequence | range) or not all(is_int(x) for x in layers)):
            raise InputError(f"must be a layer, a list of layers or None, not {self.layers!r:.60}", field="layers")
        for name in ("index", "positions"):
            sel = getattr(self, name)
            ok = (
                sel is None
                or is_int(sel)
                or (
                    sel.dtype == torch.bool or not sel.is_floating_point() and not sel.is_complex()
                    if isinstance(sel, torch.Tensor)
                    else isinstance(sel, Sequence) and all(is_int(x) for x in sel)
                )
            )
            if not ok:
                raise InputError(
                    f"must be an int, a list of ints, an integer or bool tensor, or None, not {sel!r:.60}", field=name
                )
        sources = self.source.values() if isinstance(self.source, Mapping) else [self.source]
        for name, values in (("source", sources), ("vector", [self.vector]), ("direction", [self.direction])):
            for v in values:
                if v is not None and not (isinstance(v, torch.Tensor) and v.is_floating_point()):
                    raise InputError(f"must be a floating-point tensor, not {type(v).__name__}", field=name)
                if v is not None and not torch.isfinite(v).all():
                    raise InputError("holds NaN or infinite entries", field=name)
        if self.alpha is not None:
            alpha = self.alpha if isinstance(self.alpha, torch.Tensor) else None
            if alpha is None:
                check_number(self.alpha, "alpha")
            elif not alpha.is_floating_point() or not torch.isfinite(alpha).all():
                raise InputError("must be a finite float or a finite floating-point tensor [B]", field="alpha")

    def taps(self, model) -> list[runner.TapSpec]:
        ad = model.adapter
        layers = self.layers if self.layers is not None else range(ad.n_layers)
        layers = [layers] if isinstance(layers, int) else layers
        out = []
        for layer in layers:
            ad.check_site(self.site, layer)
            out.append((self.site, layer, self._fn(layer)))
        return out

    def _fn(self, layer: int):
        def fn(x):  # x [B, T, C, D]
            b, t, c, d = x.shape
            mask = _mask(self.index, b, c, x.device)[:, None, :] & _mask(self.positions, b, t, x.device)[:, :, None]
            src = self.source[layer] if isinstance(self.source, Mapping) else self.source
            if src is not None:  # [B|1, T|1, C, D], or one value [C, D] for every row and position
                src = _param(src, c, d, x)
                src = src if src.dim() == 4 else src[:, None]
                if src.dim() != 4 or src.shape[0] not in (1, b) or src.shape[1] not in (1, t):
                    raise InputError(
                        f"source of shape {tuple(src.shape)} does not fit a run of {b} rows x {t} "
                        f"positions x {c} x {d}",
                        field="source",
                    )
                src = src.expand(b, t, c, d)
            alpha = self.alpha
            if alpha is not None:
                alpha = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).reshape(-1)
            return ops.perturb(
                x,
                self.op,
                mask,
                source=src,
                alpha=alpha,
                vector=None if self.vector is None else _param(self.vector, c, d, x),
                direction=None if self.direction is None else _unit(_param(self.direction, c, d, x)),
            )

        return fn


def _mask(sel: Index, rows: int, n: int, device) -> torch.Tensor:
    """Selection -> bool ``[rows|1, n]``."""
    if sel is None:
        return torch.ones(1, n, dtype=torch.bool, device=device)
    if isinstance(sel, torch.Tensor) and sel.dtype == torch.bool:
        if sel.dim() == 1:
            sel = sel[None]
        if sel.shape[-1] != n:
            raise InputError(f"mask has {sel.shape[-1]} entries, the site has {n}", field="index/positions")
        return sel.to(device)
    idx = torch.as_tensor([sel] if isinstance(sel, int) else list(sel), dtype=torch.long).reshape(-1)
    if len(idx) and (idx.max() >= n or idx.min() < -n):
        raise InputError(f"index {idx.tolist()} out of range for size {n}", field="index/positions")
    m = torch.zeros(1, n, dtype=torch.bool)
    m[0, idx % n] = True
    return m.to(device)


def _param(p: torch.Tensor, c: int, d: int, x: torch.Tensor) -> torch.Tensor:
    """``[C*D]``, ``[C, D]``, ``[B, C*D]`` or ``[B, ..., C, D]`` -> ``[B|1, ..., C, D]``."""
    p = p.to(device=x.device, dtype=x.dtype)
    if p.shape[-2:] != (c, d):
        if p.shape[-1] != c * d:
            raise InputError(f"parameter of shape {tuple(p.shape)} does not fit a site of {c} x {d}")
        p = p.unflatten(-1, (c, d))
    return p[None] if p.dim() == 2 else p


def _unit(u: torch.Tensor) -> torch.Tensor:
    return u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def patch_from(site: str, source, layers=None, index: Index = None, positions: Index = None) -> Intervention:
    """Replace activations by ``source`` (another run's, or any tensor of the site's shape)."""
    return Intervention("patch", site, layers, index, positions, source=source)


def mean(site: str, value, layers=None, index: Index = None, positions: Index = None) -> Intervention:
    """Mean ablation: replace activations by ``value`` (e.g. a dataset mean, ``[C, D]``)."""
    return Intervention("patch", site, layers, index, positions, source=value)


def add(site: str, vector, alpha=1.0, layers=None, index: Index = None, positions: Index = None) -> Intervention:
    """Add ``alpha * vector`` (steering)."""
    return Intervention("add", site, layers, index, positions, vector=vector, alpha=alpha)


def zero(site: str, layers=None, index: Index = None, positions: Index = None) -> Intervention:
    """Zero ablation."""
    return Intervention("zero", site, layers, index, positions)


def scale(site: str, alpha, layers=None, index: Index = None, positions: Index = None, direction=None) -> Intervention:
    """Multiply activations (or only their part along ``direction``) by ``alpha``."""
    return Intervention("scale", site, layers, index, positions, alpha=alpha, direction=direction)


def project_out(site: str, direction, layers=None, index: Index = None, positions: Index = None) -> Intervention:
    """Remove the component along ``direction``."""
    return Intervention("project_out", site, layers, index, positions, direction=direction)


def clamp(site: str, value, layers=None, index: Index = None, positions: Index = None, direction=None) -> Intervention:
    """Set the coordinate along ``direction`` (without one: every element) to ``value``."""
    return Intervention("clamp", site, layers, index, positions, alpha=value, direction=direction)


@contextmanager
def _perturbed(model, interventions) -> Iterator:
    """Every forward of ``model.hf`` inside the block runs with ``interventions``."""
    with runner.installed(model.adapter, [t for iv in interventions for t in iv.taps(model)]):
        yield model


def perturb(model, *interventions: Intervention, input_ids: torch.Tensor | None = None):
    """Apply interventions inside the forward pass.

    Without ``input_ids``: a context manager under which every forward of ``model.hf`` is
    perturbed. With ``input_ids`` [B, T]: runs one forward and returns logits [B, T, V].
    """
    from causalscan.model.load import load

    model = load(model)
    for iv in interventions:
        check_type(iv, Intervention, "interventions", "an Intervention (see the constructors add, zero, ...)")
    if input_ids is None:
        return _perturbed(model, interventions)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise InputError(f"must be an integer tensor [B, T], not {input_ids!r:.60}", field="input_ids")
    with _perturbed(model, interventions):
        return model.hf(input_ids=input_ids.to(model.device)).logits


__all__ = ["Intervention", "add", "clamp", "mean", "patch_from", "perturb", "project_out", "scale", "zero"]
