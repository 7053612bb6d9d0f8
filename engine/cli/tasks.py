"""``causalscan tasks``: a task dataset people know (IOI, greater-than, facts) for a model's tokenizer."""

from __future__ import annotations

import json
import sys

from causalscan import files
from causalscan.cli.job import load
from causalscan.cli.options import command, model_args
from causalscan.data import tasks
from causalscan.errors import InputError


def run(args) -> dict:
    model = load(args)
    if args.task == "ioi":
        try:
            templates = [int(t) for t in args.templates.split(",")] if args.templates else None
        except ValueError:
            raise InputError(
                f"must be comma-separated template indices, not {args.templates!r}", field="templates"
            ) from None
        records = tasks.ioi(model.tokenizer, n=args.n, seed=args.seed, templates=templates, corruption=args.corruption)
    elif args.task == "greater_than":
        records = tasks.greater_than(model.tokenizer, n=args.n, seed=args.seed)
    else:
        records = tasks.facts(model.tokenizer, n=args.n)
    text = "".join(json.dumps(r) + "\n" for r in records)
    if args.out:
        files.write(args.out, text)
        print(f"tasks: {len(records)} {args.task} pairs -> {args.out}", file=sys.stderr)
    elif not args.json:
        sys.stdout.write(text)
    return {"task": args.task, "model": model.name, "pairs": len(records), "out": args.out, "records": records}


def add(sub) -> None:
    p = command(
        sub,
        "tasks",
        run,
        help="write a task dataset (IOI, greater-than, facts) for a tokenizer",
        description="Build a pair dataset people know for the tokenizer of --model: names and words kept only "
        "where they are one token. ioi: Wang et al.'s templates with flip_s2 or abc corruption; "
        "greater_than: Hanna et al.'s years (answers of several tokens where the tokenizer splits "
        "digits); facts: factual recall with noise on the subject.",
    )
    p.add_argument("task", choices=list(tasks.TASKS))
    model_args(p)
    p.add_argument("--n", type=int, default=64, help="pairs (facts: at most the built-in list)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--templates", default=None, help="ioi: comma-separated template indices (default: all)")
    p.add_argument("--corruption", default="flip_s2", choices=list(tasks.CORRUPTIONS), help="ioi corruption")
    p.add_argument("--out", default=None, help="JSONL file to write (default: stdout)")
    p.add_argument("--json", action="store_true", help="print a JSON document (with the records) on stdout")
