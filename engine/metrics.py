"""Behaviour metrics: one scalar per prompt from the logits at the answer position.

A metric is called as ``metric(logits [B, V], answer [B], wrong [B], clean_logprobs [B, V])`` and
returns ``[B]``; any callable with that signature works. Results are reported raw and normalised
``(L - L_corrupt) / (L_clean - L_corrupt)`` (clean = 1, corrupt = 0) over the dataset means.
"""

from __future__ import annotations

from collections.abc import Callable

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
