"""Feature sites on the real tier: SmolLM2-135M-Instruct (bench_smollm2's dequantised copy) with TopK
transcoders trained here, as a user trains them.

- **transcoders**: ``causalscan sae train --site mlp_in`` at layers 0, 3, ..., 27 (d_sae 1024, k 16,
  60,000 tokens of bench_sae_train's standard-library corpus, 20 epochs, lr 3e-3), cached in
  bench/.cache/transcoders; held-out explained variance and dead latents per layer;
- **feature scan**: ``cs.scan(sites="feature,feature_error")`` on IOI (16 pairs, one template) with the
  ten transcoders: the attribution stage's time and peak memory against the plain forward + backward
  floor (each in its own process), and how its confirmed nodes agree with exact patching;
- **feature circuit**: ``cs.circuit`` with 16 latent nodes per transcoder (EAP): the time of each
  stage against the floor, the graph's size, the faithfulness curve's n at 80% / 95%, the agreement
  of the confirmed edges;
- **attribution graph** of a 256-token prompt: time against its own floor (one forward + backward of
  the prompt), and the peak resident memory above the loaded model against the memory plan's
  prediction (glibc's mmap threshold at 64 KiB so freed tensors leave the RSS; a small graph first
  as a warm-up).

    python bench/bench_features.py [--only transcoders|scan|circuit|graph] [--pairs 16] [--max-features 256]

Run it without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_faithfulness import data, floor_s, machine  # noqa: E402
from bench_memplan import _peak_of  # noqa: E402
from bench_sae_train import corpus, write_jsonl  # noqa: E402
from bench_smollm2 import checkpoint  # noqa: E402

LAYERS = list(range(0, 30, 3))
CACHE = ROOT / "bench" / ".cache" / "transcoders"
TRAIN = ["--d-sae", "1024", "--k", "16", "--tokens", "60000", "--epochs", "20", "--lr", "3e-3"]
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TRITON_INTERPRET": "0"}


def transcoders() -> dict:
    """Train (once) and read back the transcoders' statistics."""
    data_file = write_jsonl(corpus(3000), ROOT / "bench" / ".cache" / "corpus.jsonl")
    out = {}
    for layer in LAYERS:
        folder = CACHE / f"L{layer}"
        if not (folder / "training.json").is_file():
            argv = ["--model", str(checkpoint()), "--site", "mlp_in", "--layer", str(layer), *TRAIN]
            argv += ["--data", str(data_file), "--out", str(folder)]
            subprocess.run(["causalscan", "sae", "train", *argv], check=True, stdout=subprocess.DEVNULL, env=ENV)
        stats = json.loads((folder / "training.json").read_text())
        out[str(layer)] = {k: stats[k] for k in ("explained_variance", "dead_share", "l0", "seconds")}
    out["command"] = "causalscan sae train --site mlp_in --layer L " + " ".join(TRAIN)
    return out


def _model():
    import causalscan as cs

    return cs.load(str(checkpoint()), sae=[str(CACHE / f"L{layer}") for layer in LAYERS])


