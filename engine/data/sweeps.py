"""Sweeps: which components a method measures, and the shape its results take.

A *component* (node) is ``(site, layer, index, position)``: a head or neuron ``index`` (0 for
residual sites) at ``position``: a token index, a role name (a named position, resolved per pair:
pairs of different lengths), or None (all positions). A *sweep* is one site at every layer, per
position (per role when the dataset names roles) or over all positions, and owns a slice
``[start, stop)`` of a method's flat node list:

==============  ================  =======================================
spec            sweep name        result shape
==============  ================  =======================================
``head``        ``head``          ``[layers, heads]``
``head:pos``    ``head_pos``      ``[layers, positions, heads]``
``resid_pre``   ``resid_pre``     ``[layers, positions]`` (by position by default)
``mlp_out:all`` ``mlp_out_all``   ``[layers]``
``neuron``      ``neuron``        ``[layers, d_mlp]``
==============  ================  =======================================

>>> import causalscan as cs
>>> sweeps, nodes = build_sweeps(cs.load("random:llama-tiny"), ["head", "resid_pre"], [5])
>>> [(s.name, s.shape, s.stop - s.start) for s in sweeps]
[('head', (2, 4), 8), ('resid_pre', (2, 5), 10)]
>>> str(nodes[9])
'resid_pre.L0.0@1'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from causalscan.errors import InputError, check_type, names
from causalscan.model.adapters import FEATURE_SITES, SITES

BY_POSITION = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", *FEATURE_SITES)


@dataclass(frozen=True)
class Component:
    """A node: ``site`` at ``layer``, component ``index`` (head / neuron; 0 for residual sites),
    ``position`` (None: all positions)."""

    site: str
    layer: int
    index: int = 0
    position: int | str | None = None

    def __str__(self) -> str:
        pos = "" if self.position is None else f"@{self.position}"
        return f"{self.site}.L{self.layer}.{self.index}{pos}"

    def row(self) -> dict:
        """The node's fields in a ranked table's row."""
        return {
            "component": str(self),
            "site": self.site,
            "layer": self.layer,
            "index": self.index,
            "position": self.position,
        }


@dataclass(frozen=True)
class Sweep:
    """``site`` at every layer, per position (``by_pos``) or not: nodes ``[start, stop)`` of a
    method's node list, shaped ``shape`` (``[L, (T | R), (C)]``, C dropped when 1). ``roles``: the
    role names a by-position sweep runs over (None: token positions). ``layers``: the layers on
    its first axis when not every layer (a feature site: those with a dictionary)."""

    name: str
    site: str
    by_pos: bool
    shape: tuple
    start: int = 0
    stop: int = 0
    roles: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None

    def row(self, layer: int) -> int:
        """The index of ``layer`` on the sweep's first axis."""
        return layer if self.layers is None else self.layers.index(layer)


def parse_sweep(spec: str) -> tuple[str, bool]:
    """``"head"`` -> (head, all positions); ``"head:pos"``; ``"resid_pre"`` (by position by
    default); ``"resid_pre:all"``."""
    site, _, mode = spec.strip().partition(":")
    if site not in SITES + FEATURE_SITES:
        raise InputError(
            f"unknown site {site!r} in sweep {spec!r}; sites: {', '.join(SITES + FEATURE_SITES)}", field="sites"
        )
    if mode not in ("", "pos", "all"):
        raise InputError(f"unknown sweep mode {mode!r} in {spec!r}; use {site}:pos or {site}:all", field="sites")
    return site, (mode == "pos") or (mode == "" and site in BY_POSITION)


def sweep_name(site: str, by_pos: bool) -> str:
    """``head``, ``head_pos``, ``resid_pre``, ``resid_pre_all``: the site, marked when not its default."""
    return site + ("" if by_pos == (site in BY_POSITION) else "_pos" if by_pos else "_all")


