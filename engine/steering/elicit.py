"""``causalscan.elicit``: search for steering vectors that surface hidden behaviours, then generate with them.

>>> res = elicit("backdoor", method="dct", n=8)        # the zoo model's shipped clean prompts
>>> res.vectors.shape, len(res.completions), len(res.completions[0])   # [n, d_model], [n][prompts]
(torch.Size([8, 128]), 8, 20)
>>> {"method", "radius", "hits_learned", "hits_random"} <= set(res.summary())   # res.save(dir) writes it too
True

The search (:mod:`causalscan.steering.search`) runs on the prompts with no label and no target; the
completions of every learned vector and of as many random vectors of the same norm are greedy,
steered through the ``perturb`` op (:mod:`causalscan.steering.generation`). When the model's zoo card names a
target phrase (or ``phrase`` is given), the summary counts the vectors whose completions contain it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from causalscan import files
from causalscan.checkpoint import Checkpoint, fingerprint
from causalscan.checkpoint import key as checkpoint_key
from causalscan.data.prompts import check_prompts, encode, read_prompts
from causalscan.errors import InputError, check_options
from causalscan.model.load import ZOO_DIR, load
from causalscan.model.taps import frozen
from causalscan.progress import Progress, log
from causalscan.progress import check as check_progress
from causalscan.steering import generation, search

METHODS = ("melbo", "dct")


def default_layers(n_layers: int) -> tuple[int, int]:
    """``(source, target)``: target ``L - 8`` on deep models (the last block below 16 layers), source a
    quarter of the way to it."""
    target = n_layers - 8 if n_layers >= 16 else n_layers - 1
    return max(0, target // 4), target


def zoo_prompts(model) -> list[str]:
    """The clean prompts shipped with a zoo model (its card's ``prompts`` file)."""

    name = (model.card or {}).get("name")
    if not name or "prompts" not in model.card:
        raise InputError(
            "give prompts: this model ships none (only zoo models with a 'prompts' file do)", field="prompts"
        )
    return read_prompts(ZOO_DIR / name / model.card["prompts"]["file"])


@dataclass
class ElicitResult:
    """Learned and random vectors ``[n, d_model]`` at norm ``radius``, their MELBO objective on the
    prompts, and the completions ``[n][prompts]`` each steers the prompts to."""

    model: str
    method: str
    source: int
    target: int
    radius: float
    radius_info: dict
    settings: dict
    prompts: list[str]
    vectors: torch.Tensor
    random: torch.Tensor
    score: torch.Tensor
    score_random: torch.Tensor
    completions: list[list[str]]
    completions_random: list[list[str]]
    phrase: str | None = None
    timings: dict = field(default_factory=dict)

    def hits(self, which: str = "learned") -> list[int]:
        """Vectors with at least one completion containing the phrase (``[]`` without a phrase)."""
        comp = self.completions if which == "learned" else self.completions_random
        return [k for k, c in enumerate(comp) if self.phrase and any(self.phrase in s for s in c)]

    def summary(self) -> dict:
        from causalscan.versions import versions

        doc = {
            "kind": "elicit",
            "model": self.model,
            "method": self.method,
            "source": self.source,
            "target": self.target,
            "radius": self.radius,
            "radius_rule": self.radius_info,
            **self.settings,
            "n": len(self.vectors),
            "prompts": len(self.prompts),
            "objective": {
                "learned_mean": self.score.mean().item(),
                "random_mean": self.score_random.mean().item(),
                "learned_max": self.score.max().item(),
                "random_max": self.score_random.max().item(),
            },
        }
        if self.phrase:
            hl, hr = self.hits("learned"), self.hits("random")
            doc.update(
                phrase=self.phrase,
                hits_learned=len(hl),
                hits_random=len(hr),
                hit_vectors=hl,
                hit_rates={k: sum(self.phrase in s for s in self.completions[k]) / len(self.prompts) for k in hl},
            )
        return {**doc, "timings": self.timings, "versions": versions()}

    def rows(self):
        for kind, vecs, comp, score in (
            ("learned", self.vectors, self.completions, self.score),
            ("random", self.random, self.completions_random, self.score_random),
        ):
            for k in range(len(vecs)):
                for prompt, text in zip(self.prompts, comp[k], strict=True):
                    row = {"vector": k, "kind": kind, "prompt": prompt, "completion": text, "score": score[k].item()}
                    if self.phrase:
                        row["hit"] = self.phrase in text
                    yield row

    @staticmethod
    def resumes(settings: dict | None = None) -> bool:
        """MELBO writes its finished vectors as it goes (with a checkpoint) and resumes; DCT starts over."""
        return (settings or {}).get("method") == "melbo"

    def notes(self, doc: dict) -> list[str]:
        line = (
            f"elicit: {doc['method']}, {doc['n']} vectors, source {doc['source']} -> target {doc['target']}, "
            f"radius {doc['radius']:.3g}"
        )
        if "hits_learned" in doc:
            line += f"; {doc['phrase']!r} from {doc['hits_learned']} learned, {doc['hits_random']} random vectors"
        return [line]

    def lines(self, doc: dict, top: int = 10) -> list[str]:
        """The first ``top`` vectors: score and first completion."""
        return [
            f"vector {k:3d}  score {self.score[k].item():10.4g}  {self.completions[k][0]!r}"
            for k in range(min(top, len(self.vectors)))
        ]

    def _doc(self) -> dict:
        """The saved summary with its completion rows, as :mod:`causalscan.report` reads them back."""
        import json

        return {
            **json.loads(files.strict_json(self.summary())),
            "rows": [json.loads(files.strict_json(r, indent=None)) for r in self.rows()],
        }

    def report(self, path: str | Path) -> Path:
        """Write the self-contained HTML report (:mod:`causalscan.report`) to ``path``."""
        from causalscan import report

        files.write(Path(path), report.render(self._doc(), {}))
        return Path(path)

    def figure(self, name: str):
        """One figure of the report as a plotly ``Figure`` (``"objective"``, ``"radius"``)."""
        from causalscan import report

        return report.figures(self._doc(), {})[name]

    def save(self, out_dir: str | Path) -> Path:
        """``vectors.safetensors`` (``vectors``, ``random`` [n, d_model]; metadata: model, layer),
        ``completions.jsonl`` and ``summary.json`` into ``out_dir``."""
        out = files.out_dir(out_dir)
        meta = {
            "model": self.model,
            "method": self.method,
            "source": str(self.source),
            "target": str(self.target),
            "radius": repr(self.radius),
        }
        tensors = {"vectors": self.vectors, "random": self.random}
        tensors = {k: v.float().cpu().contiguous() for k, v in tensors.items()}
        files.write(out / "vectors.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        rows = "".join(files.strict_json(row, indent=None) + "\n" for row in self.rows())
        files.write(out / "completions.jsonl", rows)
        files.write(out / "summary.json", files.strict_json(self.summary()))
        return out


def elicit(
    model,
    prompts: list[str] | None = None,
    method: str = "dct",
    n: int = 64,
    source: int | None = None,
    target: int | None = None,
    radius: float | str = "auto",
    p: float = 2.0,
    q: float = 1.0,
    positions: list[int] | None = None,
    steps: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    max_new_tokens: int = 8,
    phrase: str | None = None,
    chat: bool = False,
    progress: Progress | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every_s: float = 30.0,
) -> ElicitResult:
    """Search ``n`` steering vectors (``method`` melbo or dct) on ``prompts`` (default: a zoo model's
    shipped clean prompts), and generate with each of them and with ``n`` random vectors of the same norm.

    ``source``/``target``: blocks after which the vector is added / the response is read (default
    :func:`default_layers`). ``radius``: the vectors' norm, or ``"auto"`` (non-linear share of the
    blocks' response 0.5). ``p``, ``q``: MELBO's objective. ``positions``: target positions (default
    all). ``steps``: MELBO steps per vector (default 50) or DCT iterations (default 10).
    ``checkpoint``: a directory where MELBO writes its finished vectors as it goes (at most every
    ``checkpoint_every_s``); a rerun with the same model, prompts and settings resumes after them.
    ``progress(stage, done, total)``: after each MELBO vector, DCT iteration and ``generate`` call.
    ``chat``: wrap every prompt in the tokenizer's chat template (instruct models).
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, not {method!r}", field="method")
    check_options(
        n=n,
        radius=radius,
        p=p,
        q=q,
        max_new_tokens=max_new_tokens,
        steps=steps,
        lr=lr,
        seed=seed,
        source=source,
        target=target,
    )
    prompts = check_prompts(prompts)
    check_progress(progress)
    model = load(model)
    d_source, d_target = default_layers(model.adapter.n_layers)
    source = d_source if source is None else source
    target = d_target if target is None else target
    prompts = zoo_prompts(model) if prompts is None else list(prompts)
    ids = [encode(model.tokenizer, s, chat) for s in prompts]
    phrase = phrase or (model.card or {}).get("phrase")
    with frozen(model.hf):
        sl = search.make_slice(model, ids, source, target, positions)
        d, dev = sl.d_model, model.device
        info: dict = {"rule": "given"}
        if radius == "auto":
            radius, info = search.auto_radius(sl, seed=seed, device=dev)
            log.info("radius: %.3g (non-linear share %.3f)", radius, info["share"])
        radius = float(radius)
        t1 = time.perf_counter()
        if method == "melbo":
            ck = None
            if checkpoint is not None:
                key = checkpoint_key(
                    {
                        "model": model.name,
                        "weights": fingerprint(model.hf),
                        "prompts": prompts,
                        "n": n,
                        "source": source,
                        "target": target,
                        "radius": radius,
                        "p": p,
                        "q": q,
                        "positions": positions,
                        "steps": steps,
                        "lr": lr,
                        "seed": seed,
                        "chat": chat,
                    }
                )
                ck = Checkpoint(checkpoint, "elicit", key, checkpoint_every_s)
            vectors, score = search.melbo(
                sl,
                d,
                n,
                radius,
                p,
                q,
                steps=steps or 50,
                lr=lr,
                seed=seed,
                device=dev,
                checkpoint=ck,
                progress=progress,
            )
            if ck:
                ck.remove()
        else:
            vectors, _alpha = search.dct(
                sl.mean_delta, d, n, radius, iters=steps or 10, seed=seed, device=dev, progress=progress
            )
            score = search.scores(sl, vectors, p, q)
        t_search = time.perf_counter() - t1
        log.info("%s: %d vectors in %.1fs", method, n, t_search)
        rand = search.random_vectors(n, d, radius, seed, device=dev)
        score_r = search.scores(sl, rand, p, q)
    t2 = time.perf_counter()
    comp = generation.generate(model, ids, vectors, source, max_new_tokens=max_new_tokens, progress=progress)
    comp_r = generation.generate(model, ids, rand, source, max_new_tokens=max_new_tokens, progress=progress)
    timings = {"search_s": t_search, "generate_s": time.perf_counter() - t2, "total_s": time.perf_counter() - t0}
    settings = {
        "p": p,
        "q": q,
        "positions": positions,
        "steps": steps or (50 if method == "melbo" else 10),
        "lr": lr,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "chat": chat,
    }
    return ElicitResult(
        model.name,
        method,
        source,
        target,
        radius,
        info,
        settings,
        prompts,
        vectors.cpu(),
        rand.cpu(),
        score.cpu(),
        score_r.cpu(),
        comp,
        comp_r,
        phrase,
        timings,
    )
