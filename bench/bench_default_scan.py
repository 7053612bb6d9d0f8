"""The default scan as a user calls it, by position and without named roles, against exact patching.

SmolLM2-135M-Instruct (bench_smollm2's dequantised copy), 16 IOI pairs of one template written to a
JSONL file without ``positions``, so ``resid_pre`` is swept over every position. Three commands in
one run, timed from the shell (model load included):

    causalscan scan  --model M --data ioi.jsonl --sites head,resid_pre               (the default)
    causalscan scan  --model M --data ioi.jsonl --sites head,resid_pre --method atp --exact-budget 0
    causalscan patch --model M --data ioi.jsonl --sites head,resid_pre               (the reference)

For each scan and sweep: recall@20 of what the scan ranks by (``rank/<sweep>``: the exact effect
where confirmed, the estimate elsewhere) against the patch's mean |effect|, and the sign agreement
of the scan's signed estimate on the nodes that matter (mean exact effect >= 5% of the sweep's
largest), and the time ratio of the default to AtP.

    python bench/bench_default_scan.py [--pairs 16] [--sites head,resid_pre]
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


def run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["causalscan", *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--sites", default="head,resid_pre")
    args = ap.parse_args()
    from bench_faithfulness import compare
    from bench_smollm2 import checkpoint
    from safetensors.torch import load_file

    import causalscan as cs

    ckpt = checkpoint()
    work = ROOT / "bench" / ".cache" / "default-scan"
    work.mkdir(parents=True, exist_ok=True)
    tok = cs.load(ckpt).tokenizer
    pairs = [{k: v for k, v in p.items() if k != "positions"} for p in cs.tasks.ioi(tok, n=args.pairs, templates=[0])]
    data = work / "ioi.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    common = ["--model", str(ckpt), "--data", str(data), "--sites", args.sites]
    wall = {
        "default": run(["scan", *common, "--out", str(work / "default")]),
        "atp": run(["scan", *common, "--method", "atp", "--exact-budget", "0", "--out", str(work / "atp")]),
        "patch": run(["patch", *common, "--out", str(work / "patch")]),
    }
    exact = load_file(str(work / "patch" / "scores.safetensors"))
    table: dict = {}
    for name in ("default", "atp"):
        doc = json.loads((work / name / "scan.json").read_text())
        t = load_file(str(work / name / "scores.safetensors"))
        method = doc["settings"]["method"]
        table[name] = {"method": method, "scored_by": doc["settings"]["scored_by"], "sweeps": {}}
        for sweep in doc["settings"]["sweeps"]:
            rank, signed = t[f"rank/{sweep}"].flatten(), t[f"{method}_signed/{sweep}"].flatten()
            ex_abs, ex = exact[f"exact_abs/{sweep}"].flatten(), exact[f"exact/{sweep}"].flatten()
            r = compare(rank, signed, ex_abs, ex)  # the scan's own ranking: already confirmed
            table[name]["sweeps"][sweep] = {
                **{key: r[key] for key in ("recall_at_20", "sign", "signed_nodes", "nodes")},
                "agreement": (doc["agreement_by_sweep"] or {}).get(sweep),
            }
            r = table[name]["sweeps"][sweep]
            print(f"{name:<8} {sweep:<10} recall@20 {r['recall_at_20']:.2f}  sign {r['sign']:.2f}", flush=True)
    ratio = wall["default"] / wall["atp"]
    print(f"wall: default {wall['default']:.1f}s, atp {wall['atp']:.1f}s ({ratio:.2f}x), patch {wall['patch']:.1f}s")
    doc = {
        "model": "smollm2",
        "pairs": len(pairs),
        "sites": args.sites,
        "wall_s": wall,
        "default_over_atp": ratio,
        "scans": table,
        "machine": {
            "device": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    out = ROOT / "bench" / "results" / f"default-scan-smollm2-cpu-{platform.machine()}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
