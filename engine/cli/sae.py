"""``causalscan sae``: train a small TopK SAE at a site or a TopK transcoder (``train``), or convert a
Gemma Scope ``.npz`` into a SAELens folder (``convert``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from causalscan.cli.options import DTYPES, command
from causalscan.errors import InputError


def run(args) -> dict:
    from causalscan.model import saelens

    if args.action == "convert":
        if not args.npz or not args.hook_name:
            raise InputError("sae convert needs --npz FILE and --hook-name blocks.L.<hook>", field="npz")
        folder = saelens.from_npz(args.npz, args.out, args.hook_name, args.architecture)
        d = saelens.read(folder)
        doc = {"out": str(folder), "architecture": d.architecture, "site": d.site, "layer": d.layer, "d_sae": d.d_sae}
        if not args.json:
            print(f"wrote {folder}: {d.architecture} at {d.site} L{d.layer}, {d.d_sae} latents")
        return doc
    from causalscan.cli.job import bars, load
    from causalscan.data.prompts import encode, read_jsonl, read_prompts
    from causalscan.features.training import train

    if args.data is None:
        raise InputError('sae train needs --data: a JSONL of {"prompt": ...} lines', field="data")
    if args.site is None or args.layer is None or args.d_sae is None:
        raise InputError("sae train needs --site, --layer and --d-sae", field="site")
    texts = read_prompts(args.data)
    _, lines = read_jsonl(args.data)
    model = load(args)
    ids = [encode(model.tokenizer, t, args.chat, args.data, line) for t, line in zip(texts, lines, strict=True)]
    d, stats = train(
        model,
        args.site,
        args.layer,
        args.d_sae,
        ids,
        k=args.k,
        tokens=args.tokens,
        epochs=args.epochs,
        lr=args.lr,
        max_len=args.max_len,
        seed=args.seed,
        progress=bars(args),
    )
    args.bars.close()
    stats = {"model": args.model, "data": str(args.data), **stats}
    folder = saelens.write(d, args.out, model_name=args.model, training=stats)
    (Path(folder) / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(
        f"sae: explained variance {stats['explained_variance']:.3f}, dead latents {stats['dead_share']:.1%}, "
        f"L0 {stats['l0']:.1f} on {stats['held_out']} held-out tokens ({stats['tokens']} trained, "
        f"{stats['seconds']:.0f}s); wrote {folder}",
        file=sys.stderr,
    )
    return {"out": str(folder), **stats}


def add(sub) -> None:
    p = command(
        sub,
        "sae",
        run,
        help="train a small sparse autoencoder at a site, or convert an .npz dictionary",
        description="train: a TopK SAE on the activations of --data prompts at --site of --layer (--site mlp_in: "
        "a TopK transcoder from the MLP's input to its output), written in "
        "SAELens's format with its explained variance and dead-latent share (training.json); convert: a Gemma "
        "Scope style .npz into a SAELens folder (read without unpickling).",
    )
    p.add_argument("action", choices=["train", "convert"])
    p.add_argument("--model", default=None, help="train: HF directory, GGUF, zoo name or random:<family>")
    p.add_argument(
        "--site", default=None, help="train: resid_pre, resid_mid, resid_post, attn_out, mlp_out; mlp_in: a transcoder"
    )
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--d-sae", type=int, default=None, help="train: latents")
    p.add_argument("--k", type=int, default=32, help="train: active latents per token (default 32)")
    p.add_argument("--data", default=None, help='train: JSONL of {"prompt": ...} lines')
    p.add_argument("--chat", action="store_true", help="train: wrap each prompt in the chat template")
    p.add_argument("--tokens", type=int, default=200_000, help="train: activations collected (default 200000)")
    p.add_argument("--epochs", type=int, default=4, help="train: passes over them (default 4)")
    p.add_argument("--lr", type=float, default=None, help="train: Adam step (default 2e-4 / sqrt(d_sae / 16384))")
    p.add_argument("--max-len", type=int, default=128, help="train: tokens kept per prompt (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--npz", default=None, help="convert: the .npz file")
    p.add_argument(
        "--hook-name", default=None, help="convert: its TransformerLens hook, e.g. blocks.12.hook_resid_post"
    )
    p.add_argument("--architecture", default="jumprelu", help="convert: the dictionary's architecture (jumprelu)")
    p.add_argument("--out", required=True, help="the dictionary folder to write")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--json", action="store_true", help="print the result document on stdout")
    p.add_argument("--progress", action="store_true", help="progress bars on stderr even with --json")
