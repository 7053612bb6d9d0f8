"""``causalscan graph``: the attribution graph of one prompt under transcoders (``--sae DIR``, one per
layer), as circuit-tracer builds it, with its circuit-tracer / Neuronpedia JSON."""

from __future__ import annotations

from causalscan.cli.job import bars, finish, load, plan_only
from causalscan.cli.options import command, model_args, output_args, plan_args, report_arg, sae_arg
from causalscan.data.prompts import encode
from causalscan.errors import InputError
from causalscan.features.attribution_graph import MAX_FEATURES, attribution_graph
from causalscan.features.graph_result import GraphResult


def run(args) -> dict:
    if not args.sae:
        raise InputError("give the transcoders: --sae DIR (repeatable, one per layer)", field="sae")
    model = load(args)
    ids = encode(model.tokenizer, args.prompt, args.chat)
    settings = dict(
        max_logits=args.max_logits,
        logit_prob=args.logit_prob,
        max_features=None if args.max_features == 0 else args.max_features,
        batch_size=args.batch_size,
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
        memory_gb=args.memory_gb,
    )
    if args.dry_run:
        return plan_only(attribution_graph(model, ids, dry_run=True, **settings))
    res = attribution_graph(model, ids, progress=bars(args), **settings)
    args.bars.close()
    return finish(res, args, slug=args.slug)


def add(sub) -> None:
    p = command(
        sub,
        "graph",
        run,
        result=GraphResult,
        help="attribution graph of one prompt under transcoders (circuit-tracer's local replacement model)",
        description="Direct effects between the active latents of the transcoders given by --sae, the error "
        "nodes, the prompt's tokens and the top logits, with attention patterns and norm scales held at their "
        "values on the prompt; pruned by influence on the logits, written as graph.json, scores.safetensors and "
        "graph-files/<slug>.json (the circuit-tracer / Neuronpedia front end's format).",
    )
    model_args(p)
    sae_arg(p)
    plan_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-logits", type=int, default=10, help="logit targets at most (default 10)")
    p.add_argument(
        "--logit-prob", type=float, default=0.95, help="logit targets until their probability reaches this (0.95)"
    )
    p.add_argument(
        "--max-features",
        type=int,
        default=MAX_FEATURES,
        help=f"latents with a row, the most influential first (default {MAX_FEATURES}; 0: every active one)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="targets per backward (default 16)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="pruning: share of influence kept (0.8)")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="pruning: share of edge scores kept (0.98)")
    p.add_argument("--slug", default="causalscan-graph", help="the graph's name in graph-files/ (its JSON file)")
    p.add_argument("--top", type=int, default=50, help="nodes and edges listed in graph.json")
    p.add_argument("--out", default=None, help="write graph.json, scores.safetensors and graph-files/ here")
    report_arg(p)
    output_args(p)
