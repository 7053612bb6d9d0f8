"""``causalscan circuit``: every edge of the model's graph scored (EAP, EAP-IG), the top confirmed by
exact edge patching, and the faithfulness of the top-n circuits."""

from __future__ import annotations

from causalscan.circuits.circuit import ABLATIONS, METHODS, CircuitResult, circuit
from causalscan.cli.job import run_job
from causalscan.cli.options import command, data_args, model_args, plan_args, report_arg, sae_arg


def run(args) -> dict:
    budget = args.memory_budget_mb << 20 if args.memory_budget_mb else None
    return run_job(
        args,
        circuit,
        prefer="previous",
        method=args.method,
        edges=args.edges,
        confirm=args.confirm,
        confirm_random=args.confirm_random,
        ig_steps=args.ig_steps,
        relp_attention=args.relp_attention,
        direction=args.direction,
        batch_size=args.batch_size,
        curve=not args.no_curve,
        ablation=args.ablation,
        memory_budget=budget,
        checkpoint=args.out,
        latents=args.latents,
    )


def add(sub) -> None:
    p = command(
        sub,
        "circuit",
        run,
        result=CircuitResult,
        help="edge attribution (EAP, EAP-IG), exact edge patching, faithfulness curve",
        description="Score every edge of the model's graph (each head's and MLP's residual write into each "
        "head's q/k/v input, each MLP's input and the logits) with EAP or EAP-IG, confirm the top "
        "edges and a random sample by exact edge patching, and measure the faithfulness of the "
        "top-n circuits. With --out: circuit.json, scores.safetensors and circuit.dot (Graphviz); "
        "the attribution stage writes its partial sums there as it goes, and a rerun with the "
        "same settings resumes. With no --model and no --data: the zoo's induction model on its "
        "'previous' dataset.",
    )
    model_args(p, default="induction")
    sae_arg(p, "transcoder folders (one per layer): each one's --latents latents of largest |AtP| become nodes")
    p.add_argument("--latents", type=int, default=16, help="with --sae: latent nodes per transcoder (default 16)")
    plan_args(p)
    report_arg(p)
    data_args(p, out="circuit.json")
    p.add_argument("--direction", default="noising", choices=["noising", "denoising"])
    p.add_argument("--method", default="eap-ig", choices=list(METHODS))
    p.add_argument("--ig-steps", type=int, default=None, help="eap-ig: steps along the input path (default 5)")
    p.add_argument(
        "--relp-attention",
        default="plain",
        choices=["plain", "attnlrp"],
        help="relp: the attention rule (plain gradient, or attnlrp: q, k 1/4, v 1/2)",
    )
    p.add_argument("--edges", type=int, default=200, help="the circuit's size: its top edges in the outputs")
    p.add_argument("--confirm", type=int, default=50, help="top edges re-measured by exact edge patching (0: none)")
    p.add_argument(
        "--confirm-random",
        type=int,
        default=None,
        help="random other edges re-measured (default: as many as --confirm)",
    )
    p.add_argument(
        "--ablation",
        default="patch",
        choices=list(ABLATIONS),
        help="faithfulness: edges outside the circuit take the corrupt run's value or its mean",
    )
    p.add_argument("--no-curve", action="store_true", help="skip the faithfulness curve")
    p.add_argument("--batch-size", type=int, default=8, help="rows per attribution pass")
    p.add_argument("--memory-budget-mb", type=int, default=None, help="memory per edge-patched forward")
