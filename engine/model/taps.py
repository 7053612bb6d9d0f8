"""Gradient taps and the attribution passes built on them, for every method that needs a backward.

A gradient tap (:class:`Grad`) is the identity in the forward and hands the gradient at a site to a
hook in the backward, so a method reduces it where it is (no gradient cache). :func:`graph_forward`
starts the autograd graph at the input embeddings, :func:`frozen` keeps parameters out of it, and
:func:`integrated_gradients` runs the steps of the input path (AtP-IG, EAP-IG; one step: AtP, EAP).
Nothing here knows a method; node and edge attribution (:mod:`causalscan.patching`,
:mod:`causalscan.circuits`) and elicitation (:mod:`causalscan.steering`) use it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from causalscan.model import runner
from causalscan.model.adapters import Adapter


class Grad(torch.autograd.Function):
    """Identity in the forward; hands ``grad`` to ``hook`` in the backward (``Grad.tap(hook)``: a tap
    function for :func:`causalscan.model.runner.forward`)."""

    @staticmethod
    def forward(ctx, x, hook):
        ctx.hook = hook
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.hook(grad)
        return grad, None

    @classmethod
    def tap(cls, hook):
        return lambda x: cls.apply(x, hook)


@contextmanager
def frozen(model: torch.nn.Module):
    """Parameters without ``requires_grad`` for the duration: backwards compute activation gradients only."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _leaf(mod, args, out):
    """A forward hook making a module's output a graph leaf (the base run's graph starts there)."""
    return out.detach().requires_grad_()


def graph_forward(ad: Adapter, ids: torch.Tensor, taps, noise: torch.Tensor | None, keep: int) -> torch.Tensor:
    """``runner.forward`` whose autograd graph starts at the input embeddings (no parameter or
    embedding-table gradient); logits [B, keep, V]."""
    handle = ad.model.get_input_embeddings().register_forward_hook(_leaf)
    try:
        return runner.forward(ad, ids, taps, noise=noise, logits_to_keep=keep)
    finally:
        handle.remove()


def input_path(
    ad: Adapter,
    base_ids: torch.Tensor,
    other_ids: torch.Tensor,
    base_noise: torch.Tensor | None,
    other_noise: torch.Tensor | None,
    steps: int,
):
    """The embedding noise of each IG step ``k = 0 .. steps - 1`` on the base run: the base run's own
    noise plus ``(k / steps) (e_other + other_noise - e_base - base_noise)`` ``[B, T, d]``."""
    embed = ad.model.get_input_embeddings()
    with torch.no_grad():
        step = embed(other_ids) - embed(base_ids)
        step = step + (0 if other_noise is None else other_noise) - (0 if base_noise is None else base_noise)
    for k in range(steps):
        yield step * (k / steps) if base_noise is None else base_noise + step * (k / steps)


def integrated_gradients(
    ad: Adapter,
    base_ids: torch.Tensor,
    other_ids: torch.Tensor,
    metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    taps: Callable[[int], list[runner.TapSpec]],
    steps: int,
    other_logits: torch.Tensor,
    base_is_clean: bool,
    base_noise: torch.Tensor | None = None,
    other_noise: torch.Tensor | None = None,
    keep: int = 1,
    first: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps ``k = 0 .. steps - 1`` of the input path (:func:`input_path`): a forward of the base rows
    with ``taps(k)`` and its graph from the embeddings, the metric, and its backward, in which the
    taps' hooks take the step's share (parameters frozen). Step 0 is the base run itself: ``first()``,
    if given, runs after its forward. Returns the base metric [P] and the clean log-probabilities
    ``[P, keep, V]`` (the base run's when ``base_is_clean``, else those of ``other_logits``).

    ``metric(logits [P, keep, V], clean_logprobs [P, keep, V]) -> [P]``.
    """
    with frozen(ad.model), torch.enable_grad():
        for k, noise in enumerate(input_path(ad, base_ids, other_ids, base_noise, other_noise, steps)):
            logits = graph_forward(ad, base_ids, taps(k), noise, keep)
            if k == 0:
                if first is not None:
                    first()
                clean_logprobs = (logits.detach() if base_is_clean else other_logits).float().log_softmax(-1)
            m = metric(logits, clean_logprobs)
            m.sum().backward()
            if k == 0:
                base_m = m.detach()
    return base_m, clean_logprobs
