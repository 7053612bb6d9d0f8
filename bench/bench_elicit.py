"""Vectors per second: DCT (all factors at once, batched forwards and VJPs) against MELBO (one
vector after another), on the same model, prompts, layers and radius, side by side in one run.

Model: the zoo's ``backdoor`` (its 20 shipped clean prompts, source 0 -> target 3, the automatic
radius), or ``--model random:llama-small`` etc. with random prompts. Also counts the vectors whose
greedy completions hold the card's phrase, when there is one. Prints and saves the figures with the
machine to bench/results/.

``--model random:llama-7b --dtype bfloat16 --n 512 --methods dct`` on a GPU is the 7B-shape DCT run
(random weights, built on the GPU) to set against the reference implementation's ~30 s on an H100.

    python bench/bench_elicit.py [--model backdoor] [--n 64] [--melbo-steps 50] [--dct-iters 10] [--repeats 2]
        [--methods melbo,dct] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="backdoor")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--melbo-steps", type=int, default=50)
    p.add_argument("--dct-iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", default="melbo,dct")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the model's own, fp32 for random:)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from causalscan.model.taps import frozen
    from causalscan.steering import generation, search
    from causalscan.steering.elicit import default_layers, zoo_prompts

    cuda = torch.cuda.is_available()
    model = load(args.model, "cuda" if cuda else "cpu", args.dtype)
    if model.card.get("prompts"):
        ids = [model.tokenizer(s)["input_ids"] for s in zoo_prompts(model)]
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(4, model.vocab_size, (20, 12), generator=g).tolist()
    source, target = default_layers(model.adapter.n_layers)
    phrase = model.card.get("phrase")
    rows = {}
    with frozen(model.hf):
        sl = search.make_slice(model, ids, source, target)
        radius, _ = search.auto_radius(sl, device=model.device)
        methods = {
            "melbo": lambda: search.melbo(sl, sl.d_model, args.n, radius, steps=args.melbo_steps, device=model.device)[
                0
            ],
            "dct": lambda: search.dct(
                sl.mean_delta, sl.d_model, args.n, radius, iters=args.dct_iters, device=model.device
            )[0],
        }
        runs = {m: methods[m] for m in args.methods.split(",")}
        for name, fn in runs.items():
            best, vecs = float("inf"), None
            for _ in range(args.repeats):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                vecs = fn()
                if cuda:
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            rows[name] = {"seconds": round(best, 3), "vectors_per_s": round(args.n / best, 2)}
            if phrase:
                comp = generation.generate(model, ids, vecs, source, max_new_tokens=4)
                rows[name]["hits"] = sum(any(phrase in c for c in cs_) for cs_ in comp)
            print(
                f"{name:6s} {args.n} vectors in {best:7.2f}s = {rows[name]['vectors_per_s']:8.2f} vectors/s"
                + (f", {rows[name]['hits']} with {phrase!r}" if phrase else "")
            )
    ratio = rows["dct"]["vectors_per_s"] / rows["melbo"]["vectors_per_s"] if len(rows) == 2 else None
    if ratio:
        print(f"DCT / MELBO vectors per second: {ratio:.1f}x")
    machine = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    doc = {
        "machine": machine,
        "model": args.model,
        "dtype": str(next(model.hf.parameters()).dtype),
        "prompts": len(ids),
        "source": source,
        "target": target,
        "radius": radius,
        "n": args.n,
        "melbo_steps": args.melbo_steps,
        "dct_iters": args.dct_iters,
        "best_of": args.repeats,
        "results": rows,
        "dct_over_melbo": round(ratio, 2) if ratio else None,
    }
    out = (
        Path(args.out)
        if args.out
        else ROOT
        / "bench"
        / "results"
        / (f"elicit-{'cuda' if cuda else 'cpu'}-{platform.machine()}{'-7b' if args.model.endswith('-7b') else ''}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"saved {out}")


def load(spec: str, device: str, dtype: str | None):
    """``spec`` on ``device``; the 7B random shape on a GPU is drawn there, not on the CPU first."""
    import causalscan as cs
    from causalscan.model.load import check_dtype
    from causalscan.model.random_models import random_model

    if spec.startswith("random:") and spec.endswith("-7b") and device == "cuda":
        family, _, size = spec[len("random:") :].partition("-")
        return cs.load(random_model(family, size, dtype=check_dtype(dtype) or torch.bfloat16, device="cuda"))
    return cs.load(spec, device=device, dtype=dtype)


if __name__ == "__main__":
    main()
