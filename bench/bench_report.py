"""Size and time of the HTML report of the real tier's full scan: SmolLM2-135M-Instruct, 16 IOI
pairs over two templates, the default scan of every head, neuron and by-role residual, attention
and MLP output (46,710 nodes); the report aggregates neurons to each layer's top 64.

    python bench/bench_report.py [--pairs 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=16)
    args = ap.parse_args()
    from bench_smollm2 import checkpoint

    import causalscan as cs
    from causalscan import report

    model = cs.load(checkpoint())
    pairs = cs.tasks.ioi(model.tokenizer, n=args.pairs, templates=[0, 1])
    t0 = time.perf_counter()
    res = cs.scan(model, pairs, sites="head,neuron,resid_pre,attn_out,mlp_out")
    scan_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        res.save(d)
        t0 = time.perf_counter()
        path = report.write(d)
        report_s = time.perf_counter() - t0
        size = path.stat().st_size
    import plotly
    import torch

    doc = {
        "nodes": len(res.components),
        "pairs": len(pairs),
        "scan_s": scan_s,
        "report_s": report_s,
        "report_bytes": size,
        "scored_by": res.scored_by,
        "machine": {
            "device": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "plotly": plotly.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(doc, indent=2))
    out = ROOT / "bench" / "results" / f"report-smollm2-cpu-{platform.machine()}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
