"""Scan cost against the floor, side by side on one model, batch and set of sites.

Variants, each in its own process (so CPU peak memory is that variant's own):
- ``plain``: the floor any AtP needs: corrupt forward (no grad), clean forward building the graph
  of activations (parameters frozen), one backward of the metric;
- ``atp``, ``atp*-qk`` (QK fix, no GradDrop), ``atp*`` (QK fix + GradDrop, L more backwards): our
  scan's attribution stage (no confirmation);
- ``cache``: the TransformerLens way: hooks cache clean activations, corrupt activations and
  gradients at the same sites, then the scores are computed from the three caches.

Sites: all heads, all neurons, all residual positions (resid_pre). Random Llama shapes from tiny
to 1b; fp32 on CPU, bf16 on CUDA. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the
process's peak RSS above its level after loading on CPU, from a run with glibc's mmap threshold fixed
at 64 KiB so freed tensors leave the RSS (times from a run with the default allocator). Prints
ratios to ``plain`` and saves them with the machine to bench/results/.

    python bench/bench_scan.py [--sizes tiny,small,medium,1b] [--pairs 4] [--seq 32] [--repeats 3]
        [--variants plain,atp,atp*-qk,atp*,cache] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "atp", "atp*-qk", "atp*", "cache")
# memory runs only: glibc with a fixed mmap threshold maps every tensor above 64 KiB on allocation
# and unmaps it on free, so peak RSS follows the live tensors instead of the allocator's cached heap
# (it slows allocation, so times come from a second run with the default allocator)
MEMORY_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
SITES = ("head", "neuron", "resid_pre")


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one(size: str, variant: str, pairs: int, seq: int, repeats: int) -> dict:
    import causalscan as cs
    from causalscan.data.sweeps import Sweep, sweep_components, sweep_name
    from causalscan.model import runner, taps
    from causalscan.patching import attribution

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    model = cs.load(f"random:llama-{size}", device="cuda" if cuda else "cpu", dtype=dtype)
    ad, dev = model.adapter, model.device
    vocab = model.hf.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(4, vocab, (pairs, seq), generator=g).to(dev)
    corrupt = clean.clone()
    corrupt[:, seq // 2] = torch.randint(4, vocab, (pairs,), generator=g).to(dev)
    ans, wrong = torch.randint(4, vocab, (2, pairs), generator=g).to(dev)

    def metric(logits, ref=None):  # logits [P, T or keep, V] -> logit difference at the last position [P]
        last = logits[:, -1]
        return last.gather(-1, ans[:, None])[:, 0].float() - last.gather(-1, wrong[:, None])[:, 0].float()

    sweeps = []
    for site in SITES:
        by_pos = site == "resid_pre"
        _, shape = sweep_components(model, site, by_pos, seq)
        sweeps.append(Sweep(sweep_name(site, by_pos), site, by_pos, shape))
    taps_sites = [(s, layer) for s in SITES for layer in range(ad.n_layers)]

    def leaf(mod, args, out):
        return out.detach().requires_grad_()

    def plain():
        with torch.no_grad():
            runner.forward(ad, corrupt)
        with taps.frozen(model.hf), torch.enable_grad():
            h = model.hf.get_input_embeddings().register_forward_hook(leaf)
            try:
                m = metric(runner.forward(ad, clean))
            finally:
                h.remove()
            m.sum().backward()

    def ours(qk, gd):
        return lambda: attribution.attribute(ad, clean, corrupt, metric, sweeps, qk_fix=qk, graddrop=gd)

    def cache():  # TransformerLens style: three caches, then elementwise products
        acts_c, acts_k, grads = {}, {}, {}
        with torch.no_grad():
            runner.forward(ad, corrupt, [runner.capture(ad, s, layer, acts_k) for s, layer in taps_sites])

        def keep(s, layer):
            def fn(x):
                x = x.view_as(x)
                acts_c[(s, layer)] = x
                x.register_hook(lambda gr: grads.__setitem__((s, layer), gr))
                return x

            return s, layer, fn

        with taps.frozen(model.hf), torch.enable_grad():
            h = model.hf.get_input_embeddings().register_forward_hook(leaf)
            try:
                m = metric(runner.forward(ad, clean, [keep(s, layer) for s, layer in taps_sites]))
            finally:
                h.remove()
            m.sum().backward()
        return {k: ((acts_k[k] - acts_c[k].detach()) * grads[k]).sum(-1) for k in acts_c}

    fn = {
        "plain": plain,
        "atp": ours(False, False),
        "atp*-qk": ours(True, False),
        "atp*": ours(True, True),
        "cache": cache,
    }[variant]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()  # after loading, before the first call
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_bytes()) - base
    return {
        "size": size,
        "variant": variant,
        "seconds": min(times),
        "peak_bytes": peak,
        "nodes": sum(int(torch.tensor(sw.shape).prod()) for sw in sweeps),
        "layers": ad.n_layers,
    }


def run_one(cmd: list[str], env: dict | None) -> dict:
    """One variant in its own process; its error output when it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{' '.join(cmd[2:])} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="tiny,small,medium")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=None, help="results file (default bench/results/scan-<device>-<arch>.json)")
    p.add_argument("--one", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.pairs, args.seq, args.repeats)))
        return
    cuda = torch.cuda.is_available()
    machine = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": "bfloat16" if cuda else "float32",
        "memory": "cuda max_memory_allocated" if cuda else "peak RSS above post-load RSS (own process)",
    }
    default = ROOT / "bench" / "results" / f"scan-{'cuda' if cuda else 'cpu'}-{platform.machine()}.json"
    out = Path(args.out) if args.out else default
    rows = []
    envs = (None,) if cuda else (None, MEMORY_ENV)  # on CUDA the timed run's allocator peak is the memory
    variants = args.variants.split(",")
    variants.sort(key=lambda v: v != "plain")  # the floor first: every later variant's ratio to it
    for size in args.sizes.split(","):
        plain = None
        for variant in variants:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                size,
                variant,
                "--pairs",
                str(args.pairs),
                "--seq",
                str(args.seq),
                "--repeats",
                str(args.repeats),
            ]
            runs = [run_one(cmd, env) for env in envs]
            r = {**runs[0], "peak_bytes": runs[-1]["peak_bytes"]}
            plain = r if variant == "plain" else plain
            line = f"{size:<7} {variant:<8} {r['seconds'] * 1e3:9.1f} ms  peak {r['peak_bytes'] / 2**20:8.1f} MiB"
            if plain:
                r["time_vs_plain"] = r["seconds"] / plain["seconds"]
                r["memory_vs_plain"] = r["peak_bytes"] / max(plain["peak_bytes"], 1)
                line += f"  time x{r['time_vs_plain']:5.2f}  memory x{r['memory_vs_plain']:5.2f}"
            rows.append(r)
            print(line, flush=True)
            # after every variant: a run stopped at a time limit keeps what it measured
            out.write_text(
                json.dumps(
                    {"machine": machine, "pairs": args.pairs, "seq": args.seq, "sites": SITES, "rows": rows}, indent=2
                )
                + "\n"
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
