"""``causalscan elicit``: steering vectors learned without a target (MELBO, DCT), and the completions
each of them and as many random vectors of the same norm steer the prompts to."""

from __future__ import annotations

import argparse

from causalscan.cli.job import bars, load, say
from causalscan.cli.job import prompts as job_prompts
from causalscan.cli.options import command, model_args, output_args, report_arg, search_args
from causalscan.errors import InputError
from causalscan.steering.elicit import METHODS, ElicitResult, elicit


def run(args) -> dict:
    prompts = job_prompts(args)
    try:
        positions = [int(x) for x in args.positions.split(",")] if args.positions else None
    except ValueError:
        raise InputError(
            f"must be comma-separated token positions, not {args.positions!r}", field="positions"
        ) from None
    model = load(args)
    res = elicit(
        model,
        prompts,
        method=args.method,
        n=args.n,
        source=args.source,
        target=args.target,
        radius=args.radius,
        p=args.p,
        q=args.q,
        positions=positions,
        steps=args.steps,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        phrase=args.phrase,
        checkpoint=args.out,
        chat=args.chat,
        progress=bars(args),
    )
    doc = res.summary()
    if args.out:
        res.save(args.out)
        doc["out"] = str(args.out)
    say(res, doc, args, args.top)
    return doc


def _radius(text: str) -> str | float:
    """``--radius``: ``auto`` or a number (its range is checked with the other options)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'auto', not {text!r}") from None


def add(sub) -> None:
    p = command(
        sub,
        "elicit",
        run,
        result=ElicitResult,
        help="search steering vectors (MELBO, DCT) that surface hidden behaviours",
        description="Learn steering vectors without a target (MELBO or DCT), then generate with each of them "
        "and with as many random vectors of the same norm. With no --model and no prompt: the "
        "zoo's backdoor model on its clean prompts.",
    )
    model_args(p, default="backdoor")
    report_arg(p)
    search_args(p, METHODS)
    p.add_argument("--n", type=int, default=64, help="vectors to learn (and random baselines)")
    p.add_argument(
        "--source",
        type=int,
        default=None,
        help="add the vector after this block (default: a quarter of the way to the target)",
    )
    p.add_argument(
        "--target",
        type=int,
        default=None,
        help="read the response after this block (default: L - 8, or the last block below 16 layers)",
    )
    p.add_argument("--radius", type=_radius, default="auto", help="vector norm, or auto (non-linear share 0.5)")
    p.add_argument("--p", type=float, default=2.0, help="MELBO objective exponent p")
    p.add_argument("--q", type=float, default=1.0, help="MELBO objective exponent q")
    p.add_argument("--positions", default=None, help="comma-separated target positions (default: all)")
    p.add_argument("--steps", type=int, default=None, help="MELBO steps per vector (50) / DCT iterations (10)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument(
        "--phrase", default=None, help="count vectors whose completions contain it (default: the zoo card's phrase)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=10, help="vectors listed on stdout")
    p.add_argument(
        "--out",
        default=None,
        help="write vectors.safetensors, completions.jsonl, summary.json here "
        "(MELBO writes its finished vectors there as it goes, and resumes)",
    )
    output_args(p)
