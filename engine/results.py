"""What every result of a method on a dataset of pairs shares: the record of what it ran on, its
files (a strict JSON document and ``scores.safetensors``), its report, and the lines the CLI prints.

Each method's result class sits beside the method (``PatchResult`` in :mod:`causalscan.patching.patch`,
``ScanResult``, ``TraceResult``, ``CircuitResult``) and gives ``tensors()``, ``top(k)``, ``to_json()``,
``notes(doc)`` and ``lines(doc)``; ``RESUMES`` says whether an interrupted run of it resumes from its
``--out`` directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file

from causalscan import files
from causalscan.errors import InputError


@dataclass(kw_only=True)
class Result:
    """What every result records: the model and dataset it ran on, the metric and corruption, the
    unpatched ``clean`` and ``corrupt`` metrics [P] (means over each pair's rows), and timings.

    Subclasses give ``tensors()`` (per-sweep tensors, ``scores.safetensors``), ``top(k)`` (ranked
    rows), ``to_json()`` and ``FILE``, the JSON document's name.
    """

    FILE: ClassVar[str] = "scan.json"
    TOP: ClassVar[int] = 50
    RESUMES: ClassVar[bool] = False  # does an interrupted run resume from the partial work in its checkpoint?

    model: str
    dataset: str
    dataset_sha256: str
    metric: str
    clean: torch.Tensor
    corrupt: torch.Tensor
    corruption: dict = field(default_factory=lambda: {"kind": "tokens"})
    timings: dict = field(default_factory=dict)

    def n_rows(self) -> int:
        """Rows of the full ranked table."""
        return len(self.components)

    def to_pandas(self):
        """The full ranked table (``top`` of every row) as a DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.top(self.n_rows()))

    def save(self, out_dir: str | Path, top: int | None = None) -> Path:
        """Write ``FILE`` (strict JSON) and ``scores.safetensors`` into ``out_dir``."""
        return write(out_dir, self.tensors(), self.to_json(self.TOP if top is None else top), self.FILE)

    def report(self, path: str | Path, top: int | None = None) -> Path:
        """Write the self-contained HTML report (:mod:`causalscan.report`) to ``path``."""
        from causalscan import report

        files.write(Path(path), report.render(self._doc(top), self.tensors()))
        return Path(path)

    def figure(self, name: str):
        """One figure of the report as a plotly ``Figure`` (``"auto/head"``, ``"agreement/head"``,
        ``"exact/resid_pre"``, ``"trace/mlp"``)."""
        from causalscan import report

        figs = report.figures(self._doc(), self.tensors())
        if name not in figs:
            raise InputError(f"no figure {name!r}; this result has {', '.join(figs)}", field="name")
        return figs[name]

    def notes(self, doc: dict) -> list[str]:
        """What the CLI prints on stderr about a finished run of ``doc`` (this result's ``to_json``):
        its size and time, and warnings."""
        return []

    def lines(self, doc: dict) -> list[str]:
        """What the CLI prints on stdout without ``--json``: the top rows and the agreement figures."""
        return []

    @classmethod
    def resumes(cls, settings: dict | None = None) -> bool:
        """Whether an interrupted run with ``settings`` (the CLI's options) resumes from its checkpoint."""
        return cls.RESUMES

    def _repr_html_(self) -> str:
        from causalscan import report

        return report.repr_html(self._doc(20))

    def _doc(self, top: int | None = None) -> dict:
        """The saved document, as :mod:`causalscan.report` reads it back (strict JSON: NaN as null)."""
        import json

        return json.loads(files.strict_json(self.to_json(self.TOP if top is None else top)))

    def _document(self, kind: str, settings: dict, **body) -> dict:
        """The JSON document: what ran on what (model, dataset, settings with the metric and
        corruption, baselines), the result's own ``body``, timings and versions."""
        from causalscan.versions import versions

        return {
            "kind": kind,
            "model": self.model,
            "dataset": {"path": self.dataset, "sha256": self.dataset_sha256, "pairs": len(self.clean)},
            "settings": {**settings, "metric": self.metric, "corruption": self.corruption},
            "baselines": {"clean": self.clean.mean().item(), "corrupt": self.corrupt.mean().item()},
            **body,
            "timings": self.timings,
            "versions": versions(),
        }


def write(out_dir: str | Path, tensors: dict[str, torch.Tensor], doc: dict, name: str = "scan.json") -> Path:
    """``scores.safetensors`` and ``name`` (strict JSON: NaN as null) into ``out_dir``."""
    out = files.out_dir(out_dir)
    tensors = {k: v.float().cpu() for k, v in tensors.items()}
    files.write(out / "scores.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    files.write(out / name, files.strict_json(doc))
    return out
