"""Scans on Ray against the plain scan, side by side in one run, on this machine's CPUs.

One scan (AtP* of every head and neuron, then exact patching of the top 16 + 16 random nodes) of a
random Llama shape over prompt pairs of one length, run: in this process with one torch thread
(``plain-1t``) and with every core (``plain``); on a local Ray cluster with 1 actor and with 2
actors of one CPU and one thread each, the actors warm (the model already sent: a second scan on
the same executor) and cold (the first scan, actor start and model transfer included). Prints
pairs/s and the ratios, checks that every Ray result equals ``plain-1t`` bit for bit, and saves the
figures with the machine to bench/results/.

    python bench/bench_ray.py [--model random:llama-medium] [--pairs 48] [--seq 48] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    import ray
    from bench_memplan import records

    import causalscan as cs
    from causalscan.executor import Ray

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama-medium")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = cs.load(args.model)
    data = records(args.pairs, args.seq)
    kw = dict(sites=["head", "neuron"], method="atp*", confirm=16, exact_budget=0, batch_size=4)
    cores = os.cpu_count()

    def timed(**extra):
        t0 = time.perf_counter()
        res = cs.scan(model, data, **kw, **extra)
        return time.perf_counter() - t0, res

    torch.set_num_threads(cores)
    cs.scan(model, data[:4], **kw)  # warm-up
    runs = {"plain": timed()}
    torch.set_num_threads(1)
    runs["plain-1t"] = timed()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    for n in (1, 2):
        with Ray(actors=n) as ex:
            runs[f"ray-{n}-cold"] = timed(executor=ex)
            runs[f"ray-{n}"] = timed(executor=ex)
    ray.shutdown()
    ref = runs["plain-1t"][1].tensors()
    rows = {}
    for name, (secs, res) in runs.items():
        t = res.tensors()
        equal = all(torch.equal(torch.nan_to_num(ref[k], 7.0), torch.nan_to_num(t[k], 7.0)) for k in ref)
        rows[name] = {
            "seconds": secs,
            "pairs_per_s": args.pairs / secs,
            "attribution_s": res.timings["attribution_s"],
            "confirm_s": res.timings.get("confirm_s"),
            "bitwise_equal_to_plain_1t": equal,
            "speed_vs_plain_1t": runs["plain-1t"][0] / secs,
        }
        print(
            f"{name:<12} {secs:7.2f} s  {args.pairs / secs:6.2f} pairs/s  x{rows[name]['speed_vs_plain_1t']:.2f} "
            f"vs plain-1t  bitwise equal: {equal}"
        )
    out = {
        "machine": {
            "device": "cpu",
            "arch": platform.machine(),
            "cpus": cores,
            "processor": platform.processor(),
            "torch": torch.__version__,
            "ray": ray.__version__,
        },
        "model": args.model,
        "pairs": args.pairs,
        "tokens": args.seq,
        "scan": {k: str(v) for k, v in kw.items()},
        "ray_overhead_1_actor": runs["ray-1"][0] / runs["plain-1t"][0],
        "speedup_2_actors_vs_1": runs["ray-1"][0] / runs["ray-2"][0],
        "runs": rows,
    }
    print(
        f"Ray overhead, 1 actor against the plain scan at one thread: x{out['ray_overhead_1_actor']:.3f}; "
        f"2 actors against 1: x{out['speedup_2_actors_vs_1']:.2f}"
    )
    path = Path(args.out or ROOT / "bench" / "results" / f"ray-cpu-{platform.machine()}.json")
    path.write_text(json.dumps(out, indent=1))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