def one(stage: str, args) -> dict:
    """One stage in this process: its time and its peak RSS above the loaded model's."""
    import causalscan as cs
    from causalscan.features.attribution_graph import attribution_graph

    model = _model()
    if stage in ("floor", "scan", "circuit"):
        pairs = data(model, "smollm2", args.pairs, by_position=True)
    res, t0 = {}, time.perf_counter()
    if stage == "floor":
        peak = _peak_of(lambda: res.update(seconds=floor_s(model, pairs)))
        return {"stage": stage, "peak_extra_bytes": peak, **res}
    if stage == "scan":

        def run():
            r = cs.scan(model, pairs, sites="feature,feature_error", confirm=32)
            res.update(agreement=r.agreement_by_sweep, timings=r.timings, scored_by=r.scored_by)

    elif stage == "circuit":

        def run():
            r = cs.circuit(model, pairs, method="eap", latents=16, confirm=32, edges=200)
            res.update(
                agreement=r.agreement,
                faithfulness={k: r.faithfulness[k] for k in ("n_80", "n_95")},
                timings=r.timings,
                edges=int(r.graph.valid().sum()),
                latent_nodes=sum(len(v) for v in r.graph.latents.values()),
                top10=[e["edge"] for e in r.top(10)],
            )

    else:  # graph
        text = " ".join(corpus(40))
        ids = model.tokenizer(text)["input_ids"][: args.graph_tokens]
        attribution_graph(model, ids[:16], max_features=16, batch_size=args.batch_size)  # warm-up
        plan = attribution_graph(model, ids, max_features=args.max_features, batch_size=args.batch_size, dry_run=True)
        floor = _graph_floor(model, ids)

        def run():
            g = attribution_graph(model, ids, max_features=args.max_features, batch_size=args.batch_size)
            doc = g.to_json(top=10)
            res.update(graph=doc["graph"], top=doc["top"][:5], logits=doc["logits"][:3])

        t0 = time.perf_counter()
        peak = _peak_of(run)
        secs = time.perf_counter() - t0
        return {
            "stage": stage,
            "tokens": len(ids),
            "seconds": secs,
            "floor_seconds": floor,
            "time_ratio": secs / floor,
            "peak_extra_bytes": peak,
            "predicted_extra_bytes": plan.stages["graph"]["cpu"],
            "measured_over_predicted": peak / plan.stages["graph"]["cpu"],
            "max_features": args.max_features,
            "batch_size": args.batch_size,
            **res,
        }
    peak = _peak_of(run)
    return {"stage": stage, "seconds": time.perf_counter() - t0, "peak_extra_bytes": peak, **res}


def _graph_floor(model, ids: list[int]) -> float:
    """One forward of the prompt with its graph and one backward of its top logit, parameters frozen
    (best of two)."""
    from causalscan.model import runner, taps

    x = torch.tensor([ids])
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        with taps.frozen(model.hf), torch.enable_grad():
            h = model.hf.get_input_embeddings().register_forward_hook(lambda m, a, o: o.detach().requires_grad_())
            try:
                logits = runner.forward(model.adapter, x)[0, -1]
            finally:
                h.remove()
            logits.max().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def in_process(stage: str, args) -> dict:
    argv = [sys.executable, __file__, "--one", stage, "--pairs", str(args.pairs), "--max-features"]
    argv += [str(args.max_features), "--graph-tokens", str(args.graph_tokens), "--batch-size", str(args.batch_size)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=ENV)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["transcoders", "scan", "circuit", "graph"], default=None)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--graph-tokens", type=int, default=256)
    ap.add_argument("--max-features", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    res = ROOT / "bench" / "results" / f"features-smollm2-cpu-{machine()['device']}.json"
    doc = json.loads(res.read_text()) if res.is_file() else {}
    doc.update(machine=machine(), when=time.strftime("%Y-%m-%d"))
    doc["transcoders"] = transcoders()
    print(json.dumps(doc["transcoders"], indent=1), flush=True)
    if args.only in (None, "scan", "circuit"):
        doc["floor"] = in_process("floor", args)
    for stage in ("scan", "circuit", "graph"):
        if args.only in (None, stage):
            doc[stage] = in_process(stage, args)
            if stage != "graph":
                doc[stage]["time_ratio"] = doc[stage]["seconds"] / doc["floor"]["seconds"]
                doc[stage]["attribution_ratio"] = doc[stage]["timings"]["attribution_s"] / doc["floor"]["seconds"]
                doc[stage]["memory_ratio"] = doc[stage]["peak_extra_bytes"] / max(doc["floor"]["peak_extra_bytes"], 1)
            print(stage, json.dumps(doc[stage], indent=1), flush=True)
    res.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {res}")


if __name__ == "__main__":
    main()
