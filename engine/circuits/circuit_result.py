"""The result of :func:`causalscan.circuit`: every edge's score, the exact effects of the confirmed
edges and the faithfulness curve, with the circuit as JSON, Graphviz and report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from causalscan import files
from causalscan.circuits.graph import Graph
from causalscan.errors import check_options
from causalscan.patching.agreement import summary, untrusted
from causalscan.results import Result, write

THRESHOLDS = (0.8, 0.95)  # the faithfulness the edge counts are reported at


@dataclass(kw_only=True)
class CircuitResult(Result):
    """Edge scores ``scores`` ``[n_up, n_read]`` (mean over pairs; 0 off the graph) of ``method``;
    after confirmation ``confirmed`` [m] flat edge ids (``u * n_read + r``; the first ``n_top`` the
    estimated top, then a random sample) and ``exact`` [P, m] their exact effects; with the curve,
    ``curve_n`` circuit sizes and ``curve`` [P, len(curve_n)] the metric with every other edge
    ablated."""

    FILE: ClassVar[str] = "circuit.json"
    RESUMES: ClassVar[bool] = True

    graph: Graph
    method: str
    direction: str
    scores: torch.Tensor
    size: int
    ablation: str = "patch"
    ig_steps: int | None = None
    confirmed: torch.Tensor | None = None
    n_top: int = 0
    exact: torch.Tensor | None = None
    agreement: dict | None = None
    curve_n: list[int] | None = None
    curve: torch.Tensor | None = None

    def ranked(self) -> torch.Tensor:
        """Flat ids of the graph's edges, highest ``|score|`` first (ties: graph order)."""
        ids = self.graph.valid().flatten().nonzero().flatten()
        return ids[self.scores.flatten()[ids].abs().argsort(descending=True, stable=True)]

    def n_rows(self) -> int:
        return int(self.graph.valid().sum())

    @property
    def faithfulness(self) -> dict | None:
        """``{"n": sizes, "recovered": share of clean - corrupt per size, "n_80", "n_95"}`` (the
        smallest measured size reaching 80% / 95%, None if none does)."""
        if self.curve is None:
            return None
        gap = (self.clean.mean() - self.corrupt.mean()).item()
        rec = [(c - self.corrupt.mean().item()) / gap if gap else math.nan for c in self.curve.mean(0).tolist()]
        first = {
            f"n_{int(100 * t)}": next((n for n, r in zip(self.curve_n, rec, strict=True) if r >= t), None)
            for t in THRESHOLDS
        }
        return {"n": self.curve_n, "recovered": rec, **first}

    def top(self, k: int = 10) -> list[dict]:
        """The ``k`` edges of highest |score|: names, score and (if confirmed) the exact effect."""
        g = self.graph
        exact = (
            {}
            if self.confirmed is None
            else dict(zip(self.confirmed.tolist(), self.exact.mean(0).tolist(), strict=True))
        )
        rows = []
        for rank, e in enumerate(self.ranked()[:k].tolist()):
            u, r = divmod(e, g.n_read)
            rows.append(
                {
                    "rank": rank,
                    "edge": g.edge_name(u, r),
                    "upstream": g.node_name(u),
                    "reader": g.reader_name(r),
                    "reader_node": g.reader_node(r),
                    "score": self.scores[u, r].item(),
                    "exact": exact.get(e),
                }
            )
        return rows

    def tensors(self) -> dict[str, torch.Tensor]:
        """``<method>/edges`` [n_up, n_read]; ``exact/edges`` [n_up, n_read] (NaN where not confirmed);
        ``faithfulness`` [len(curve_n)] (share recovered)."""
        out = {f"{self.method}/edges": self.scores}
        if self.confirmed is not None:
            ex = torch.full((self.scores.numel(),), float("nan"))
            ex[self.confirmed] = self.exact.mean(0)
            out["exact/edges"] = ex.view_as(self.scores)
        if self.curve is not None:
            out["faithfulness"] = torch.tensor(self.faithfulness["recovered"])
        return out

    def to_json(self, top: int | None = None) -> dict:
        """The document: settings, the circuit (its ``size`` top edges; more with ``top``) with the
        nodes they join, agreement and faithfulness."""
        check_options(top=top)
        edges_ = self.top(self.size if top is None else max(top, self.size))
        nodes = sorted({e["upstream"] for e in edges_} | {e["reader_node"] for e in edges_})
        settings = {
            "method": self.method,
            "ig_steps": self.ig_steps,
            "direction": self.direction,
            "size": self.size,
            "ablation": self.ablation,
            "edges_in_graph": self.n_rows(),
            "confirmed": {
                "top": self.n_top,
                "random": 0 if self.confirmed is None else len(self.confirmed) - self.n_top,
            },
        }
        return self._document(
            "circuit", settings, nodes=nodes, edges=edges_, agreement=self.agreement, faithfulness=self.faithfulness
        )

    def save(self, out_dir, top: int | None = None):
        """``circuit.json``, ``scores.safetensors`` and ``circuit.dot`` into ``out_dir``."""
        out = write(out_dir, self.tensors(), self.to_json(self.TOP if top is None else top), self.FILE)
        files.write(out / "circuit.dot", self.to_dot())
        return out

    def notes(self, doc: dict) -> list[str]:
        out = [f"circuit: {self.n_rows()} edges scored, {len(self.clean)} pairs, {doc['timings']['total_s']:.2f}s"]
        a = doc["agreement"]
        if a and untrusted(a):
            out.append(
                f"warning: the edge estimates disagree with exact edge patching on {a['n']} confirmed edges "
                f"(sign {a['sign_agreement']:.2f}, spearman {a['spearman']:.2f}); try --method eap-ig or "
                "more --ig-steps"
            )
        return out

    def lines(self, doc: dict) -> list[str]:
        out = [f"{'edge':<36} {'score':>10} {'exact':>10}"]
        for row in doc["edges"][:10]:
            ex = "" if row["exact"] is None else f"{row['exact']:+10.4f}"
            out.append(f"{row['edge']:<36} {row['score']:+10.4f} {ex:>10}")
        a, f = doc["agreement"], doc["faithfulness"]
        if a:
            out.append(f"agreement on {a['n']} confirmed edges {summary(a)}")
        if f:
            shares = ", ".join(f"{n}: {r:.2f}" for n, r in zip(f["n"], f["recovered"], strict=True))
            out.append(
                f"faithfulness (share of clean - corrupt kept by the top n edges): {shares}; "
                f"80% at {f['n_80']}, 95% at {f['n_95']} edges"
            )
        return out

    def to_dot(self) -> str:
        """The circuit (its ``size`` top edges) as a Graphviz digraph: blue positive, red negative,
        pen width by |score|, the reader kind (q, k, v) on the edge."""
        return to_dot(self.top(self.size))


def to_dot(edges_: list[dict]) -> str:
    """Graphviz text of ranked edge rows (``top``), nodes ranked by layer."""

    def q(s):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    big = max((abs(e["score"]) for e in edges_), default=1.0) or 1.0
    lines = ["digraph circuit {", "  rankdir=BT;", "  node [shape=box, fontname=Helvetica];"]
    for e in edges_:
        kind = e["reader"].rsplit(".", 1)[-1]
        colour = "#2166ac" if e["score"] >= 0 else "#b2182b"
        width = 0.5 + 4.5 * abs(e["score"]) / big
        label = f', label="{kind}"' if kind in ("q", "k", "v") else ""
        lines.append(f'  {q(e["upstream"])} -> {q(e["reader_node"])} [color="{colour}", penwidth={width:.2f}{label}];')
    lines.append("}")
    return "\n".join(lines) + "\n"
