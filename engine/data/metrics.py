"""Behaviour metrics: one scalar per prompt from the logits at the answer position.

A metric is called as ``metric(logits [B, V], answer [B], wrong [B], clean_logprobs [B, V])`` and
returns ``[B]``; any callable with that signature works. Results are reported raw and normalised
``(L - L_corrupt) / (L_clean - L_corrupt)`` (clean = 1, corrupt = 0) over the dataset means.

Answers of several tokens are scored by teacher forcing: each continuation (the answer, and for
``logit_diff`` the wrong one) runs as its own row, the prompt followed by the continuation, and
``S = sum_k log p(c_k | prompt, c_<k)`` is read from its last ``K`` positions. ``logprob`` is the
answer's ``S``, ``logit_diff`` the answer's minus the wrong's, ``prob`` ``exp(S)`` and ``kl`` the
KL summed over the answer's positions. Each is a sum over a pair's rows of a row value
(:func:`continuation`), so patching and attribution score rows independently and add them up.
One-token datasets keep the one-position metrics above, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.nn.functional import log_softmax

from causalscan.errors import InputError

MetricFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _pick(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, ids[:, None])[:, 0]


def logit_diff(logits, answer, wrong, clean_logprobs=None):
    """``logit[answer] - logit[wrong]``."""
    if (wrong < 0).any():
        raise InputError("logit_diff needs a 'wrong' token on every pair", field="wrong")
    return _pick(logits, answer) - _pick(logits, wrong)


def logprob(logits, answer, wrong=None, clean_logprobs=None):
    """``log p(answer)``."""
    return _pick(log_softmax(logits.float(), -1), answer)


def prob(logits, answer, wrong=None, clean_logprobs=None):
    """``p(answer)``."""
    return logprob(logits, answer).exp()


def kl(logits, answer=None, wrong=None, clean_logprobs=None):
    """``KL(p_clean || p)`` at the answer position."""
    lp = log_softmax(logits.float(), -1)
    return (clean_logprobs.exp() * (clean_logprobs - lp)).sum(-1)


METRICS: dict[str, MetricFn] = {"logit_diff": logit_diff, "logprob": logprob, "prob": prob, "kl": kl}


class Labels(NamedTuple):
    """What rows are scored against: first tokens ``answer``/``wrong`` [B] (-1: none); for rows of
    multi-token answers the continuation ``targets`` [B, K] (-1 past its end) and ``sign`` [B]
    (+1 the answer's row, -1 the wrong's), else None."""

    answer: torch.Tensor
    wrong: torch.Tensor
    targets: torch.Tensor | None = None
    sign: torch.Tensor | None = None

    def take(self, rows) -> Labels:
        """The labels of ``rows`` (an index tensor or a slice)."""
        return Labels(*(None if x is None else x[rows] for x in self))


@dataclass(frozen=True)
class Metric:
    """A named metric. ``metric(logits [B, K, V], labels, clean_logprobs [B, K, V]) -> [B]``: the last
    ``K`` positions of each row (``K = 1`` for one-token answers, where ``fn`` scores the last)."""

    name: str
    fn: MetricFn

    def __call__(self, logits: torch.Tensor, labels: Labels, clean_logprobs: torch.Tensor) -> torch.Tensor:
        if labels.targets is None:
            return self.fn(logits[:, -1], labels.answer, labels.wrong, clean_logprobs[:, -1])
        return continuation(self.name, logits, labels.targets, labels.sign, clean_logprobs)


def continuation(name: str, logits, targets, sign, clean_logprobs) -> torch.Tensor:
    """The row value of a built-in metric for teacher-forced continuations: ``sign * S`` (``logit_diff``,
    ``logprob``), ``exp(S)`` (``prob``) or the summed KL (``kl``), where ``S`` [B] sums
    ``log p(targets[:, k])`` at ``logits[:, k]`` [B, K, V] over the targets that are not -1."""
    lp = log_softmax(logits.float(), -1)
    live = targets >= 0
    if name == "kl":
        return ((clean_logprobs.exp() * (clean_logprobs - lp)).sum(-1) * live).sum(-1)
    s = (lp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * live).sum(-1)
    return s.exp() if name == "prob" else sign * s


def rows_scored(name: str) -> tuple[str, ...]:
    """The continuations a multi-token metric runs as rows: the wrong one only for ``logit_diff``."""
    return ("answer", "wrong") if name == "logit_diff" else ("answer",)


def get(metric: str | MetricFn) -> tuple[str, MetricFn]:
    """``(name, fn)`` for a metric name or a callable."""
    if callable(metric):
        return getattr(metric, "__name__", "custom"), metric
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; metrics: {', '.join(METRICS)}", field="metric")
    return metric, METRICS[metric]


def normalise(value: torch.Tensor, clean: float, corrupt: float) -> torch.Tensor:
    """``(value - corrupt) / (clean - corrupt)``: clean = 1, corrupt = 0."""
    return (value - corrupt) / (clean - corrupt) if clean != corrupt else torch.full_like(value, float("nan"))
