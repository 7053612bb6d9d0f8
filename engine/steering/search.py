"""Perturbation search: unsupervised steering vectors (MELBO) and deep causal transcoding (DCT).

Both search for vectors ``theta`` of norm ``R`` that, added to the residual stream after block
``source`` at every position, change the residual after block ``target`` the most, without being
told what to look for (Mack and Turner). Each evaluation runs only the blocks ``source+1 ..
target`` on the cached residual of the unsteered prompts, batched over vectors.

- MELBO: one vector after another, each maximising ``sum_i (sum_t ||Z_i,t(theta) - Z_i,t(0)||^p)^(1/q)``
  by projected AMSGrad on the sphere of radius ``R``, orthogonal to the earlier vectors.
- DCT (exponential, orthogonalised gradient iteration): models ``Delta(theta)`` (the target change
  averaged over prompts and positions) as ``sum_l alpha_l (exp(<v_l, theta / R>) - 1) u_l`` and fits
  all ``n`` factors at once with batched forwards and VJPs, from a projected-Jacobian start;
  factors are ranked by ``alpha``.
- ``radius="auto"``: the ``R`` at which the non-linear share of the response is 0.5 (DCT's rule).

Every run also draws ``n`` random vectors of the same norm: the baseline a learned vector must beat.
See ``docs/methods.md`` for the math.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from causalscan.errors import InputError, check_number
from causalscan.model import runner
from causalscan.progress import Progress, log, report

Response = Callable[[torch.Tensor], list[torch.Tensor]]  # theta [n, d] -> per group [n, B, P, d]


class PromptGroup(NamedTuple):
    """Prompts of one length: ``ids`` [B, T]; ``h0`` [B, T, d], the unsteered residual after block
    source; ``z0`` [B, P, d], the unsteered residual after block target at the target positions
    ``pos`` [P]."""

    ids: torch.Tensor
    h0: torch.Tensor
    z0: torch.Tensor
    pos: torch.Tensor


@dataclass
class Slice:
    """The map ``theta -> Z_target(theta) - Z_target(0)`` of a model on fixed prompts, one
    :class:`PromptGroup` per prompt length."""

    ad: object
    source: int
    target: int
    groups: list[PromptGroup]

    @property
    def d_model(self) -> int:
        return self.groups[0].h0.shape[-1]

    @property
    def prompts(self) -> int:
        return sum(len(g.ids) for g in self.groups)

    def __call__(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """``theta`` [n, d] -> per group ``[n, B, P, d]``: the steered minus the unsteered target residual."""
        n = theta.shape[0]
        out = []
        for ids, h0, z0, pos in self.groups:
            resid = (h0[None] + theta[:, None, None].to(h0.dtype)).flatten(0, 1)  # [n B, T, d]
            z = runner.forward(
                self.ad, ids.repeat(n, 1), start_layer=self.source + 1, resid=resid, stop=self.target + 1
            )
            out.append(z[:, pos].unflatten(0, (n, len(ids))).float() - z0[None])
        return out

    def mean_delta(self, theta: torch.Tensor) -> torch.Tensor:
        """``Delta(theta)`` [n, d]: the change averaged over prompts and target positions (DCT's map)."""
        diffs = self(theta)
        total = sum(d.sum((1, 2)) for d in diffs)
        return total / sum(d.shape[1] * d.shape[2] for d in diffs)


def make_slice(model, prompts: list[list[int]], source: int, target: int, positions=None) -> Slice:
    """Cache the unsteered residuals of ``prompts`` (token ids) after blocks ``source`` and ``target``.
    ``positions``: target positions (ints, negative from the end), default all."""
    ad = model.adapter
    if not 0 <= source < target < ad.n_layers:
        raise InputError(
            f"need 0 <= source < target < {ad.n_layers}, got source {source}, target {target}", field="source/target"
        )
    if not prompts:
        raise InputError("no prompts", field="prompts")
    shortest = min(len(p) for p in prompts)
    model.check_length(max(len(p) for p in prompts), field="prompts")
    for p in positions or ():
        check_number(p, "positions", -shortest, shortest - 1, integer=True)  # no wrapping around
    groups = []
    for length in sorted({len(p) for p in prompts}):
        ids = torch.tensor([p for p in prompts if len(p) == length], device=model.device)
        pos = torch.arange(length) if positions is None else torch.tensor(sorted({p % length for p in positions}))
        with torch.no_grad():
            h0 = runner.forward(ad, ids, stop=source + 1)
            z0 = runner.forward(ad, ids, start_layer=source + 1, resid=h0, stop=target + 1)[:, pos].float()
        groups.append(PromptGroup(ids, h0, z0, pos.to(model.device)))
    return Slice(ad, source, target, groups)


def objective(diffs: list[torch.Tensor], p: float = 2.0, q: float = 1.0) -> torch.Tensor:
    """MELBO's ``sum_i (sum_t ||Delta_i,t||^p)^(1/q)`` per vector: per group ``[n, B, P, d]`` -> ``[n]``."""
    return sum((d.norm(dim=-1).pow(p).sum(-1)).pow(1.0 / q).sum(-1) for d in diffs)


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """``fn`` over the rows of ``x`` in chunks of ``batch`` (rows are independent), concatenated."""
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def scores(response: Response, vectors: torch.Tensor, p: float = 2.0, q: float = 1.0) -> torch.Tensor:
    """MELBO's objective of each of ``vectors`` [n, d] -> [n]."""
    return batched(lambda v: objective(response(v), p, q), vectors)


def _orth(x: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """``x`` [..., d] minus its projection on the orthonormal rows of ``basis`` [k, d]."""
    return x if basis is None or len(basis) == 0 else x - (x @ basis.T) @ basis


def melbo(
    response: Response,
    d: int,
    n: int,
    radius: float,
    p: float = 2.0,
    q: float = 1.0,
    steps: int = 50,
    lr: float | None = None,
    seed: int = 0,
    device=None,
    checkpoint=None,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` MELBO vectors, trained one after another: ``(vectors [n, d] at norm radius, objective [n])``.

    Each step projects the gradient on the sphere's tangent space and off the earlier vectors,
    takes an AMSGrad step (``lr`` default ``0.1 radius / sqrt(d)``) and renormalises.
    ``checkpoint``: a :class:`causalscan.checkpoint.Checkpoint` that holds the finished vectors; a
    rerun resumes after them with the same random draws. ``progress(stage, done, total)``: after each vector.
    """
    gen = torch.Generator().manual_seed(seed)
    lr = 0.1 * radius / math.sqrt(d) if lr is None else lr
    done = torch.zeros(0, d, device=device)  # unit rows
    saved = checkpoint.load({"unit": (None, d)}, n) if checkpoint is not None else None
    if saved and len(saved[1]) != len(saved[0]["unit"]):  # MELBO's units are the rows it holds
        saved = None
    if saved:
        done = saved[0]["unit"].to(device)
        torch.randn(len(done), d, generator=gen)  # the draws of the finished vectors' starts
        log.info("resuming from %s: %d/%d vectors done", checkpoint.path, len(done), n)
    with (
        checkpoint.held(lambda: ({"unit": done.cpu()}, set(range(len(done)))))
        if checkpoint is not None
        else contextlib.nullcontext()
    ):
        for _ in range(len(done), n):
            th = _orth(torch.randn(d, generator=gen).to(device), done)
            th = (th * radius / th.norm()).requires_grad_()
            opt = torch.optim.Adam([th], lr=lr, amsgrad=True)
            for _ in range(steps):
                obj = objective(response(th[None]), p, q)[0]
                opt.zero_grad()
                (-obj).backward()
                with torch.no_grad():
                    g = th.grad
                    g -= (g @ th) * th / radius**2
                    th.grad = _orth(g, done)
                opt.step()
                with torch.no_grad():
                    th.copy_(_orth(th, done))
                    th.mul_(radius / th.norm())
            done = torch.cat([done, (th.detach() / radius)[None]])
            if checkpoint is not None:
                checkpoint.save({"unit": done.cpu()}, set(range(len(done))), force=len(done) == n)
            report(progress, "melbo", len(done), n)
    vectors = done * radius
    return vectors, scores(response, vectors, p, q)


def _orthonormal(v: torch.Tensor) -> torch.Tensor:
    """Rows of ``v`` [n, d] (n <= d) made orthonormal by QR, each keeping its direction's sign."""
    qm, r = torch.linalg.qr(v.T)
    s = torch.sign(torch.diagonal(r))
    return (qm * torch.where(s == 0, 1.0, s)).T


def _vjp_rows(delta, theta: torch.Tensor, w: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Delta(theta), grad_theta sum_rows <w, Delta(theta)>)`` for ``theta``, ``w`` [n, d], ``batch``
    rows per forward and backward (rows are independent, so each chunk's graph is freed at once)."""
    outs, grads = [], []
    for lo in range(0, len(theta), batch):
        th = theta[lo : lo + batch].detach().requires_grad_()
        out = delta(th)
        (out * w[lo : lo + batch]).sum().backward()
        outs.append(out.detach())
        grads.append(th.grad)
    return torch.cat(outs), torch.cat(grads)


def dct(
    delta: Callable[[torch.Tensor], torch.Tensor],
    d: int,
    n: int,
    radius: float,
    iters: int = 10,
    seed: int = 0,
    device=None,
    batch: int = 64,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` DCT factors of ``delta`` (``theta`` [n, d] -> ``Delta`` [n, d]), all at once.

    Returns ``(vectors [n, d]`` at norm ``radius``, ranked, ``alpha [n]``, descending). Start: the
    top right-singular vectors of a random projection of the Jacobian (batched VJPs); then
    ``iters`` rounds of ``V <- orthonormal(V); U <- normalize(Delta(R V)); V <- normalize(R grad_V
    <U, Delta(R V)>)``; last, ``alpha = K^-1 <u_l, Delta(R v_l)>`` with ``K_ll' = <u_l, u_l'> (exp<v_l, v_l'> - 1)``.
    ``batch``: factors per forward/backward (memory). ``progress(stage, done, total)``: after each iteration.
    """
    if n > d:
        raise InputError(f"DCT finds at most d_model = {d} orthogonal factors, not {n}", field="n")
    gen = torch.Generator().manual_seed(seed)
    k = min(d, max(32, n))
    proj = torch.randn(k, d, generator=gen).to(device)
    _, pj = _vjp_rows(delta, torch.zeros(k, d, device=device), proj, batch)  # rows of P J
    _, _, vh = torch.linalg.svd(pj, full_matrices=False)
    v = vh[:n]
    if len(v) < n:
        v = torch.cat([v, torch.randn(n - len(v), d, generator=gen).to(device)])
    v = _orthonormal(v)
    u = torch.nn.functional.normalize(batched(delta, radius * v, batch), dim=-1)
    for it in range(iters):
        v = _orthonormal(v)
        dv, gv = _vjp_rows(delta, radius * v, u, batch)
        u = torch.nn.functional.normalize(dv, dim=-1)
        v = torch.nn.functional.normalize(radius * gv, dim=-1)  # grad in v = R grad in theta
        report(progress, "dct", it + 1, iters)
    v = _orthonormal(v)
    dv = batched(delta, radius * v, batch)
    b = (u * dv).sum(-1)
    kmat = (u @ u.T) * torch.expm1(v @ v.T)
    alpha = torch.linalg.lstsq(kmat, b[:, None]).solution[:, 0]
    order = alpha.argsort(descending=True)
    return radius * v[order], alpha[order]


def nonlinear_share(delta: Callable[[torch.Tensor], torch.Tensor], dirs: torch.Tensor, r: float, eps: float) -> float:
    """``sqrt(mean_v ||Delta(r v) - r J v||^2 / ||r J v||^2)`` over unit ``dirs`` [k, d], with ``J v`` from a
    central difference of step ``eps``."""
    with torch.no_grad():
        jv = (delta(eps * dirs) - delta(-eps * dirs)) / (2 * eps)
        lin = r * jv
        err = delta(r * dirs) - lin
    return (err.pow(2).sum(-1) / lin.pow(2).sum(-1).clamp_min(1e-30)).mean().sqrt().item()


def calibrate_radius(
    delta: Callable[[torch.Tensor], torch.Tensor],
    d: int,
    scale: float,
    share: float = 0.5,
    k: int = 30,
    seed: int = 0,
    device=None,
    curve: list | None = None,
    tol: float = 1e-3,
) -> tuple[float, float]:
    """The ``R`` where the non-linear share of the response is ``share``: bisection in log space on
    ``[1e-3, 1e2] * scale`` (``scale``: the typical residual norm at the source) to ``tol`` (in log R),
    the share averaged over ``k`` random directions. Returns ``(R, share at R)``; ``curve`` (a list)
    receives every ``(R, share)`` the search evaluated."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(k, d, generator=gen), dim=-1).to(device)
    eps = 1e-3 * scale
    lo, hi = math.log(1e-3 * scale), math.log(1e2 * scale)

    def f(lr):
        v = nonlinear_share(delta, dirs, math.exp(lr), eps)
        if curve is not None:
            curve.append((math.exp(lr), v))
        return v - share

    if f(lo) > 0 or f(hi) < 0:  # no crossing: the nearer end
        r = lo if f(lo) > 0 else hi
        return math.exp(r), f(r) + share
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
        if hi - lo < tol:
            break
    r = math.exp((lo + hi) / 2)
    return r, nonlinear_share(delta, dirs, r, eps)


def auto_radius(sl: Slice, seed: int = 0, device=None, k: int = 30, tol: float = 1e-3) -> tuple[float, dict]:
    """DCT's radius rule on a slice: ``R`` where the non-linear share of what the blocks between source
    and target write (``Delta(theta) - theta``: the skip connection carries ``theta`` through unchanged,
    a linear part that never lets the share reach 0.5) is 0.5, searched around the mean residual norm
    at the source (``k`` directions, ``tol`` in log R: :func:`calibrate_radius`). Returns ``(R, info)``."""
    scale = sum(g.h0.norm(dim=-1).sum().item() for g in sl.groups) / sum(
        g.h0.shape[0] * g.h0.shape[1] for g in sl.groups
    )
    curve: list = []
    r, share = calibrate_radius(
        lambda th: sl.mean_delta(th) - th, sl.d_model, scale, k=k, seed=seed, device=device, curve=curve, tol=tol
    )
    return r, {
        "rule": "non-linear share of the blocks' response = 0.5",
        "share": share,
        "source_resid_norm": scale,
        "curve": sorted(set(curve)),
    }


def random_vectors(n: int, d: int, radius: float, seed: int, device=None) -> torch.Tensor:
    """``n`` Gaussian directions at norm ``radius`` [n, d] (the baseline)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    return radius * torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1).to(device)
