"""The memory plan against the measured peak, on CPU, for three shapes.

For each shape (a random model, a batch of rows of one length, sweeps, a method), in its own
process: the plan (``causalscan.scan(..., dry_run=True)``) predicts the attribution stage's and the
exact-patching stage's peak above the weights; then each stage's heaviest unit runs for real after
a warm-up, and its peak is the process's high-water RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` before the unit) above the RSS before it, with glibc's mmap threshold
fixed at 64 KiB so freed tensors leave the RSS. Prints predicted / measured and saves them with the
machine to bench/results/.

    python bench/bench_memplan.py [--shapes A,B,C] [--out FILE]
    python bench/bench_memplan.py --one A      # one shape, a JSON line (what the test runs)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# model, rows, tokens per row, sweeps, method, exact-patching nodes
SHAPES = {
    "A": ("random:llama-small", 16, 192, ["head", "neuron", "resid_pre"], "atp*", 8),
    "B": ("random:llama-medium", 8, 128, ["head", "neuron", "q", "k"], "atp*", 8),
    "C": ("random:gpt2-medium", 12, 96, ["head", "mlp_out", "resid_pre"], "atp", 8),
}
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _peak_of(fn) -> int:
    """Bytes the process's resident set rose to while ``fn()`` ran, above where it started."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def records(n_pairs: int, seq: int) -> list[dict]:
    """``n_pairs`` prompt pairs of ``seq`` words each (one token per word) for the default vocabulary."""
    from causalscan.model.vocab import NAMES, WORDS

    words = list(WORDS)
    out = []
    for i in range(n_pairs):
        body = [words[(i * 7 + j) % len(words)] for j in range(seq - 2)]
        a, b = NAMES[i % len(NAMES)], NAMES[(i + 1) % len(NAMES)]
        out.append({"clean": " ".join([a, *body]), "corrupt": " ".join([b, *body]), "answer": a, "wrong": b})
    return out


def one(name: str) -> dict:
    import causalscan
    from causalscan.data.inputs import prepare
    from causalscan.data.sweeps import build_sweeps
    from causalscan.patching.estimate import attribution_units
    from causalscan.patching.exact import patch_units
    from causalscan.patching.planner import planned

    spec, rows, seq, sites, method, k = SHAPES[name]
    inp = prepare(spec, records(rows, seq), "logit_diff", "noising")
    t0 = time.perf_counter()
    plan = causalscan.scan(
        inp.model, inp, sites, method=method, batch_size=rows, confirm=k, confirm_random=0, exact_budget=0, dry_run=True
    )  # every sweep estimated: confirmation is the first k nodes
    plan_s = time.perf_counter() - t0  # the plan's own cost: each stage's heaviest unit on fake weights
    sweeps, comps = build_sweeps(inp.model, sites, inp.lengths, inp.dataset.name, None)
    from dataclasses import replace

    compute = attribution_units(
        inp.model, replace(inp, model=None), sweeps, "noising", method == "atp*", False, rows, 0, "inputs"
    )
    groups = [[c] for c in comps[:k]]
    work = planned(inp.model, inp.rows, groups)

    def patched():  # a fresh bucket cache each time, as the plan's unit builds one
        patch_units(inp.model, inp.rows, groups, "noising", inp.metric_fn, work)((0, 0))

    compute(0)  # warm-up: first-call allocations of the libraries
    patched()
    measured = {"attribution": _peak_of(lambda: compute(0)), "exact patching": _peak_of(patched)}
    t0 = time.perf_counter()
    compute(0)
    patched()
    units_s = time.perf_counter() - t0  # the same two units on the real weights
    plan.stages["exact patching"] = plan.stages.pop("confirmation")
    predicted = {stage: plan.stages[stage]["cpu"] for stage in measured}
    return {
        "shape": name,
        "model": spec,
        "rows": rows,
        "tokens": seq,
        "sites": sites,
        "method": method,
        "weights_bytes": plan.weights["cpu"],
        "predicted_bytes": predicted,
        "measured_bytes": measured,
        "ratio": {s: predicted[s] / measured[s] for s in measured},
        "chunks": plan.chunks,
        "plan_s": plan_s,
        "units_s": units_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--one", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    results = []
    unknown = sorted(set(args.shapes.split(",")) - set(SHAPES))
    if unknown:
        ap.error(
            f"unknown shape {', '.join(unknown)}; shapes: {', '.join(SHAPES)} ("
            + "; ".join(f"{k}: {v[0]} {v[1]}x{v[2]}" for k, v in SHAPES.items())
            + ")"
        )
    for name in args.shapes.split(","):
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name], env=ENV, capture_output=True, text=True, check=True
        )
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        for stage in r["measured_bytes"]:
            print(
                f"{name} {r['model']:<22} {r['rows']}x{r['tokens']} {stage:<15} predicted "
                f"{r['predicted_bytes'][stage] / 2**20:8.1f} MiB  measured {r['measured_bytes'][stage] / 2**20:8.1f}"
                f" MiB  ratio {r['ratio'][stage]:.3f}"
            )
        print(f"{name} plan {r['plan_s']:.2f}s, the same units on real weights {r['units_s']:.2f}s")
    import torch

    out = {
        "machine": {
            "device": "cpu",
            "arch": platform.machine(),
            "cpus": os.cpu_count(),
            "processor": platform.processor(),
            "torch": torch.__version__,
        },
        "results": results,
    }
    path = Path(args.out or ROOT / "bench" / "results" / f"memplan-cpu-{platform.machine()}.json")
    path.write_text(json.dumps(out, indent=1))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
