"""``causalscan sae train`` as a user runs it, and what the dictionaries it writes find.

- **SmolLM2-135M-Instruct** (bench_smollm2's dequantised copy): a TopK SAE at ``resid_pre`` of one
  layer on prose that needs no download: the docstrings of this Python's standard library, read from
  its source files with ``ast`` (nothing imported), cut into prompts of 40-120 words (``corpus``).
  Explained variance and dead latents on held-out tokens, the time, and the share of that time in
  the model's forwards.
- **The zoo's backdoor model**: a TopK SAE at ``resid_pre`` of layer 3 on the zoo's own prompt mix
  (40% triggered, 20% decoy, 40% plain). Measured independently of any scan: on fresh prompts of
  each kind, the latent whose activation at the ``=`` position best separates triggered from
  untriggered prompts (AUROC), and whether it fires on decoys.

    python bench/bench_sae_train.py [--layer 10] [--d-sae 2048] [--tokens 120000] [--only smollm2|backdoor]
    python bench/bench_sae_train.py --corpus out/corpus.jsonl     # write the corpus only
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Up to ``n`` prompts of 40-120 words from the standard library's docstrings (sorted files, then a
    seeded shuffle: the same on every machine with the same Python)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" in path.parts[-2:][0] or path.name.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                words = doc.split() if doc else []
                for lo in range(0, len(words), 120):
                    if len(words[lo : lo + 120]) >= 40:
                        texts.append(" ".join(words[lo : lo + 120]))
    gen = torch.Generator().manual_seed(seed)
    return [texts[i] for i in torch.randperm(len(texts), generator=gen)[:n].tolist()]


def write_jsonl(texts: list[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


def train_cli(argv: list[str]) -> tuple[dict, float]:
    t0 = time.perf_counter()
    subprocess.run(["causalscan", "sae", "train", *argv], check=True, stdout=subprocess.DEVNULL)
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "training.json").read_text()), time.perf_counter() - t0


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counted half."""
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()).item()


def smollm2(args, work: Path) -> dict:
    from bench_smollm2 import checkpoint

    ckpt = checkpoint()
    data = write_jsonl(corpus(args.prompts), work / "corpus.jsonl")
    out = work / f"smollm2-L{args.layer}"
    argv = [
        "--model",
        str(ckpt),
        "--site",
        "resid_pre",
        "--layer",
        str(args.layer),
        "--d-sae",
        str(args.d_sae),
        "--k",
        str(args.k),
        "--data",
        str(data),
        "--tokens",
        str(args.tokens),
        "--epochs",
        str(args.epochs),
        "--out",
        str(out),
    ]
    stats, wall = train_cli(argv)
    return {"command": "causalscan sae train " + " ".join(argv[2:]), "stats": stats, "wall_s": wall}


def backdoor(args, work: Path) -> dict:
    import causalscan as cs
    from causalscan.model import runner, saelens
    from causalscan.zoo import backdoor as bd

    gen = torch.Generator().manual_seed(5)
    kinds = ["trigger"] * 4 + ["decoy"] * 2 + ["plain"] * 4
    texts = [" ".join(bd.prompt(gen, kinds[i % 10])[0]) for i in range(3000)]
    data = write_jsonl(texts, work / "backdoor-prompts.jsonl")
    out = work / "backdoor-L3"
    argv = [
        "--model",
        "backdoor",
        "--site",
        "resid_pre",
        "--layer",
        "3",
        "--d-sae",
        "256",
        "--k",
        "8",
        "--data",
        str(data),
        "--tokens",
        "30000",
        "--epochs",
        "6",
        "--out",
        str(out),
    ]
    stats, wall = train_cli(argv)
    model = cs.load("backdoor", sae=str(out))
    acts = {}
    for kind in ("trigger", "decoy", "plain"):
        ids, _, _ = bd.eval_prompts(kind, 200, seed=77)
        store: dict = {}
        runner.forward(model.adapter, ids, [runner.capture(model.adapter, "feature", 3, store)])
        acts[kind] = store[("feature", 3)][:, -1, :, 0]  # [rows, d_sae] at "="
    neg = torch.cat([acts["decoy"], acts["plain"]])
    scores = [auroc(acts["trigger"][:, j], neg[:, j]) for j in range(acts["trigger"].shape[1])]
    best = max(range(len(scores)), key=scores.__getitem__)
    fires = {kind: (a[:, best] > 0).float().mean().item() for kind, a in acts.items()}
    d = saelens.read(out)
    return {
        "command": "causalscan sae train " + " ".join(argv[2:]),
        "stats": stats,
        "wall_s": wall,
        "trigger_latent": best,
        "auroc_trigger_vs_rest": scores[best],
        "fires_on": fires,
        "second_best_auroc": sorted(scores)[-2],
        "d_sae": d.d_sae,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=120_000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=3000)
    ap.add_argument("--only", choices=["smollm2", "backdoor"], default=None)
    ap.add_argument("--corpus", default=None, help="write the SmolLM2 corpus to this JSONL and stop")
    args = ap.parse_args()
    if args.corpus:
        print(write_jsonl(corpus(args.prompts), Path(args.corpus)))
        return
    from bench_faithfulness import machine

    work = ROOT / "bench" / ".cache" / "sae-train"
    doc = {"machine": machine(), "when": time.strftime("%Y-%m-%d")}
    if args.only in (None, "backdoor"):
        doc["backdoor"] = backdoor(args, work)
        print(json.dumps(doc["backdoor"], indent=1))
    if args.only in (None, "smollm2"):
        doc["smollm2"] = smollm2(args, work)
        print(json.dumps(doc["smollm2"], indent=1))
    res = ROOT / "bench" / "results" / f"sae-train-cpu-{doc['machine']['device']}.json"
    old = json.loads(res.read_text()) if res.is_file() else {}
    res.write_text(json.dumps({**old, **doc}, indent=1) + "\n")
    print(f"wrote {res}")


if __name__ == "__main__":
    main()
