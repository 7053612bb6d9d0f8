"""An attribution graph's result: the adjacency of direct effects, pruning by influence on the logits,
and its files (``graph.json``, ``scores.safetensors``, the circuit-tracer / Neuronpedia graph JSON
and the report).

Nodes, in circuit-tracer's order: the latents that have a row (``features`` [n, 3]: layer,
position, latent), the error nodes (layer-major: ``layer * n_pos + position``), the tokens (the
residual entering block 0 at each position) and the logit targets. ``adjacency [N, N]``: row =
target, column = source; only latents and logits have rows.

**Influence** (as circuit-tracer prunes): with ``A`` the adjacency's absolute values, each row
divided by its sum, and ``w`` the logits' probabilities, a node's influence on the logits is
``w (A + A^2 + ...)`` (the graph has no cycle, so the series ends). Pruning keeps the nodes that
make up ``node_threshold`` of the total influence (tokens and logits always), then the edges that
make up ``edge_threshold`` of the edge scores ``A[t, s] * (influence of t + w_t)``, then drops
latents and errors left without an edge out (and latents without one in), until nothing changes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from causalscan import files
from causalscan.errors import InputError
from causalscan.features import neuronpedia
from causalscan.features.influence import influence, keep_share, normalised


@dataclass
class GraphResult:
    """See the module doc. ``features`` [n, 3] (layer, position, latent), their ``activations`` and
    encoder biases ``b_enc`` [n]; ``target_value`` [N]: each latent's pre-activation and each logit's
    demeaned value (0 for nodes without a row); ``bias`` [N]: a target's value minus the sum of its
    row over every source, the latents without a row of their own included (the biases' part:
    ``b_enc`` on a model without other biases; 0 for nodes without a row)."""

    model: str
    tokens: list[str]
    ids: torch.Tensor
    features: torch.Tensor
    activations: torch.Tensor
    b_enc: torch.Tensor
    n_layers: int
    adjacency: torch.Tensor
    target_value: torch.Tensor
    bias: torch.Tensor
    logit_tokens: torch.Tensor
    logit_probs: torch.Tensor
    logit_strings: list[str]
    n_active: int
    settings: dict
    timings: dict = field(default_factory=dict)
    plan: object = None
    _cache: dict = field(default_factory=dict, repr=False)  # influence and pruning, computed once

    FILE = "graph.json"

    @classmethod
    def build(
        cls, model, ids, features, activations, rows, row_node, target_value, chosen, logit_tokens, logit_probs, **kw
    ) -> GraphResult:
        """The square adjacency over the latents with a row (``chosen``), errors, tokens and logits
        from the rows ``[R, sources]`` the run computed (``row_node``: each row's node)."""
        n_feat, n_cols, n_l = len(features), rows.shape[1], len(logit_tokens)
        keep = torch.cat([chosen, torch.arange(n_feat, n_cols + n_l)])  # old node ids, in the new order
        new_id = torch.full((n_cols + n_l,), -1, dtype=torch.long)
        new_id[keep] = torch.arange(len(keep))
        adj = torch.zeros(len(keep), len(keep))
        adj[new_id[row_node], : len(keep) - n_l] = rows[:, keep[:-n_l]]
        value, bias = torch.zeros(len(keep)), torch.zeros(len(keep))
        value[new_id[row_node]] = target_value
        bias[new_id[row_node]] = target_value - rows.sum(1)
        tok = model.tokenizer

        def text(i: int) -> str:  # a token as text (its id without a tokenizer)
            return str(i) if tok is None else tok.decode([i])

        return cls(
            model=model.name,
            tokens=[text(i) for i in ids.tolist()],
            ids=ids.cpu(),
            features=features[chosen],
            activations=activations[chosen],
            b_enc=torch.tensor(
                [float(model.adapter.dictionaries[layer].b_enc[i]) for layer, _, i in features[chosen].tolist()]
            ),
            n_layers=model.adapter.n_layers,
            adjacency=adj,
            target_value=value,
            bias=bias,
            logit_tokens=logit_tokens,
            logit_probs=logit_probs,
            logit_strings=[text(i) for i in logit_tokens.tolist()],
            n_active=n_feat,
            **kw,
        )

    # layout -----------------------------------------------------------------------------------
    @property
    def n_pos(self) -> int:
        return len(self.ids)

    @property
    def n_features(self) -> int:
        return len(self.features)

    def kind(self, u: int) -> str:
        """``latent``, ``error``, ``token`` or ``logit``."""
        n_f, t = self.n_features, self.n_pos
        if u < n_f:
            return "latent"
        if u < n_f + self.n_layers * t:
            return "error"
        return "token" if u < n_f + (self.n_layers + 1) * t else "logit"

    def where(self, u: int) -> tuple[int, int, int]:
        """``(layer, position, index)`` of node ``u``: a latent's layer, position and latent; an
        error's layer and position (index -1); a token's (layer -1, its id); a logit's (layer
        ``n_layers``, the last position, its token id)."""
        n_f, t = self.n_features, self.n_pos
        k = self.kind(u)
        if k == "latent":
            return tuple(self.features[u].tolist())
        if k == "error":
            layer, pos = divmod(u - n_f, t)
            return layer, pos, -1
        if k == "token":
            pos = u - n_f - self.n_layers * t
            return -1, pos, int(self.ids[pos])
        return self.n_layers, t - 1, int(self.logit_tokens[u - n_f - (self.n_layers + 1) * t])

    def name(self, u: int) -> str:
        layer, pos, i = self.where(u)
        k = self.kind(u)
        if k == "latent":
            return f"L{layer}.F{i}@{pos}"
        if k == "error":
            return f"L{layer}.err@{pos}"
        if k == "token":
            return f"tok@{pos} {self.tokens[pos]!r}"
        return f"logit {self.logit_strings[u - len(self.adjacency) + len(self.logit_tokens)]!r}"

    @property
    def logit_weights(self) -> torch.Tensor:
        w = torch.zeros(len(self.adjacency))
        w[-len(self.logit_tokens) :] = self.logit_probs
        return w

    # pruning ----------------------------------------------------------------------------------
    def node_influence(self) -> torch.Tensor:
        if "influence" not in self._cache:
            self._cache["influence"] = influence(self.adjacency, self.logit_weights)
        return self._cache["influence"]

    def prune(self, node_threshold: float | None = None, edge_threshold: float | None = None):
        """``(node_mask [N], edge_mask [N, N], node influence [N])`` (see the module doc)."""
        node_threshold = self.settings["node_threshold"] if node_threshold is None else node_threshold
        edge_threshold = self.settings["edge_threshold"] if edge_threshold is None else edge_threshold
        key = ("prune", node_threshold, edge_threshold)
        if key not in self._cache:
            self._cache[key] = self._prune(node_threshold, edge_threshold)
        return self._cache[key]

    def _prune(self, node_threshold: float, edge_threshold: float):
        n_keep = len(self.logit_tokens) + self.n_pos  # tokens and logits: always kept
        w = self.logit_weights
        inf = self.node_influence()
        nodes = inf >= keep_share(inf, node_threshold)
        nodes[-n_keep:] = True
        pruned = self.adjacency * (nodes[:, None] & nodes[None, :])
        scores = normalised(pruned)  # becomes the edge scores, in place
        scores.mul_((influence(pruned, w, a=scores) + w)[:, None])
        del pruned
        edges = scores >= keep_share(scores, edge_threshold)
        while True:
            before = nodes.clone()
            edges &= nodes[:, None] & nodes[None, :]
            nodes[:-n_keep] &= edges[:, :-n_keep].any(0)  # latents and errors need an edge out
            nodes[: self.n_features] &= edges[: self.n_features].any(1)  # latents one in
            if torch.equal(nodes, before):
                return nodes, edges, inf

    # files ------------------------------------------------------------------------------------
    def pruned(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """The pruned graph: its nodes (ids, in order), its edges ``[E, 3]`` (source, target as
        positions in that list, weight) and every node's influence [N]."""
        nodes, edges, inf = self.prune()
        kept = nodes.nonzero().flatten()
        at = torch.full((len(nodes),), -1, dtype=torch.long)
        at[kept] = torch.arange(len(kept))
        t, s = edges.nonzero().unbind(1)
        table = torch.stack([at[s].float(), at[t].float(), self.adjacency[t, s]], 1)
        return kept.tolist(), table, inf

    def tensors(self) -> dict[str, torch.Tensor]:
        _, table, _ = self.pruned()
        return {
            "pruned_edges": table,
            "adjacency": self.adjacency,
            "features": self.features.float(),
            "activations": self.activations,
            "target_value": self.target_value,
            "bias": self.bias,
            "influence": self.node_influence(),
            "logit_tokens": self.logit_tokens.float(),
            "logit_probs": self.logit_probs,
            "ids": self.ids.float(),
        }

    def top(self, k: int = 20) -> list[dict]:
        """The ``k`` nodes of most influence on the logits (tokens and logits left out)."""
        inf = self.node_influence()
        body = len(self.adjacency) - len(self.logit_tokens) - self.n_pos
        order = inf[:body].argsort(descending=True)[:k].tolist()
        return [self._node_row(u, inf) for u in order]

    def _node_row(self, u: int, inf: torch.Tensor) -> dict:
        layer, pos, i = self.where(u)
        row = {"node": self.name(u), "kind": self.kind(u), "layer": layer, "position": pos, "influence": inf[u].item()}
        if self.kind(u) == "latent":
            row.update(latent=i, activation=self.activations[u].item())
        return row

    def to_json(self, top: int = 50) -> dict:
        from causalscan.versions import versions

        kept, table, inf = self.pruned()
        rest = self.bias.clone()
        rest[: self.n_features] -= self.b_enc
        return {
            "kind": "graph",
            "model": self.model,
            "prompt": "".join(self.tokens),
            "tokens": self.tokens,
            "settings": self.settings,
            "logits": [
                {"token": s, "id": int(i), "prob": p.item()}
                for s, i, p in zip(self.logit_strings, self.logit_tokens, self.logit_probs, strict=True)
            ],
            "graph": {
                "active_latents": self.n_active,
                "latents": self.n_features,
                "error_nodes": self.n_layers * self.n_pos,
                "tokens": self.n_pos,
                "nodes": len(self.adjacency),
                "edges": int((self.adjacency != 0).sum()),
                "layers": self.n_layers,
                "pruned_nodes": len(kept),
                "pruned_edges": len(table),
                # the largest part of a target no node explains, beyond its encoder bias (0 up to
                # rounding on a model without other biases), and the largest target
                "unexplained": rest.abs().max().item(),
                "largest_target": self.target_value.abs().max().item(),
            },
            "top": self.top(top),
            "edges": [
                {"source": self.name(kept[int(a)]), "target": self.name(kept[int(b)]), "weight": w}
                for a, b, w in table[table[:, 2].abs().argsort(descending=True)[:top]].tolist()
            ],
            "pruned": {"nodes": [self._node_row(u, inf) for u in kept]},
            "memory_plan": None if self.plan is None else self.plan.to_json(),
            "timings": self.timings,
            "versions": versions(),
        }

    def save(self, out_dir: str | Path, top: int | None = None, slug: str = "causalscan-graph") -> Path:
        """``graph.json``, ``scores.safetensors`` and ``graph-files/`` (``<slug>.json`` for the
        circuit-tracer / Neuronpedia front end, and its ``graph-metadata.json``) into ``out_dir``."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", slug):
            raise InputError(f"the slug names a file: letters, digits, '.', '_', '-'; not {slug!r}", field="slug")
        out = files.out_dir(out_dir)
        tensors = {k: v.float().cpu().contiguous() for k, v in self.tensors().items()}
        files.write(out / "scores.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        files.write(out / self.FILE, files.strict_json(self.to_json(50 if top is None else top)))
        front = out / "graph-files"
        front.mkdir(exist_ok=True)
        doc = neuronpedia.export(self, slug)
        files.write(front / f"{slug}.json", json.dumps(doc))
        files.write(front / "graph-metadata.json", json.dumps({"graphs": [doc["metadata"]]}, indent=2))
        return out

    def report(self, path: str | Path, top: int | None = None) -> Path:
        from causalscan import report

        files.write(Path(path), report.render(self._doc(top), self.tensors()))
        return Path(path)

    def _doc(self, top: int | None = None) -> dict:
        return json.loads(files.strict_json(self.to_json(50 if top is None else top)))

    def figure(self, name: str = "graph"):
        from causalscan import report

        return report.figures(self._doc(), self.tensors())[name]

    @classmethod
    def resumes(cls, settings: dict | None = None) -> bool:
        return False

    def notes(self, doc: dict) -> list[str]:
        g = doc["graph"]
        return [
            f"graph: {g['latents']} of {g['active_latents']} active latents with a row, {g['error_nodes']} error "
            f"nodes, {g['tokens']} tokens, {len(doc['logits'])} logits; pruned to {g['pruned_nodes']} nodes and "
            f"{g['pruned_edges']} edges ({doc['timings'].get('total_s', 0):.1f}s)"
        ]

    def lines(self, doc: dict) -> list[str]:
        out = ["logits: " + ", ".join(f"{x['token']!r} {x['prob']:.3f}" for x in doc["logits"])]
        out += ["most influential nodes:"]
        out += [f"  {r['node']:<24} influence {r['influence']:.4f}" for r in doc["top"][:10]]
        return out

    def _repr_html_(self) -> str:
        from causalscan import report

        return report.repr_html(self._doc(20))


__all__ = ["GraphResult"]