def sweep_components(
    model, site: str, by_pos: bool, positions: int | Sequence[str] | None
) -> tuple[list[Component], tuple]:
    """Every component of a sweep over ``positions`` (a token count, or role names), and the result
    shape (``[L, T | R, C]`` squeezed of C == 1)."""
    ad = model.adapter
    ad.check_site(site)
    n_comp = ad.shape(site)[0]
    where = list(range(positions) if isinstance(positions, int) else positions) if by_pos else [None]
    layers = ad.layers(site)
    comps = [Component(site, layer, c, p) for layer in layers for p in where for c in range(n_comp)]
    shape = (len(layers),) + ((len(where),) if by_pos else ()) + ((n_comp,) if n_comp > 1 else ())
    return comps, shape


def build_sweeps(
    model,
    sites: str | Sequence[str],
    lengths: list[int],
    dataset_name: str = "<memory>",
    roles: Sequence[str] | None = None,
) -> tuple[list[Sweep], list[Component]]:
    """The sweeps ``sites`` and their flat node list. By-position sweeps run over ``roles`` when the
    dataset names them, else over token positions, which needs one token length."""
    sweeps: list[Sweep] = []
    comps: list[Component] = []
    for spec in names(sites, "sites", "head,neuron"):  # "head,neuron" as on the command line
        site, by_pos = parse_sweep(spec)
        if by_pos and not roles and len(lengths) > 1:
            raise InputError(
                f"sweep {spec!r} is by position: every pair needs the same token length, found "
                f'lengths {lengths}; or name positions on every pair, e.g. "positions": '
                f'{{"IO": " Mary", "S2": [" John", 2], "END": -1}}',
                file=dataset_name,
                field="sites",
            )
        cs, shape = sweep_components(model, site, by_pos, tuple(roles) if roles else lengths[0])
        sweeps.append(
            Sweep(
                sweep_name(site, by_pos),
                site,
                by_pos,
                shape,
                len(comps),
                len(comps) + len(cs),
                tuple(roles) if by_pos and roles else None,
                None if site not in FEATURE_SITES else tuple(model.adapter.layers(site)),
            )
        )
        comps += cs
    return sweeps, comps


def component_list(
    model, components, seq: int, roles: Sequence[str] | None = None
) -> tuple[list[Sweep], list[Component]]:
    """An explicit node list as one sweep ``components`` ``[n]``, each node checked (``seq``: the
    shortest prompt; ``roles``: the dataset's named positions)."""
    comps = list(components) if isinstance(components, list | tuple) else [components]
    for c in comps:
        check_type(c, Component, "components", "a Component")
        model.adapter.check_site(c.site, c.layer)
        if not 0 <= c.index < model.adapter.shape(c.site)[0]:
            raise InputError(f"{c}: index out of range", field="components")
        if isinstance(c.position, str) and c.position not in (roles or ()):
            raise InputError(f"{c}: the dataset names no position {c.position!r}", field="components")
        if isinstance(c.position, int) and not 0 <= c.position < seq:
            raise InputError(f"{c}: position out of range", field="components")
    return [Sweep("components", "", False, (len(comps),), 0, len(comps))], comps


def per_sweep(vectors: dict, sweeps: list[Sweep], names: dict[str, str] | None = None) -> dict:
    """``{"<kind>/<sweep>": [sweep shape]}``: each per-node vector [n] cut into its sweeps (``kind``
    renamed by ``names``)."""
    return {
        f"{(names or {}).get(kind, kind)}/{s.name}": vec[s.start : s.stop].reshape(s.shape).contiguous()
        for kind, vec in vectors.items()
        for s in sweeps
    }


def shapes(sweeps: list[Sweep]) -> dict[str, list[int]]:
    """Each sweep's result shape, by name."""
    return {s.name: list(s.shape) for s in sweeps}


def role_names(sweeps: list[Sweep]) -> list[str] | None:
    """The named positions by-position sweeps ran over (their axis labels), or None."""
    return next((list(s.roles) for s in sweeps if s.roles), None)


__all__ = [
    "BY_POSITION",
    "Component",
    "Sweep",
    "build_sweeps",
    "component_list",
    "parse_sweep",
    "per_sweep",
    "role_names",
    "shapes",
    "sweep_components",
    "sweep_name",
]
