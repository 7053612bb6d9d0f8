"""``causalscan steer``: greedy generation with one vector of an ``elicit`` or ``audit`` run, beside the
unsteered one."""

from __future__ import annotations

from causalscan.cli.job import load
from causalscan.cli.options import DTYPES, command, sae_arg
from causalscan.data.prompts import encode
from causalscan.errors import InputError
from causalscan.steering.generation import generate


def run(args) -> dict:
    if args.sae is not None or args.feature is not None:
        return _run_feature(args)
    if args.vectors is None or args.index is None:
        raise InputError(
            "give --vectors FILE --index N (an elicit run's vector), or --sae DIR --feature N", field="vectors"
        )
    import torch
    from safetensors import safe_open

    try:
        with safe_open(args.vectors, "pt") as f:
            meta = f.metadata() or {}
            key = "random" if args.random else "vectors"
            vecs = f.get_tensor(key)
            per_vector = {"vectors": "layers", "random": "layers_random"}[key]  # an audit's: one layer each
            layers = f.get_tensor(per_vector) if per_vector in f.keys() else None
    except (OSError, ValueError, KeyError) as e:  # safetensors' own errors carry no file name
        raise InputError(f"not a vectors file from `causalscan elicit` or `audit` ({e})", file=args.vectors) from None
    if not 0 <= args.index < len(vecs):
        raise InputError(f"index {args.index} out of range: the file holds {len(vecs)} vectors", field="index")
    if args.model is None:
        if "model" not in meta:
            raise InputError("the file names no model; give --model", file=args.vectors)
        args.model = meta["model"]
    own = int(layers[args.index]) if layers is not None else int(meta.get("source", -1))
    layer = args.layer if args.layer is not None else own
    if layer < 0:
        raise InputError("the file names no source layer; give --layer", file=args.vectors)
    if not torch.isfinite(vecs[args.index]).all():  # before loading the model
        raise InputError(f"vector {args.index} holds NaN or infinite entries", file=args.vectors)
    model = load(args)
    ids = [encode(model.tokenizer, args.prompt, args.chat)]
    both = torch.cat([vecs[args.index : args.index + 1], torch.zeros_like(vecs[:1])])  # steered and plain rows
    (steered,), (plain,) = generate(model, ids, both, layer, alpha=args.alpha, max_new_tokens=args.max_new_tokens)
    if not args.json:
        print(f"steered: {steered}\nplain:   {plain}")
    return {
        "model": args.model,
        "vector": args.index,
        "kind": key,
        "layer": layer,
        "alpha": args.alpha,
        "prompt": args.prompt,
        "completion": steered,
        "unsteered": plain,
    }


def _run_feature(args) -> dict:
    """``--sae DIR --feature N``: latent N's decoder direction, added where the dictionary writes."""
    import torch

    if args.sae is None or args.feature is None or len(args.sae) != 1:
        raise InputError("steering by a latent takes one --sae DIR and --feature N", field="feature")
    if args.model is None:
        raise InputError("give --model (the model the dictionary was trained on)", field="model")
    if args.vectors is not None:
        raise InputError("give --vectors or --sae/--feature, not both", field="vectors")
    model = load(args)
    (d,) = model.adapter.dictionaries.values()
    if not 0 <= args.feature < d.d_sae:
        raise InputError(f"feature {args.feature} out of range: the dictionary has {d.d_sae} latents", field="feature")
    ids = [encode(model.tokenizer, args.prompt, args.chat)]
    both = torch.stack([d.direction(args.feature), torch.zeros(d.d_out)])
    (steered,), (plain,) = generate(
        model, ids, both, d.layer, alpha=args.alpha, max_new_tokens=args.max_new_tokens, site=d.writes
    )
    if not args.json:
        print(f"steered: {steered}\nplain:   {plain}")
    return {
        "model": args.model,
        "sae": args.sae[0],
        "feature": args.feature,
        "site": d.writes,
        "layer": d.layer,
        "alpha": args.alpha,
        "prompt": args.prompt,
        "completion": steered,
        "unsteered": plain,
    }


def add(sub) -> None:
    p = command(
        sub,
        "steer",
        run,
        help="generate with one vector of an elicit run, or a dictionary latent's direction",
        description="Greedy generation with vector --index of a vectors.safetensors file added (times "
        "--alpha) after the file's source block, or with latent --feature of dictionary --sae (its "
        "decoder row times --alpha, where the dictionary writes), beside the unsteered one.",
    )
    p.add_argument(
        "--vectors",
        default=None,
        help="vectors.safetensors from `causalscan elicit` or `audit` (ranked: 0 is the best)",
    )
    p.add_argument("--index", type=int, default=None)
    sae_arg(p)
    p.add_argument("--feature", type=int, default=None, help="with --sae: the latent whose decoder row steers")
    p.add_argument("--alpha", type=float, default=1.0, help="scale of the vector (1: its learned norm)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--random", action="store_true", help="use the file's random baseline vectors")
    p.add_argument("--layer", type=int, default=None, help="source block (default: the file's, or the vector's)")
    p.add_argument("--model", default=None, help="default: the model named in the file")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--json", action="store_true")
