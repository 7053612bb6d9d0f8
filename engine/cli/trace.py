"""``causalscan trace``: ROME's causal tracing, token x layer effects of restoring clean values."""

from __future__ import annotations

from causalscan.cli.job import run_job
from causalscan.cli.options import command, data_args, model_args, names, plan_args, report_arg
from causalscan.patching.tracing import TraceResult, trace


def run(args) -> dict:
    return run_job(args, trace, prefer="subjects", kinds=names(args.kinds), window=args.window)


def add(sub) -> None:
    p = command(
        sub,
        "trace",
        run,
        result=TraceResult,
        help="ROME causal tracing: token x layer effects of restoring clean values",
        description="Causal tracing: restore the clean residual state, MLP or attention output at each token "
        "and layer of the corrupt run (Gaussian noise on noise_span, or the corrupt prompt). With "
        "no --model and no --data: the zoo's facts model on its subjects dataset.",
    )
    model_args(p, default="facts")
    plan_args(p)
    data_args(p, metric="prob", out="trace.json", top=20)
    report_arg(p)
    p.add_argument("--kinds", default="state,mlp,attn", help="comma-separated: state, mlp, attn")
    p.add_argument(
        "--window",
        type=int,
        default=10,
        help="layers restored together for mlp and attn (ROME: 10; single-layer grids come too)",
    )
