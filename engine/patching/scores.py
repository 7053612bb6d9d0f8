"""The score store of one attribution batch, filled by the backward hooks of the base run's taps
(AtP, AtP*'s QK fix and GradDrop, AtP-IG), and the other run that attribution starts from.

A store holds per sweep ``signed`` ``[P, *shape]`` (the estimate) and, with GradDrop, ``graddrop``;
a site's hook reduces ``(a_other - a_base) . grad`` to per-component scores with ``ops.attribute``
where the gradient is (no gradient cache), and writes each layer's slice into every sweep of the
site: by position, over named roles (each pair's role positions) or over all positions.
"""

from __future__ import annotations

import torch

from causalscan.bindings import ops
from causalscan.data.sweeps import Sweep
from causalscan.model import attention, runner
from causalscan.model.adapters import Adapter

QK = ("q", "k")


def first_affected(site: str, layer: int) -> int:
    """The first GradDrop pass that changes the gradient at ``site`` of ``layer``."""
    return layer + 1 if site == "resid_post" else layer


class Scores:
    """The score stores of one batch, filled by the backward hooks of the base run's taps.

    ``signed[name]`` ``[P, *shape]``: AtP from the plain backward; ``graddrop[name]``: the sum of
    ``|I_l|`` over GradDrop backwards. ``drop``: the block whose residual writes the running backward
    cuts (None: the plain backward).
    """

    def __init__(self, sweeps: list[Sweep], n_pairs: int, device, graddrop: bool, role_pos: torch.Tensor | None = None):
        self.sweeps, self.n_pairs, self.drop, self.role_pos = sweeps, n_pairs, None, role_pos
        self.weight: float | None = None  # AtP-IG: each step's scores are added with this weight
        self.signed = {sw.name: torch.zeros(n_pairs, *sw.shape, device=device) for sw in sweeps}
        self.graddrop = {sw.name: torch.zeros(n_pairs, *sw.shape, device=device) for sw in sweeps} if graddrop else None

    def of(self, site: str, by_pos: bool | None = None) -> list[Sweep]:
        return [sw for sw in self.sweeps if sw.site == site and by_pos in (None, sw.by_pos)]

    def wanted(self, site: str, layer: int) -> bool:
        """Does the running backward change the gradient at ``site`` of ``layer``?"""
        return self.drop is None or first_affected(site, layer) <= self.drop

    def store(self, site: str, layer: int, by_pos: bool, score: torch.Tensor) -> None:
        """``score`` [P, T, C] or [P, C] of one layer into every sweep of ``site`` with ``by_pos``."""
        for sw in self.of(site, by_pos):
            val = self.at_positions(score, sw).float().reshape(self.n_pairs, *sw.shape[1:])
            val = val.to(self.signed[sw.name].device)  # the layer's block may sit on another device
            row = sw.row(layer)
            if self.weight is not None:
                self.signed[sw.name][:, row] += self.weight * val
            elif self.drop is None:
                self.signed[sw.name][:, row] = val
            else:
                self.graddrop[sw.name][:, row] += val.abs()

    def at_positions(self, score: torch.Tensor, sw: Sweep) -> torch.Tensor:
        """A by-position score ``[P, T', C]`` at the sweep's positions: each pair's role positions
        ``[P, R, C]`` for a sweep over roles, else the prompt's first ``T`` (rows of multi-token
        answers run on past the prompt)."""
        if not sw.by_pos:
            return score
        if sw.roles is None:
            return score[:, : sw.shape[1]]
        idx = self.role_pos.to(score.device)[:, :, None].expand(-1, -1, score.shape[-1])
        return score.gather(1, idx)

    def site_hook(self, site: str, layer: int):
        """The backward hook of a site's tap: ``(a_other - a_base) . grad`` for each of its sweeps."""
        modes = {sw.by_pos for sw in self.of(site)}

        def hook(delta, grad):  # [P, T, C, D] each
            if not self.wanted(site, layer):
                return
            for by_pos in modes:
                if self.drop is None:
                    self.store(site, layer, by_pos, ops.attribute(None, delta, grad, by_pos))
                    continue
                # a GradDrop pass: |I| accumulated in place by the kernel, into each sweep's layer slice
                shape = delta.shape[:3] if by_pos else (delta.shape[0], delta.shape[2])
                for sw in self.of(site, by_pos):
                    acc = self.graddrop[sw.name][:, sw.row(layer)]
                    if acc.device == delta.device and (not by_pos or sw.roles is None and shape[1] == sw.shape[1]):
                        ops.attribute(None, delta, grad, by_pos, abs=True, out=acc.view(shape))
                    else:  # per-pair or prompt positions, or another device: taken, then added
                        score = ops.attribute(None, delta, grad, by_pos)
                        acc += self.at_positions(score, sw).abs().reshape(acc.shape).to(acc.device)

        return hook

    def qk_hook(
        self, layer: int, base: dict[int, attention.Record], other: dict[int, attention.Record], sites: set[str]
    ):
        """The backward hook of a layer's head output: the QK fix of its q and k nodes, where
        ``dL/dz`` is at hand."""

        def hook(z, dz):
            if not self.wanted("q", layer):
                return
            rec, oth = base[layer], other[layer]
            res = ops.qk_fix(
                rec.q,
                rec.k,
                rec.v,
                dz,
                rec.bias(),
                rec.scaling,
                rec.softcap,
                q_other=oth.q if "q" in sites else None,
                k_other=oth.k if "k" in sites else None,
            )
            for site in sites & set(QK):
                for sw in self.of(site):
                    val = res[site] if sw.by_pos else (res["q"].sum(1) if site == "q" else res["k_all"])
                    self.store(site, layer, sw.by_pos, val)

        return hook


@torch.no_grad()
def other_run(ad: Adapter, ids: torch.Tensor, tapped, attn_layers, noise, keep: int) -> tuple[torch.Tensor, dict, dict]:
    """The other run without a graph: the last ``keep`` positions' logits [P, keep, V], activations
    at the tapped sites, and the attention inputs of ``attn_layers``."""
    acts: dict = {}
    rec: dict = {}
    with attention.recording(ad, attn_layers, rec):
        logits = runner.forward(
            ad, ids, [runner.capture(ad, s, layer, acts) for s, layer in tapped], noise=noise, logits_to_keep=keep
        )
    return logits, acts, rec
