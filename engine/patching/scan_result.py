"""The result of :func:`causalscan.scan`: per-pair estimates of every node, the exact effects of the
sweeps patched exactly and of the confirmed sample, and how far each sweep's estimates agree."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from causalscan.data.sweeps import Sweep, per_sweep, role_names, shapes
from causalscan.errors import check_options
from causalscan.patching.agreement import shallow, summary, trust, untrusted
from causalscan.results import Result


@dataclass(kw_only=True)
class ScanResult(Result):
    """An attribution scan: per-pair estimates of every node, and the exact check of some.

    ``signed`` [P, n]: AtP (QK-fixed for q/k nodes under AtP*; AtP-IG over ``ig_steps``);
    ``graddrop`` [P, n] or None: the GradDrop score; ``score`` [P, n]: the ranking score (per-pair ``|AtP|``, under AtP*
    ``max(|AtP|, GradDrop)``); ``clean``/``corrupt`` [P]. After
    confirmation: ``confirmed`` [m] node ids (the first ``n_top`` the estimated top, the rest a
    random sample, then each sweep's own top and random sample), ``exact`` [P, m] exact effects,
    ``agreement`` (pooled) and ``agreement_by_sweep`` (:func:`causalscan.patching.agreement.agreement`).
    """

    RESUMES: ClassVar[bool] = True
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
        """Per node [n]: ``score`` (the estimate's ranking score), ``estimate`` (signed mean), for
        confirmed nodes ``exact`` (signed mean) and ``exact_abs`` (mean |effect|), NaN elsewhere, and
        ``rank``: what the scan ranks by, ``exact_abs`` where measured and ``score`` elsewhere (the
        confirmed top of a sweep is ordered by its exact effects, not by the estimate)."""
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
        measured = ~out["exact_abs"].isnan()
        out["rank"] = torch.where(measured, out["exact_abs"], out["score"])
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"auto/head": [L, H] score, "auto_signed/head": ..., "graddrop/head": ..., "exact/head": ...,
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
            **per_sweep(self.summary(), self.sweeps, names),
            **{f"pattern/{name}": p for name, p in self.patterns.items()},
        }

    def top(self, k: int = 10) -> list[dict]:
        """The ``k`` top nodes (by ``rank``: the exact effect where confirmed, else the estimated
        score), with estimate and (if confirmed) exact effect."""
        summ = self.summary()
        order = summ["rank"].argsort(descending=True)[:k]

        def num(x):
            v = x.item()
            return None if math.isnan(v) else v

        return [
            {
                **self.components[j].row(),
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
            "sweeps": shapes(self.sweeps),
            "roles": role_names(self.sweeps),
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

    def notes(self, doc: dict) -> list[str]:
        by_sweep = doc["agreement_by_sweep"] or {}
        out = [
            f"warning: sweep {name}: its estimates disagree with exact patching on {s['n']} confirmed nodes "
            f"(sign {s['sign_agreement']:.2f}, spearman {s['spearman']:.2f}); rank it by `causalscan patch "
            f"--sites {name}` or --method atp-ig"
            for name, s in by_sweep.items()
            if untrusted(s)
        ]
        out += [
            f"warning: sweep {name}: {shallow(s)}: its top may lie beyond the confirmed nodes; --confirm "
            f"{2 * s['k']} or `causalscan patch --sites {name}` would show it"
            for name, s in by_sweep.items()
            if shallow(s)
        ]
        out += [f"sweep {name}: {trust(s, doc['settings']['scored_by'][name])}" for name, s in by_sweep.items()]
        out.append(f"scan: {len(self.components)} nodes, {len(self.clean)} pairs, {doc['timings']['total_s']:.2f}s")
        by = doc["settings"]["scored_by"]
        if "exact" in by.values():
            estimated = ", ".join(n for n, m in by.items() if m != "exact") or "none"
            exact = ", ".join(n for n, m in by.items() if m == "exact")
            out.append(f"patched exactly: {exact}; estimated: {estimated}")
        return out

    def lines(self, doc: dict) -> list[str]:
        out = [f"{'component':<28} {'score':>10} {'estimate':>10} {'exact':>10}"]
        for row in doc["components"][:10]:
            ex = "" if row["exact"] is None else f"{row['exact']:+10.4f}"
            out.append(f"{row['component']:<28} {row['score']:10.4f} {row['estimate']:+10.4f} {ex:>10}")
        a, by_sweep = doc["agreement"], doc["agreement_by_sweep"]
        if a:
            out.append(f"agreement on {a['n']} confirmed nodes {summary(a)}")
            out += [
                f"  {name:<12} {s['n']:4d} nodes {summary(s)}"
                for name, s in (by_sweep if len(by_sweep) > 1 else {}).items()
            ]
        fn = doc["false_negatives"]
        if fn:
            out.append(
                f"false negatives: no unconfirmed node above {fn['bound']:.4f} (95% one-sided, "
                f"{fn['subsets']} joint patches)"
            )
        return out
