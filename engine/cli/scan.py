"""``causalscan scan``: every component of the sweeps scanned by attribution patching, the cheap sweeps
patched exactly, the top and a random sample of the rest confirmed by exact patching."""

from __future__ import annotations

from causalscan.cli.job import run_job
from causalscan.cli.options import command, model_args, names, plan_args, report_arg, sae_arg, sweep_args
from causalscan.model.relevance import ATTENTION
from causalscan.patching.scan import METHODS, RELP_ATTENTION, ScanResult, scan


def run(args) -> dict:
    budget = {} if args.exact_budget is None else {"exact_budget": args.exact_budget}
    return run_job(
        args,
        scan,
        sites=names(args.sites),
        method=args.method,
        confirm=args.confirm,
        confirm_random=args.confirm_random,
        direction=args.direction,
        batch_size=args.batch_size,
        graddrop=args.graddrop,
        fn_subsets=args.fn_subsets,
        checkpoint=args.out,
        ig_steps=args.ig_steps,
        ig_path=args.ig_path,
        relp_attention=args.relp_attention,
        **budget,
    )


def add(sub) -> None:
    p = command(
        sub,
        "scan",
        run,
        result=ScanResult,
        help="RelP / AtP scan of every component, confirmed by exact patching",
        description="Scan every component of the sweeps with relevance patching (RelP, the default) or "
        "attribution patching (AtP, AtP*, AtP-IG), then confirm "
        "the top nodes and a random sample by batched exact patching. With no --model and no "
        "--data: the zoo's induction model on its dataset. With --out, partial attribution sums "
        "are written there as the scan goes and a rerun with the same settings resumes from them.",
    )
    model_args(p, default="induction")
    sae_arg(p)
    plan_args(p)
    report_arg(p)
    sweep_args(
        p,
        "head,neuron,resid_pre",
        "comma-separated sweeps (default: head,neuron,resid_pre); also q, k, v, "
        "attn_out, mlp_out, resid_post, head:pos, ...",
    )
    p.add_argument(
        "--method",
        default="auto",
        choices=list(METHODS),
        help="auto (default): neuron sweeps by AtP, every other by RelP, one forward and two backwards; "
        "relp: relevance rules in the backward; atp; atp* (QK fix, --graddrop); atp-ig",
    )
    p.add_argument("--ig-steps", type=int, default=None, help="atp-ig: steps along the path (default 10)")
    p.add_argument(
        "--ig-path",
        default="inputs",
        choices=["inputs", "activations"],
        help="atp-ig: interpolate the input embeddings (one path for every site, N passes) or each site's "
        "activation (N passes per site and layer; a site's attributions sum to its exact effect)",
    )
    p.add_argument(
        "--relp-attention",
        default=RELP_ATTENTION,
        choices=list(ATTENTION),
        help=f"relp, auto: the attention rule (default {RELP_ATTENTION}): plain gradient, attnlrp (q, k 1/4, v 1/2) "
        "or cp (the pattern held constant; no q/k sweeps)",
    )
    p.add_argument(
        "--exact-budget",
        type=float,
        default=None,
        help="patch a sweep exactly, not estimate it, when that costs at most this many plain forward + "
        "backward passes (default: only the sweeps no larger than their confirmation sample, "
        "--confirm + --confirm-random nodes; 0: estimate every sweep)",
    )
    p.add_argument(
        "--graddrop",
        action="store_true",
        help="atp*: also GradDrop (one more backward per layer; it changed no ranking measured so far)",
    )
    p.add_argument("--confirm", type=int, default=32, help="top nodes re-measured by exact patching (0: none)")
    p.add_argument(
        "--confirm-random",
        type=int,
        default=None,
        help="random other nodes re-measured (default: as many as --confirm)",
    )
    p.add_argument(
        "--fn-subsets", type=int, default=0, help="joint random patches for the false-negative bound (0: skip)"
    )
    p.add_argument(
        "--batch-size", type=int, default=8, help="rows per attribution pass (a noise_span pair is --samples rows)"
    )
