"""The audit's cost and what it finds, on the zoo backdoor and on SmolLM2-135M-Instruct.

Per model, in its own process: the whole ``cs.audit`` (its default layers), its search and
generation time (summed over units), learned vectors per second of search, completions and
generated tokens per second of generation, the whole audit in floors (one forward + backward of
every prompt through the whole model), the peak resident memory above the loaded model against the
memory plan's heaviest stage, and the top modes (for the backdoor: the rank of the mode whose
examples say the planted phrase, and its learned / random vector counts), then the same completions
grouped by the model's hidden states (``features="hidden"``) and their top modes.

- ``backdoor``: its 20 clean prompts, ``n`` 16, radii 0.5 and 1, greedy and one sampled completion
  of 8 tokens;
- ``smollm2``: bench_smollm2's dequantised copy, the 16 prompts of examples/audit_prompts.jsonl in
  the chat template, ``n`` 8, radius 1, 12 tokens.

    python bench/bench_audit.py [--models backdoor,smollm2]   (runs of other models in the file are kept)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_faithfulness import machine  # noqa: E402
from bench_memplan import _peak_of  # noqa: E402

SETTINGS = {
    "backdoor": dict(n=16, radii=(0.5, 1.0), max_new_tokens=8),
    "smollm2": dict(n=8, radii=(1.0,), max_new_tokens=12, chat=True),
}


def floor_s(model, ids: list[list[int]]) -> float:
    """One forward + backward of every prompt through the whole model (parameters frozen), best of 2."""
    from causalscan.data.prompts import by_length
    from causalscan.model import runner, taps

    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        for group in by_length(ids):
            x = torch.tensor([ids[i] for i in group])
            with taps.frozen(model.hf), torch.enable_grad():
                h = model.hf.get_input_embeddings().register_forward_hook(lambda m, a, o: o.detach().requires_grad_())
                try:
                    runner.forward(model.adapter, x)[:, -1].sum().backward()
                finally:
                    h.remove()
        best = min(best, time.perf_counter() - t0)
    return best


def one(name: str) -> dict:
    import causalscan as cs
    from causalscan.data.prompts import encode, read_prompts
    from causalscan.steering.audit import hidden_states
    from causalscan.steering.generation import end_tokens

    torch.set_num_threads(torch.get_num_threads())
    if name == "smollm2":
        from bench_smollm2 import checkpoint

        model, prompts = cs.load(str(checkpoint())), read_prompts(ROOT / "examples" / "audit_prompts.jsonl")
    else:
        model, prompts = cs.load(name), None
    kw = SETTINGS[name]
    plan = cs.audit(model, prompts, dry_run=True, **kw)
    res = {}
    peak = _peak_of(lambda: res.update(r=cs.audit(model, prompts, **kw)))
    r = res["r"]
    ids = [encode(model.tokenizer, s, kw.get("chat", False)) for s in r.train + r.held]
    floor = floor_s(model, ids)
    t = r.timings
    n_units, rows = len(r.units), r.tokens[..., 0].numel()
    generated = int((r.tokens >= 0).sum())
    doc = {
        "model": name,
        "settings": {**r.settings, "layers": sorted({u[0] for u in r.units}), "target": r.target},
        "prompts": {"train": len(r.train), "held_out": len(r.held)},
        "units": n_units,
        "seconds": t["total_s"],
        "search_s": t["search_s"],
        "generation_s": t["generation_s"],
        "learned_vectors_per_s": n_units * r.n / t["search_s"],
        "completions_per_s": rows / t["generation_s"],
        "generated_tokens_per_s": generated / t["generation_s"],
        "floor_s": floor,
        "floors": t["total_s"] / floor,
        "peak_extra_bytes": peak,
        "plan_stage_bytes": max(s["cpu"] for s in plan.stages.values()),
        "modes_found": len(r.modes),
        **found(r, model),
    }
    doc["measured_over_planned"] = peak / doc["plan_stage_bytes"]
    t0 = time.perf_counter()  # the same completions grouped by the model's hidden states instead
    r.analyse(model.tokenizer, end_tokens(model), (), hidden_states(model, r.target))
    doc["hidden"] = {"analysis_s": time.perf_counter() - t0, **found(r, model)}
    return doc


def found(r, model) -> dict:
    """The top 5 modes, and the rank of the mode whose examples say the card's phrase (if any)."""
    doc = {
        "top_modes": [
            {k: m[k] for k in ("mode", "name", "score", "learned_vectors", "random_vectors", "generalisation")}
            | {"example": m["examples"][0]["completion"] if m["examples"] else ""}
            for m in r.modes[:5]
        ]
    }
    phrase = (model.card or {}).get("phrase")
    if phrase:
        hit = [m for m in r.modes if any(phrase in e["completion"] for e in m["examples"])]
        doc["phrase_mode"] = (
            {"rank": hit[0]["mode"], "learned": hit[0]["learned_vectors"], "random": hit[0]["random_vectors"]}
            if hit
            else None
        )
    return doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="backdoor,smollm2")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one model
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    docs = []
    for name in args.models.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, check=True)
        doc = json.loads(out.stdout.strip().splitlines()[-1])
        docs.append(doc)
        print(
            f"{name}: {doc['units']} units in {doc['seconds']:.1f}s = {doc['floors']:.0f} floors; search "
            f"{doc['learned_vectors_per_s']:.2f} learned vectors/s, generation {doc['completions_per_s']:.1f} "
            f"completions/s ({doc['generated_tokens_per_s']:.0f} tokens/s); peak {doc['peak_extra_bytes'] / 2**20:.0f} "
            f"MiB above the model = {doc['measured_over_planned']:.2f} of the plan's stage"
        )
        hidden = [{**m, "mode": f"{m['mode']} (hidden)"} for m in doc["hidden"]["top_modes"]]
        for m in doc["top_modes"] + hidden:
            print(
                f"  mode {m['mode']} {m['score']:.3f} {m['learned_vectors']}/{m['random_vectors']} {m['name']} "
                f"e.g. {m['example']!r}"
            )
    res = ROOT / "bench" / "results" / f"audit-cpu-{machine()['device']}.json"
    ran = {d["model"] for d in docs}
    kept = [d for d in json.loads(res.read_text())["runs"] if d["model"] not in ran] if res.is_file() else []
    res.write_text(json.dumps({"machine": machine(), "runs": docs + kept}, indent=1))
    print(f"saved {res}")


if __name__ == "__main__":
    main()
