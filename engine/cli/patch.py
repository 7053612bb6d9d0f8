"""``causalscan patch``: exact activation patching of whole sweeps, batched."""

from __future__ import annotations

from causalscan.cli.job import run_job
from causalscan.cli.options import command, model_args, names, plan_args, report_arg, sae_arg, sweep_args
from causalscan.patching.patch import PatchResult, patch


def run(args) -> dict:
    budget = args.memory_budget_mb << 20 if args.memory_budget_mb else None
    return run_job(args, patch, sites=names(args.sites), direction=args.direction, memory_budget=budget)


def add(sub) -> None:
    p = command(
        sub,
        "patch",
        run,
        result=PatchResult,
        help="exact activation patching, many patches per forward",
        description="Exact activation patching of whole sweeps, batched.",
    )
    model_args(p)
    sae_arg(p)
    plan_args(p)
    report_arg(p)
    sweep_args(
        p,
        "head",
        "comma-separated sweeps: head, head:pos, resid_pre (by position), mlp_out:all, neuron, "
        "q, k, v, ... (default: head)",
    )
    p.add_argument("--memory-budget-mb", type=int, default=None, help="memory per batched forward")
