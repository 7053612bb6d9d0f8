"""Exact patching sweeps three ways in one run: causalscan batched, a naive one-patch-per-forward
hook loop, and TransformerLens (TransformerBridge over the same weights, when installed).

Sweeps: every head at all positions, and resid_pre by layer x position, on 8 IOI-style pairs
(denoising, TransformerLens's convention). Also times the floor: plain batched forwards over
exactly the layers and positions our plan recomputes. Runs on the GPU when there is one (fp32,
every method on the same device; ``random:llama-135m`` is the real tier's shape). Prints ratios
and saves them with the machine to bench/results/.

    python bench/bench_patching.py [--models random:gpt2-small,random:gpt2-medium] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import causalscan as cs
from causalscan.data.pairs import Dataset, stack
from causalscan.data.sweeps import sweep_components
from causalscan.model import runner
from causalscan.patching.patch import patch
from causalscan.patching.planner import default_min_tokens, schedule, start

ROOT = Path(__file__).resolve().parents[1]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), out


def naive(model, clean, corrupt, ans, wrong, site):
    """One full forward of all corrupt prompts per component, the clean activation hooked in."""
    ad = model.adapter
    comps, shape = sweep_components(model, site, site == "resid_pre", clean.shape[1])
    src = {}
    runner.forward(ad, clean, [runner.capture(ad, site, layer, src) for layer in range(ad.n_layers)])
    out = torch.empty(len(comps), device=clean.device)
    for j, c in enumerate(comps):
        s = src[(site, c.layer)]
        pos = slice(None) if c.position is None else slice(c.position, c.position + 1)

        def fn(x, s=s, pos=pos, c=c):
            x = x.clone()
            x[:, pos, c.index] = s[:, pos, c.index]
            return x

        logits = runner.forward(ad, corrupt, [(site, c.layer, fn)])[:, -1]
        out[j] = (logits.gather(1, ans[:, None]) - logits.gather(1, wrong[:, None])).mean()
    return out.reshape(shape)


def floor(model, corrupt, site):
    """Plain forwards (no taps) over the rows, layers and positions our plan recomputes."""
    ad = model.adapter
    p, seq = corrupt.shape
    comps, _ = sweep_components(model, site, site == "resid_pre", seq)
    _, acts, kv = runner.run_with_cache(ad, corrupt, [("resid_pre", s) for s in range(ad.n_layers)])
    for layer, pos, members in schedule([start([c]) for c in comps], p, seq, default_min_tokens(model.device)):
        rows = torch.arange(p, device=corrupt.device).repeat_interleave(len(members))
        runner.forward(
            ad,
            corrupt[rows, pos:],
            start_layer=layer,
            resid=acts[("resid_pre", layer)][rows, pos:, 0],
            past=kv.cache(rows, pos, layer, model.hf.config),
        )


def transformer_lens(model, clean, corrupt, ans, wrong, site):
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerFast

    d = tempfile.mkdtemp()  # TransformerLens re-reads the tokenizer from its path
    model.tokenizer.save_pretrained(d)
    tok = PreTrainedTokenizerFast.from_pretrained(d)
    bridge = TransformerBridge.boot_transformers(
        model.adapter.family.name, hf_model=copy.deepcopy(model.hf), tokenizer=tok, device=str(model.device)
    )

    def metric(logits):
        last = logits[:, -1]
        return (last.gather(1, ans[:, None]) - last.gather(1, wrong[:, None])).mean()

    fn = patching.get_act_patch_attn_head_out_all_pos if site == "head" else patching.get_act_patch_resid_pre

    def run():
        _, cache = bridge.run_with_cache(clean)
        return fn(bridge, corrupt, cache, metric)

    return run


@torch.no_grad()
def bench_model(spec, repeats, with_tl):
    model = cs.load(spec, device="cuda" if torch.cuda.is_available() else "cpu")
    ds = Dataset.from_jsonl(ROOT / "examples/ioi.jsonl")
    b = stack(ds.tokenize(model.tokenizer), model.device)
    clean, corrupt, ans, wrong = b["clean"], b["corrupt"], b["answer"], b["wrong"]
    rows = []
    for site in ("head", "resid_pre"):
        t_ours, res = best_of(lambda s=site: patch(model, ds, sites=s, direction="denoising"), repeats)
        ours = res.patched.mean(0).reshape(res.sweeps[0].shape).cpu()
        t_naive, ref = best_of(lambda s=site: naive(model, clean, corrupt, ans, wrong, s), repeats)
        t_floor, _ = best_of(lambda s=site: floor(model, corrupt, s), repeats)
        row = {
            "model": spec,
            "sweep": site,
            "pairs": len(ds),
            "seq": clean.shape[1],
            "patches": ours.numel(),
            "ours_s": t_ours,
            "naive_s": t_naive,
            "floor_s": t_floor,
            "naive_over_ours": t_naive / t_ours,
            "ours_over_floor": t_ours / t_floor,
            "max_abs_diff_naive": (ours - ref.cpu()).abs().max().item(),
            "max_abs_naive": ref.abs().max().item(),
        }
        if with_tl:
            run = transformer_lens(model, clean, corrupt, ans, wrong, site)
            t_tl, tl = best_of(run, repeats)
            row.update(tl_s=t_tl, tl_over_ours=t_tl / t_ours, max_abs_diff_tl=(ours - tl.cpu()).abs().max().item())
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="random:gpt2-small,random:gpt2-medium")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args()
    try:
        import transformer_lens  # noqa: F401

        with_tl = True
    except ImportError:
        with_tl = False
        print("transformer-lens not installed (pip install -e '.[peers]'): skipping the peer", flush=True)
    rows: list[dict] = []
    doc = {
        "bench": "patching",
        "date": time.strftime("%Y-%m-%d"),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "rows": rows,
    }
    from causalscan.versions import versions

    doc["versions"] = versions()
    if with_tl:
        import transformer_lens

        doc["versions"]["transformer_lens"] = getattr(transformer_lens, "__version__", "?")
    dev = "cuda-" + torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    out = Path(args.out) / f"patching-{dev}-{platform.machine()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.models.split(","):
        rows += bench_model(spec, args.repeats, with_tl)
        out.write_text(json.dumps(doc, indent=2))  # after every model: a stopped run keeps what it measured
    print(f"saved {out}")


if __name__ == "__main__":
    main()
