"""``causalscan zoo``: the bundled models with planted mechanisms: list, show a card, re-run a recipe."""

from __future__ import annotations

import json
import sys

from causalscan import zoo
from causalscan.cli.options import command
from causalscan.errors import InputError


def run(args) -> dict:
    if args.action == "list":
        rows = []
        for name in zoo.names():
            try:
                c = zoo.card(name)
                rows.append({"name": name, "summary": c["summary"], "datasets": list(c["datasets"])})
            except InputError:
                rows.append({"name": name, "summary": "(not built)", "datasets": []})
        if not args.json:
            for r in rows:
                print(f"{r['name']:<10} {r['summary']}")
        return {"models": rows}
    if args.name is None:
        raise InputError(f"zoo {args.action} needs a model name; zoo models: {', '.join(zoo.names())}", field="name")
    if args.action == "show":
        doc = {"path": str(zoo.path(args.name)), **zoo.card(args.name)}
        if not args.json:
            print(json.dumps(doc, indent=2))
        return doc
    out = args.out or f"out/zoo/{args.name}"
    print(f"training {args.name} into {out}", file=sys.stderr, flush=True)
    path = zoo.train(args.name, out, seed=args.seed)
    doc = {"path": str(path), **json.loads((path / "card.json").read_text())}
    if not args.json:
        print(f"wrote {path}")
    return doc


def add(sub) -> None:
    p = command(
        sub,
        "zoo",
        run,
        help="bundled models with planted mechanisms: list, show NAME, train NAME",
        description="The model zoo: list the bundled models, show a card, or re-run a recipe.",
    )
    p.add_argument("action", choices=["list", "show", "train"])
    p.add_argument("name", nargs="?", default=None, help="zoo model (see `causalscan zoo list`)")
    p.add_argument("--out", default=None, help="train: output directory (default out/zoo/NAME)")
    p.add_argument("--seed", type=int, default=0, help="train: seed (the shipped models use 0)")
    p.add_argument("--json", action="store_true", help="print the result document on stdout")
