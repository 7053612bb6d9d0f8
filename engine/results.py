"""Result objects: ranked components, tensors per sweep, and their files."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file

from causalscan import files
from causalscan.errors import InputError, check_options
from causalscan.metrics import normalise
from causalscan.sweeps import Sweep


@dataclass(kw_only=True)
class Result:
    """What every result records: the model and dataset it ran on, the metric and corruption, the
    unpatched ``clean`` and ``corrupt`` metrics [P] (means over each pair's rows), and timings.

    Subclasses give ``tensors()`` (per-sweep tensors, ``scores.safetensors``), ``top(k)`` (ranked
    rows), ``to_json()`` and ``FILE``, the JSON document's name.
    """

    FILE: ClassVar[str] = "scan.json"
    TOP: ClassVar[int] = 50

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
        return _write(out_dir, self.tensors(), self.to_json(self.TOP if top is None else top), self.FILE)

    def report(self, path: str | Path, top: int | None = None) -> Path:
        """Write the self-contained HTML report (:mod:`causalscan.report`) to ``path``."""
        from causalscan import report

        files.write(Path(path), report.render(self._doc(top), self.tensors()))
        return Path(path)

    def figure(self, name: str):
        """One figure of the report as a plotly ``Figure`` (``"atp*/head"``, ``"agreement/head"``,
        ``"exact/resid_pre"``, ``"trace/mlp"``)."""
        from causalscan import report

        figs = report.figures(self._doc(), self.tensors())
        if name not in figs:
            raise InputError(f"no figure {name!r}; this result has {', '.join(figs)}", field="name")
        return figs[name]

    def _repr_html_(self) -> str:
        from causalscan import report

        return report.repr_html(self._doc(20))

    def _doc(self, top: int | None = None) -> dict:
        """The saved document, as :func:`causalscan.report` reads it back (strict JSON: NaN as null)."""
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


@dataclass(kw_only=True)
class PatchResult(Result):
    """Exact patching: metric under each patch, per pair.

    ``patched`` [P, n]; ``clean``/``corrupt`` [P]; ``effect`` = patched - base run [P, n].
    """

    direction: str
    components: list
    sweeps: list[Sweep]
    patched: torch.Tensor
    tokens: list[str] | None = None  # the first pair's prompt, for figure axes

    @property
    def base(self) -> torch.Tensor:
        return self.clean if self.direction == "noising" else self.corrupt

    @property
    def effect(self) -> torch.Tensor:
        """``L(patched) - L(base)`` per pair and component, [P, n]."""
        return self.patched - self.base[:, None]

    def summary(self) -> dict[str, torch.Tensor]:
        """Per component [n]: signed mean effect, mean |effect|, normalised patched metric."""
        clean, corrupt = self.clean.mean().item(), self.corrupt.mean().item()
        return {
            "exact": self.effect.mean(0),
            "exact_abs": self.effect.abs().mean(0),
            "exact_norm": normalise(self.patched.mean(0), clean, corrupt),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"exact/head": [L, H], "exact_abs/head": ..., "exact_norm/head": ...}`` per sweep."""
        return _per_sweep(self.summary(), self.sweeps)

    def top(self, k: int = 10) -> list[dict]:
        """The ``k`` components of largest mean |effect|, with their statistics."""
        summ = self.summary()
        order = summ["exact_abs"].argsort(descending=True)[:k]
        return [
            {
                **_component_row(self.components[j]),
                "exact": summ["exact"][j].item(),
                "exact_abs": summ["exact_abs"][j].item(),
                "exact_norm": summ["exact_norm"][j].item(),
            }
            for j in order.tolist()
        ]

    def to_json(self, top: int = 50) -> dict:
        check_options(top=top)
        settings = {"direction": self.direction, "sweeps": _shapes(self.sweeps), "roles": _roles(self.sweeps)}
        return self._document("patch", settings, tokens=self.tokens, components=self.top(top))


def _write(out_dir: str | Path, tensors: dict[str, torch.Tensor], doc: dict, name: str = "scan.json") -> Path:
    """``scores.safetensors`` and ``name`` (strict JSON: NaN as null) into ``out_dir``."""
    out = files.out_dir(out_dir)
    tensors = {k: v.float().cpu() for k, v in tensors.items()}
    files.write(out / "scores.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    files.write(out / name, files.strict_json(doc))
    return out


def _per_sweep(vectors: dict[str, torch.Tensor], sweeps, names: dict[str, str] | None = None) -> dict:
    """``{"<kind>/<sweep>": [sweep shape]}``: each per-component vector [n] cut into its sweeps
    (``kind`` renamed by ``names``)."""
    return {
        f"{(names or {}).get(kind, kind)}/{s.name}": vec[s.start : s.stop].reshape(s.shape).contiguous()
        for kind, vec in vectors.items()
        for s in sweeps
    }


def _shapes(sweeps) -> dict[str, list[int]]:
    return {s.name: list(s.shape) for s in sweeps}


def _roles(sweeps) -> list[str] | None:
    """The named positions by-position sweeps ran over (their axis labels), or None."""
    return next((list(s.roles) for s in sweeps if s.roles), None)


def _component_row(c) -> dict:
    return {"component": str(c), "site": c.site, "layer": c.layer, "index": c.index, "position": c.position}


@dataclass(kw_only=True)
class ScanResult(Result):
    """An attribution scan: per-pair estimates of every node, and the exact check of some.

    ``signed`` [P, n]: AtP (QK-fixed for q/k nodes under AtP*; AtP-IG over ``ig_steps``);
    ``graddrop`` [P, n] or None: the GradDrop score; ``score`` [P, n]: the ranking score (per-pair ``|AtP|``, under AtP*
    ``max(|AtP|, GradDrop)``); ``clean``/``corrupt`` [P]. After
    confirmation: ``confirmed`` [m] node ids (the first ``n_top`` the estimated top, the rest a
    random sample, then each sweep's own top and random sample), ``exact`` [P, m] exact effects,
    ``agreement`` (pooled) and ``agreement_by_sweep`` (see ``scan.agreement``).
    """

    direction: str
    method: str
    graddrop: torch.Tensor | None
    components: list
    sweeps: list[Sweep]
    signed: torch.Tensor
    score: torch.Tensor
    confirmed: torch.Tensor | None = None
    n_top: int = 0
    exact: torch.Tensor | None = None
    agreement: dict | None = None
    false_negatives: dict | None = None
    ig_steps: int | None = None
    ig_path: str | None = None
    agreement_by_sweep: dict | None = None
    scored_by: dict | None = None  # sweep name -> "exact" or the estimating method
    tokens: list[str] | None = None  # the first pair's prompt, for figure axes
    patterns: dict[str, torch.Tensor] = field(default_factory=dict)  # top heads' attention [T, T], first pair

    def summary(self) -> dict[str, torch.Tensor]:
        """Per node [n]: ``score`` (ranking), ``estimate`` (signed mean), and for confirmed nodes
        ``exact`` (signed mean) and ``exact_abs`` (mean |effect|), NaN elsewhere."""
        n = len(self.components)
        out = {
            "score": self.score.mean(0),
            "estimate": self.signed.mean(0),
            "exact": torch.full((n,), float("nan")),
            "exact_abs": torch.full((n,), float("nan")),
        }
        if self.graddrop is not None:
            out["graddrop"] = self.graddrop.mean(0)
        if self.confirmed is not None:
            out["exact"][self.confirmed] = self.exact.mean(0)
            out["exact_abs"][self.confirmed] = self.exact.abs().mean(0)
        for sw in self.sweeps:
            if (self.scored_by or {}).get(sw.name) == "exact":  # signed holds exact effects
                out["exact"][sw.start : sw.stop] = self.signed[:, sw.start : sw.stop].mean(0)
                out["exact_abs"][sw.start : sw.stop] = self.signed[:, sw.start : sw.stop].abs().mean(0)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"atp*/head": [L, H] score, "atp*_signed/head": ..., "graddrop/head": ..., "exact/head": ...,
        "exact_abs/head": ...}`` (exact effects NaN where not confirmed), and ``pattern/<head>`` [T, T]:
        the top heads' attention on the first pair."""
        names = {
            "score": self.method,
            "estimate": f"{self.method}_signed",
            "exact": "exact",
            "exact_abs": "exact_abs",
            "graddrop": "graddrop",
        }
        return {
            **_per_sweep(self.summary(), self.sweeps, names),
            **{f"pattern/{name}": p for name, p in self.patterns.items()},
        }

    def top(self, k: int = 10) -> list[dict]:
        """The ``k`` nodes of highest score, with estimate and (if confirmed) exact effect."""
        summ = self.summary()
        order = summ["score"].argsort(descending=True)[:k]

        def num(x):
            v = x.item()
            return None if math.isnan(v) else v

        return [
            {
                **_component_row(self.components[j]),
                "score": summ["score"][j].item(),
                "estimate": summ["estimate"][j].item(),
                "exact": num(summ["exact"][j]),
                "exact_abs": num(summ["exact_abs"][j]),
                **({"graddrop": summ["graddrop"][j].item()} if "graddrop" in summ else {}),
            }
            for j in order.tolist()
        ]

    def to_json(self, top: int = 50) -> dict:
        check_options(top=top)
        settings = {
            "method": self.method,
            "ig_steps": self.ig_steps,
            "ig_path": self.ig_path,
            "scored_by": self.scored_by,
            "graddrop": self.graddrop is not None,
            "direction": self.direction,
            "sweeps": _shapes(self.sweeps),
            "roles": _roles(self.sweeps),
            "confirmed": {
                "top": self.n_top,
                "random": 0 if self.confirmed is None else len(self.confirmed) - self.n_top,
            },
        }
        return self._document(
            "scan",
            settings,
            tokens=self.tokens,
            components=self.top(top),
            agreement=self.agreement,
            agreement_by_sweep=self.agreement_by_sweep,
            false_negatives=self.false_negatives,
        )


@dataclass(kw_only=True)
class TraceResult(Result):
    """Causal tracing: ``effects[grid]`` [P, T, L] of ``metric(restored) - metric(corrupt)`` per pair
    (means over noise samples); ``clean``/``corrupt`` [P]; ``tokens``: the first pair's tokens,
    ``span``: its noised token positions (None for token pairs)."""

    FILE: ClassVar[str] = "trace.json"
    TOP: ClassVar[int] = 20

    window: int
    effects: dict[str, torch.Tensor]
    tokens: list[str]
    span: tuple[int, int] | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """``trace/<grid>`` [T, L] mean effect and ``trace_norm/<grid>``: its share of clean - corrupt."""
        gap = self.clean.mean().item() - self.corrupt.mean().item()
        out = {}
        for name, e in self.effects.items():
            out[f"trace/{name}"] = e.mean(0)
            out[f"trace_norm/{name}"] = e.mean(0) / gap if gap else torch.full_like(e[0], float("nan"))
        return out

    def top(self, k: int = 10, grid: str | None = None) -> list[dict]:
        """The ``k`` restorations of largest mean effect (over every grid, or one)."""
        t = self.tensors()
        cells = [
            (name, pos, layer)
            for name in ([grid] if grid else self.effects)
            for pos in range(len(self.tokens))
            for layer in range(self.effects[name].shape[-1])
        ]
        vals = torch.tensor([t[f"trace/{n}"][p, la].item() for n, p, la in cells])
        return [
            {
                "grid": cells[j][0],
                "position": cells[j][1],
                "token": self.tokens[cells[j][1]],
                "layer": cells[j][2],
                "effect": vals[j].item(),
                "recovered": t[f"trace_norm/{cells[j][0]}"][cells[j][1], cells[j][2]].item(),
            }
            for j in vals.argsort(descending=True)[:k].tolist()
        ]

    def n_rows(self) -> int:
        return sum(e[0].numel() for e in self.effects.values())

    def to_json(self, top: int = 20) -> dict:
        check_options(top=top)
        return self._document(
            "trace",
            {"window": self.window, "direction": "denoising"},
            tokens=self.tokens,
            span=list(self.span) if self.span else None,
            grids={k: v.tolist() for k, v in self.tensors().items() if k.startswith("trace/")},
            top=self.top(top),
        )
