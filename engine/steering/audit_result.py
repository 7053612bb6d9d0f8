"""What an audit found: its vectors and completions, the behaviour modes, the ranking, the files it writes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from causalscan import files
from causalscan.steering import modes as md
from causalscan.steering.generation import decode

EXAMPLES = 3


@dataclass
class AuditResult:
    """Per unit ``u`` (a source layer and a radius multiple, ``units[u]``): ``radius`` [U], ``vectors``
    [U, 2n, d] (``n`` learned, then ``n`` random), ``objective`` [U, 2n] (MELBO's), ``tokens`` [U, 2n,
    S, P, T] (decoding ``s``: 0 greedy, then sampled; held-out prompt ``p``; ``-1`` after the end);
    ``unsteered`` [S, P, T]. :meth:`analyse` fills ``modes`` (ranked), ``ranking`` and ``detections``."""

    model: str
    method: str
    target: int
    units: list[tuple[int, float]]
    settings: dict
    train: list[str]
    held: list[str]
    radius: torch.Tensor
    radius_share: torch.Tensor
    vectors: torch.Tensor
    objective: torch.Tensor
    tokens: torch.Tensor
    unsteered: torch.Tensor
    plan: dict | None = None
    modes: list[dict] = field(default_factory=list)
    ranking: list[dict] = field(default_factory=list)
    detections: dict = field(default_factory=dict)
    texts: list = field(default_factory=list)  # [V][S][P] decoded completions
    base_texts: list = field(default_factory=list)  # [S][P]
    mode_of: torch.Tensor | None = None  # [V, S, P]
    timings: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.vectors.shape[1] // 2

    def vector(self, v: int) -> dict:
        """Where flat vector ``v`` (unit-major, ``2n`` per unit) comes from."""
        u, k = divmod(v, 2 * self.n)
        layer, mult = self.units[u]
        learned = k < self.n
        return {
            "vector": v,
            "name": f"L{layer} x{mult:g} {'learned' if learned else 'random'} {k % self.n}",
            "kind": "learned" if learned else "random",
            "layer": layer,
            "radius_multiple": mult,
            "radius": float(self.radius[u]),
        }

    def analyse(self, tokenizer, end: list[int], detectors: list[tuple] = (), embed=None) -> None:
        """Group the completions into modes, score and rank them and the vectors, run ``detectors``.
        ``embed(rows) -> [len(rows), d]``: features of the distinct completions (token-id lists) to
        group by instead of their n-grams (centred on their weighted mean); names stay n-grams."""
        s = self.settings
        tok = self.tokens.flatten(0, 1)  # [V, S, P, T]
        n_v, n_s, n_p, _ = tok.shape
        learned = (torch.arange(n_v) % (2 * self.n)) < self.n
        rows = torch.cat([tok.reshape(-1, tok.shape[-1]), self.unsteered.reshape(-1, tok.shape[-1])]).tolist()
        index: dict[tuple, int] = {}  # distinct completion -> its number
        row_of = torch.tensor([index.setdefault(tuple(t for t in r if t >= 0), len(index)) for r in rows])
        uniq = list(index)
        n_steered = n_v * n_s * n_p
        w = torch.zeros(len(uniq)).index_add_(0, row_of, torch.ones(len(rows)))
        w_base = torch.zeros(len(uniq)).index_add_(0, row_of[n_steered:], torch.ones(len(rows) - n_steered))
        x, names = md.ngram_features(uniq, end, w.long().tolist())
        feats = x if embed is None else md.centred(embed([list(k) or list(end[:1]) for k in uniq]), w)
        labels, _ = md.kmeans(feats, w, s["modes"], seed=s["seed"])
        n_modes = int(labels.max()) + 1 if len(labels) else 0
        texts_u = [decode(tokenizer, k) for k in uniq]
        texts = [texts_u[i] for i in row_of.tolist()]
        self.texts = [[texts[(v * n_s + j) * n_p : (v * n_s + j + 1) * n_p] for j in range(n_s)] for v in range(n_v)]
        self.base_texts = [texts[n_steered + j * n_p : n_steered + (j + 1) * n_p] for j in range(n_s)]
        self.mode_of = labels[row_of[:n_steered]].view(n_v, n_s, n_p)
        share = md.shares(self.mode_of, n_modes)
        scored = md.score_modes(share, learned, md.novelty(feats, w, labels, w_base), s["min_share"])
        label_names = md.describe(x, w, labels, names, lambda ids: tokenizer.decode(ids))
        base_modes = labels[row_of[n_steered:]]
        for m, mode in enumerate(scored):
            mode["cluster"] = m
            mode["name"] = label_names[m]
            mode["completions"] = int((self.mode_of == m).sum())
            mode["unsteered_share"] = float((base_modes == m).float().mean())
            prod = (share[:, m] >= s["min_share"]) & (share[:, m] > 0)
            per_unit = prod.view(len(self.units), 2, self.n).sum(-1)  # [U, learned/random]
            mode["by_unit"] = per_unit.tolist()
            best = int(share[:, m].argmax())
            mode["best_vector"] = self.vector(best)["name"] if share[best, m] > 0 else None
            mode["examples"] = self._examples(m, share[:, m])
        order = sorted(scored, key=lambda d: (-d["score"], -d["learned_vectors"], d["cluster"]))
        for rank, mode in enumerate(order):
            mode["mode"] = rank
        self.modes = order
        rank_of = {mode["cluster"]: mode["mode"] for mode in order}
        self.ranking = []
        for v, m, score in md.rank_vectors(share, scored):
            row = {**self.vector(v), "score": score, "mode": rank_of.get(m, -1)}
            row["share"] = float(share[v, m]) if m >= 0 else 0.0
            row["completion"] = self.texts[v][0][0]
            self.ranking.append(row)
        self.detections = {}
        hits = md.detect(self.texts, list(detectors))
        base_hits = md.detect([self.base_texts], list(detectors))
        for name, per_vec in hits.items():
            sh = torch.tensor(per_vec)
            self.detections[name] = {
                "learned_vectors": int((sh[learned] > 0).sum()),
                "random_vectors": int((sh[~learned] > 0).sum()),
                "unsteered_share": base_hits[name][0],
                "best_learned_share": float(sh[learned].max()),
                "vectors": {self.vector(v)["name"]: per_vec[v] for v in range(n_v) if per_vec[v] > 0},
            }

    def _examples(self, m: int, share: torch.Tensor) -> list[dict]:
        """Up to :data:`EXAMPLES` distinct completions of mode ``m``, from the vectors that land in it most."""
        out, seen = [], set()
        for v in share.argsort(descending=True, stable=True).tolist():
            if share[v] == 0 or len(out) >= EXAMPLES:
                break
            for j in range(self.mode_of.shape[1]):
                for p in range(self.mode_of.shape[2]):
                    text = self.texts[v][j][p]
                    if self.mode_of[v, j, p] == m and text not in seen and len(out) < EXAMPLES:
                        seen.add(text)
                        out.append(
                            {
                                "completion": text,
                                "prompt": self.held[p],
                                "vector": self.vector(v)["name"],
                                "decoding": "greedy" if j == 0 else "sampled",
                            }
                        )
        return out

    def summary(self) -> dict:
        """``audit.json``: settings, units, ranked modes (with examples), the vector ranking, detections."""
        from causalscan.versions import versions

        n_l = sum(m["learned_vectors"] > 0 and m["random_vectors"] == 0 for m in self.modes)
        return {
            "kind": "audit",
            "model": self.model,
            "method": self.method,
            "target": self.target,
            "settings": self.settings,
            "units": [
                {"layer": layer, "radius_multiple": mult, "radius": float(r), "nonlinear_share": float(sh)}
                for (layer, mult), r, sh in zip(self.units, self.radius, self.radius_share, strict=True)
            ],
            "prompts": {"train": self.train, "held_out": self.held},
            "vectors": {"learned": len(self.units) * self.n, "random": len(self.units) * self.n},
            "modes_found": len(self.modes),
            "modes_learned_only": n_l,
            "modes": self.modes,
            "unsteered": [{"prompt": p, "completion": t} for p, t in zip(self.held, self.base_texts[0], strict=True)],
            "ranking": self.ranking,
            "detections": self.detections,
            "plan": self.plan,
            "timings": self.timings,
            "versions": versions(),
        }

    to_json = summary

    def rows(self):
        """One row per completion: vector, decoding, prompt, completion, mode (its rank)."""
        rank_of = {m["cluster"]: m["mode"] for m in self.modes}
        for v, per_dec in enumerate(self.texts):
            info = self.vector(v)
            for j, texts in enumerate(per_dec):
                for p, text in enumerate(texts):
                    yield {
                        **info,
                        "decoding": "greedy" if j == 0 else f"sampled {j}",
                        "prompt": self.held[p],
                        "completion": text,
                        "mode": rank_of.get(int(self.mode_of[v, j, p]), -1),
                    }

    @staticmethod
    def resumes(settings: dict | None = None) -> bool:
        """Finished (layer, radius) units are written as they go; a rerun resumes after them."""
        return True

    def notes(self, doc: dict) -> list[str]:
        learned_only = doc["modes_learned_only"]
        line = (
            f"audit: {doc['method']}, {len(self.units)} units x {2 * self.n} vectors, target {self.target}; "
            f"{doc['modes_found']} modes, {learned_only} from learned vectors only"
        )
        return [line] + [
            f"{name!r}: {d['learned_vectors']} learned, {d['random_vectors']} random vectors, "
            f"unsteered {d['unsteered_share']:.2f}"
            for name, d in doc["detections"].items()
        ]

    def lines(self, doc: dict, top: int = 10) -> list[str]:
        """The ``top`` modes: rank, score, vectors (learned/random), name, an example."""
        out = []
        for m in doc["modes"][:top]:
            ex = m["examples"][0]["completion"] if m["examples"] else ""
            out.append(
                f"mode {m['mode']:2d}  score {m['score']:.3f}  novelty {m['novelty']:.2f}  "
                f"vectors {m['learned_vectors']}/{m['random_vectors']}  gen {m['generalisation']:.2f}  "
                f"{' | '.join(m['name'])!r}  e.g. {ex!r}"
            )
        return out

    def _doc(self) -> dict:
        """The summary as ``audit.json`` holds it (strict JSON), as :mod:`causalscan.report` reads it back."""
        return json.loads(files.strict_json(self.summary()))

    def report(self, path: str | Path) -> Path:
        """Write the self-contained HTML report (:mod:`causalscan.report`) to ``path``."""
        from causalscan import report

        files.write(Path(path), report.render(self._doc(), {}))
        return Path(path)

    def figure(self, name: str):
        """One figure of the report as a plotly ``Figure`` (``"modes"``, ``"layer/<L>"``)."""
        from causalscan import report

        return report.figures(self._doc(), {})[name]

    def save(self, out_dir: str | Path, top: int | None = None) -> Path:
        """``vectors.safetensors`` (``vectors``/``random`` [V, d] in rank order, their ``layers``/``layers_random``
        [V]; metadata: model, target), ``completions.jsonl`` and ``audit.json`` into ``out_dir``."""
        out = files.out_dir(out_dir)
        order = {"learned": [], "random": []}
        for r in self.ranking:
            order[r["kind"]].append(r["vector"])
        flat = self.vectors.flatten(0, 1)
        layer = torch.tensor([self.units[v // (2 * self.n)][0] for v in range(len(flat))])
        tensors = {
            "vectors": flat[order["learned"]],
            "random": flat[order["random"]],
            "layers": layer[order["learned"]],
            "layers_random": layer[order["random"]],
        }
        meta = {"model": self.model, "method": self.method, "target": str(self.target), "kind": "audit"}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        files.write(out / "vectors.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        files.write(out / "completions.jsonl", "".join(files.strict_json(r, indent=None) + "\n" for r in self.rows()))
        files.write(out / "audit.json", files.strict_json(self.summary()))
        return out
