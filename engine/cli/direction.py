"""``causalscan direction``: candidate directions at every layer from two prompt sets (difference of
means, PCA of paired differences, ITI probes), baked into the weights or exported on request."""

from __future__ import annotations

import argparse
from pathlib import Path

from causalscan.cli.job import load, say
from causalscan.cli.options import command, model_args, output_args
from causalscan.data.prompts import read_prompts
from causalscan.errors import InputError
from causalscan.steering.baking import bake, export_control_vector
from causalscan.steering.directions import DirectionResult, directions


def run(args) -> dict:
    pos, neg = read_prompts(args.positive), read_prompts(args.negative)
    if (args.bake_layer is not None or args.control_vector) and not args.out:
        raise InputError("--bake-layer and --control-vector write into --out: give --out", field="out")
    model = load(args)
    if args.bake_layer is not None and not 0 <= args.bake_layer < model.adapter.n_layers:
        raise InputError(
            f"layer {args.bake_layer} out of range for {model.adapter.n_layers} layers", field="bake_layer"
        )
    res = directions(model, pos, neg, position=args.position, probes=args.probes, chat=args.chat, seed=args.seed)
    doc = res.summary()
    if args.out:
        res.save(args.out)
        doc["out"] = str(args.out)
        if args.bake_layer is not None:
            doc["baked"] = str(bake(model, res.diff_means[args.bake_layer], Path(args.out) / "baked"))
        if args.control_vector:  # llama.cpp's direction.N is added to block N's output = our resid_pre of N + 1
            vectors = {n: res.diff_means[n + 1] for n in range(1, model.adapter.n_layers - 1)}
            path = Path(args.out) / "control_vector.gguf"
            doc["control_vector"] = str(export_control_vector(vectors, path, model.hf.config.model_type))
    say(res, doc, args)
    return doc


def _position(text: str):
    """``--position``: ``last``, ``mean``, a token index, or ``START:STOP``."""
    if text in ("last", "mean"):
        return text
    try:
        if ":" in text:
            a, b = text.split(":")
            return int(a), int(b)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be last, mean, an index or START:STOP, not {text!r}") from None


def add(sub) -> None:
    p = command(
        sub,
        "direction",
        run,
        result=DirectionResult,
        help="directions from contrasting prompts (diff of means, PCA, ITI probes)",
        description="Candidate directions at every layer's residual from two prompt sets: the difference of "
        "their means, the first principal component of paired differences, and with --probes a "
        "logistic probe per head (held-out accuracy).",
    )
    model_args(p)
    p.add_argument("--positive", required=True, help='JSONL of {"prompt": "..."}: prompts with the behaviour')
    p.add_argument("--negative", required=True, help='JSONL of {"prompt": "..."}: prompts without it')
    p.add_argument(
        "--position",
        type=_position,
        default="last",
        help="last, mean, a token index (negative: from the end) or a span START:STOP",
    )
    p.add_argument("--probes", action="store_true", help="fit ITI's per-head logistic probes too")
    p.add_argument("--chat", action="store_true", help="wrap every prompt in the tokenizer's chat template")
    p.add_argument("--seed", type=int, default=0, help="seed of the probes' held-out split")
    p.add_argument("--out", default=None, help="write directions.safetensors and directions.json here")
    p.add_argument(
        "--bake-layer",
        type=int,
        default=None,
        help="also write OUT/baked: the model with that layer's difference of means orthogonalised out of "
        "its weights (an HF directory, safetensors)",
    )
    p.add_argument(
        "--control-vector",
        action="store_true",
        help="also write OUT/control_vector.gguf: the differences of means as a llama.cpp control vector "
        "(needs the gguf extra)",
    )
    output_args(p)
