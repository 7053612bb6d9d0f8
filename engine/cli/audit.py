"""``causalscan audit``: a model's hidden behaviour modes, without knowing what to look for: steering
vectors learned per source layer and radius, their completions on held-out prompts grouped into
modes, scored against random vectors of the same norm and ranked."""

from __future__ import annotations

from causalscan.cli.job import bars, executor, load, plan_only, say
from causalscan.cli.job import prompts as job_prompts
from causalscan.cli.options import command, model_args, names, output_args, plan_args, ray_args, report_arg, search_args
from causalscan.errors import InputError
from causalscan.steering.audit import audit
from causalscan.steering.audit_result import AuditResult
from causalscan.steering.elicit import METHODS


def _numbers(text: str | None, field: str, kind=float) -> list | None:
    if text is None:
        return None
    try:
        return [kind(x) for x in names(text)]
    except ValueError:
        raise InputError(f"must be comma-separated numbers, not {text!r}", field=field) from None


def run(args) -> dict:
    prompts = job_prompts(args)
    kw = dict(
        method=args.method,
        n=args.n,
        layers=_numbers(args.layers, "layers", int),
        target=args.target,
        radii=tuple(_numbers(args.radii, "radii")),
        holdout=args.holdout,
        sampled=args.sampled,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        modes=args.modes,
        min_share=args.min_share,
        features=args.features,
        steps=args.steps,
        seed=args.seed,
        chat=args.chat,
        look_for=args.look_for,
        detectors=args.detectors,
        memory_gb=args.memory_gb,
    )
    model = load(args)
    if args.dry_run:
        return plan_only(audit(model, prompts, dry_run=True, **kw))
    with executor(args) as ex:
        res = audit(model, prompts, progress=bars(args), checkpoint=args.out, executor=ex, **kw)
    doc = res.summary()
    if args.out:
        res.save(args.out)
        doc["out"] = str(args.out)
    say(res, doc, args, args.top)
    return doc


def add(sub) -> None:
    p = command(
        sub,
        "audit",
        run,
        result=AuditResult,
        help="find hidden behaviour modes without labels (steering vectors per layer and radius)",
        description="Learn DCT (or MELBO) steering vectors at several source layers and radii on a training "
        "split of the prompts, draw as many random vectors of the same norm, generate with all of them on the "
        "held-out prompts (greedy and sampled), group the completions into behaviour modes without labels and "
        "rank modes and vectors by novelty, specificity against the random ones and generalisation. With no "
        "--model and no prompt: the zoo's backdoor model on its clean prompts.",
    )
    model_args(p, default="backdoor")
    report_arg(p)
    search_args(p, METHODS)
    p.add_argument("--n", type=int, default=16, help="vectors learned (and random) per layer and radius")
    p.add_argument(
        "--layers",
        default=None,
        help="comma-separated source layers (default: 1/8, 1/4, 1/2, 3/4 of the way to the target)",
    )
    p.add_argument(
        "--target",
        type=int,
        default=None,
        help="the block whose response the search maximises (default: L - 8, or the last block below 16 layers)",
    )
    p.add_argument("--radii", default="0.5,1", help="comma-separated multiples of each layer's rule radius")
    p.add_argument("--holdout", type=float, default=0.5, help="share of the prompts held out for generation")
    p.add_argument("--sampled", type=int, default=1, help="sampled completions per row besides the greedy one")
    p.add_argument("--temperature", type=float, default=1.0, help="of the sampled completions")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--modes", type=int, default=12, help="at most this many behaviour modes")
    p.add_argument(
        "--min-share",
        type=float,
        default=0.25,
        help="a vector produces a mode when this share of the held-out prompts lands in it",
    )
    p.add_argument(
        "--features",
        default="ngrams",
        choices=["ngrams", "hidden"],
        help="group completions by their token n-grams (TF-IDF) or by the model's own mean residual after the "
        "target block over each completion",
    )
    p.add_argument("--steps", type=int, default=None, help="DCT iterations (10) / MELBO steps per vector (50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--look-for",
        action="append",
        default=None,
        metavar="PHRASE",
        help="count the vectors whose completions say it (repeatable; outside the ranking)",
    )
    p.add_argument(
        "--detectors",
        default=None,
        metavar="FILE",
        help='JSONL of {"name": ..., "regex": ...} or {"name": ..., "keyword": ...} lines: hits counted '
        "per vector (outside the ranking)",
    )
    p.add_argument("--top", type=int, default=10, help="modes listed on stdout")
    p.add_argument(
        "--out",
        default=None,
        help="write audit.json, vectors.safetensors (ranked), completions.jsonl here (finished layers "
        "and radii are kept as they go, and a rerun resumes)",
    )
    ray_args(p, "(layer, radius) units")
    plan_args(p)
    output_args(p)
