"""What ``scan``, ``patch``, ``trace`` and ``circuit`` run on, prepared once: the loaded model, the
dataset and its token pairs, the metric, the token lengths and the corruption rows.

>>> import causalscan as cs
>>> inp = prepare("induction", cs.zoo.dataset_path("induction"), "logit_diff", direction="noising")
>>> inp.metric, len(inp.pairs), inp.lengths, inp.rows.settings()
('logit_diff', 16, [19], {'kind': 'tokens'})
>>> prepare(inp.model, inp) is inp          # prepared inputs pass through every method as they are
True
"""

from __future__ import annotations

from dataclasses import dataclass

from causalscan.data import corruption
from causalscan.data.corruption import Rows
from causalscan.data.metrics import METRICS, Metric, rows_scored
from causalscan.data.metrics import get as get_metric
from causalscan.data.pairs import Dataset, Pair, as_dataset
from causalscan.errors import InputError, check_options
from causalscan.model.load import Model, load

DIRECTIONS = ("noising", "denoising")


@dataclass
class Inputs:
    """A loaded model, its dataset tokenised into ``pairs`` (prompt token ``lengths``, sorted), the
    metric (its name and the :class:`Metric` the engines call) and the ``rows`` the engines run (one
    per token pair, ``samples`` per noise pair, one per scored continuation of multi-token answers)."""

    model: Model
    dataset: Dataset
    metric: str
    metric_fn: Metric
    pairs: list[Pair]
    lengths: list[int]
    rows: Rows

    def tokens(self) -> list[str]:
        """The first pair's clean prompt, one string per token (figure axes)."""
        tok = self.model.tokenizer
        return [tok.decode([i]) if tok is not None else str(i) for i in self.pairs[0].clean]

    def prepared_with(self, metric: str, metric_fn, samples: int, noise_scale: float, seed: int) -> bool:
        """Were these inputs prepared with this metric and (for noise pairs) this corruption?"""
        rows = self.rows
        noise = rows.draws is None or (rows.samples, rows.scale, rows.seed) == (samples, noise_scale, seed)
        return self.metric == metric and self.metric_fn.fn is metric_fn and noise

    def header(self) -> dict:
        """The fields every result records about what it ran on."""
        return {
            "model": self.model.name,
            "dataset": self.dataset.name,
            "dataset_sha256": self.dataset.sha256,
            "metric": self.metric,
            "corruption": self.rows.settings(),
        }


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be noising or denoising, not {direction!r}", field="direction")


def prepare(
    model,
    dataset,
    metric="logit_diff",
    direction: str | None = None,
    samples: int = corruption.SAMPLES,
    noise_scale: float = corruption.SCALE,
    seed: int = 0,
) -> Inputs:
    """Load ``model`` (a :class:`Model`, a name or a path), read and tokenise ``dataset`` (a
    :class:`Dataset`, a JSONL path or a list of records), resolve ``metric`` and build the rows
    (Gaussian corruption of ``noise_span`` pairs: ``samples`` draws, ``noise_scale``, ``seed``).

    ``dataset`` may be :class:`Inputs` prepared already: they come back as they are when they were
    prepared on this model with this metric and corruption (nothing is read or tokenised twice),
    else they are prepared again from their dataset."""
    check_options(samples=samples, noise_scale=noise_scale, seed=seed)
    if direction is not None:
        check_direction(direction)
    metric_name, metric_fn = get_metric(metric)
    if isinstance(dataset, Inputs):
        if dataset.model is model and dataset.prepared_with(metric_name, metric_fn, samples, noise_scale, seed):
            return dataset
        dataset = dataset.dataset
    model = load(model)
    ds = as_dataset(dataset)
    pairs = ds.tokenize(model.tokenizer, model.vocab_size)
    check_answers(ds, pairs, metric_name, metric_fn)
    rows = corruption.rows(model, pairs, samples, noise_scale, seed, metric=metric_name)
    longest = max(rows.pairs, key=lambda p: len(p.clean))  # a prompt with its answer's continuation
    model.check_length(len(longest.clean), ds.name, longest.line)
    return Inputs(
        model, ds, metric_name, Metric(metric_name, metric_fn), pairs, sorted({len(p.clean) for p in pairs}), rows
    )


def check_answers(ds: Dataset, pairs, name: str, fn) -> None:
    """Multi-token answers need a built-in metric, and ``logit_diff`` a wrong continuation on every pair."""
    multi = [p for p in pairs if p.multi_token]
    if not multi:
        return
    if METRICS.get(name) is not fn:
        raise InputError(
            f"a custom metric scores one-token answers; this answer is {len(multi[0].answer)} tokens "
            f"(multi-token answers take {', '.join(METRICS)})",
            file=ds.name,
            line=multi[0].line,
            field="answer",
        )
    for p in pairs:
        if "wrong" in rows_scored(name) and not p.wrong:
            raise InputError(
                "logit_diff needs a 'wrong' continuation on every pair", file=ds.name, line=p.line, field="wrong"
            )
