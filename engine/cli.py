"""Command line: ``causalscan <command> [options]``; ``--json`` prints one JSON document on stdout,
progress goes to stderr. Exit status: 0 success, 2 bad input (one line naming file, line, field),
1 internal failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from causalscan.errors import RANGES, InputError, check_options
from causalscan.progress import Bars, log


class _Stderr(logging.Handler):
    """Log records as plain lines on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def _shown(args) -> bool:
    """Progress on stderr: always, but under ``--json`` only with ``--progress``."""
    return getattr(args, "progress", False) or not args.json


def _bars(args) -> Bars:
    """Progress bars and notes on stderr; both silent under ``--json`` unless ``--progress``."""
    shown = _shown(args)
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        log.addHandler(_Stderr())
    log.setLevel(logging.INFO if shown else logging.WARNING)
    args.bars = Bars(enabled=shown)  # closed by main if the command is interrupted
    return args.bars


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result document on stdout")
    p.add_argument("--progress", action="store_true", help="progress bars on stderr even with --json")


def _report_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", action="store_true", help="also write report.html (one self-contained page) into --out")


def cmd_report(args) -> dict:
    from causalscan import report

    path = report.write(args.out, args.html)
    size = path.stat().st_size
    print(f"report: {path} ({size / 2**20:.1f} MiB)", file=sys.stderr)
    return {"report": str(path), "bytes": size}


def _model_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument(
        "--model",
        required=default is None,
        default=default,
        help="HF directory, zoo name, or random:<family>[-<size>]" + (f" (default: {default})" if default else ""),
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--device-map",
        default=None,
        metavar="auto|balanced|FILE",
        help="split the model across devices (instead of --device): auto, balanced, or a JSON file "
        "{module name: device}",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _data_args(p: argparse.ArgumentParser, metric: str = "logit_diff", out: str = "scan.json", top: int = 50) -> None:
    """Data, corruption, metric and output options shared by ``patch``, ``scan`` and ``trace``."""
    p.add_argument(
        "--data",
        default=None,
        help="JSONL of prompt pairs (clean, corrupt or noise_span, answer, wrong); default for a zoo "
        "model: its dataset",
    )
    p.add_argument(
        "--metric", default=metric, choices=["logit_diff", "logprob", "prob", "kl"], help=f"default: {metric}"
    )
    p.add_argument("--samples", type=int, default=10, help="noise_span pairs: Gaussian noise draws per pair")
    p.add_argument(
        "--noise-scale",
        type=float,
        default=3.0,
        help="noise_span pairs: noise std in units of the span-token embedding std (ROME: 3)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws (and of random samples)")
    p.add_argument("--chat", action="store_true", help="wrap every prompt in the tokenizer's chat template")
    p.add_argument("--out", default=None, help=f"write {out} and scores.safetensors here")
    p.add_argument("--top", type=int, default=top, help=f"rows listed in {out}")
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the batches on a Ray cluster's actors (ADDRESS: auto or host:port; none: start a local "
        "cluster); the result is the single-process result",
    )
    p.add_argument(
        "--actors",
        type=int,
        default=None,
        help="--ray: actors (default: one per GPU, or per CPU of the cluster without GPUs)",
    )
    _output_args(p)


def _sweep_args(p: argparse.ArgumentParser, sites: str, sites_help: str) -> None:
    """Sweeps and direction (``patch`` and ``scan``), with the data options."""
    _data_args(p)
    p.add_argument("--sites", default=sites, help=sites_help)
    p.add_argument("--direction", default="noising", choices=["noising", "denoising"])


def _load(args):
    import torch
    from transformers.utils import logging as hf_logging

    import causalscan

    split = getattr(args, "device_map", None)  # steer has no --device-map
    if split is not None and getattr(args, "ray", None) is not None:
        raise InputError(
            "--device-map with --ray: each Ray actor holds the whole model on its own device", field="device_map"
        )
    device = None if split else args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"loading {args.model} on {device or f'the devices of {split}'}", file=sys.stderr, flush=True)
    if _shown(args):  # transformers' own weight-loading bar follows ours
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    return causalscan.load(args.model, device=device, device_map=split, dtype=getattr(torch, args.dtype))


@contextlib.contextmanager
def _executor(args):
    """``--ray``: a :class:`causalscan.executor.Ray` on that cluster, closed afterwards; else None."""
    if args.ray is None:
        if args.actors is not None:
            raise InputError("--actors needs --ray", field="actors")
        yield None
        return
    from causalscan.executor import Ray

    gpus = 1 if args.device in (None, "cuda") and _cuda() else 0
    with Ray(args.ray or None, args.actors, gpus_per_actor=gpus) as ex:
        print(f"ray: {ex.n} actors", file=sys.stderr, flush=True)
        yield ex


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run", action="store_true", help="print the memory plan (predicted peak per device, chunk sizes) and stop"
    )
    p.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        help="memory the run may take per device (default: what each device has free); the planner "
        "refuses a run whose predicted peak is larger",
    )


def _planned(args, model, ds) -> dict | None:
    """The memory plan of this command: printed (and returned) with ``--dry-run``, checked against
    ``--memory-gb`` or the free memory either way (:class:`InputError` if the run cannot fit)."""
    from causalscan import memplan
    from causalscan.inputs import prepare
    from causalscan.sweeps import build_sweeps

    direction = getattr(args, "direction", "denoising")
    inp = prepare(model, ds, args.metric, direction, args.samples, args.noise_scale, args.seed)
    budget = args.memory_budget_mb << 20 if getattr(args, "memory_budget_mb", None) else None
    sites = [s for s in getattr(args, "sites", "").split(",") if s]
    if args.command == "scan":
        plan = memplan.scan_plan(
            inp,
            sites,
            args.method,
            args.batch_size,
            args.confirm,
            args.confirm_random,
            direction,
            args.graddrop,
            args.ig_steps,
            args.ig_path,
        )
    else:
        plan = memplan.Plan(memplan.weights(inp.model))
        if args.command == "patch":
            groups = [[c] for c in build_sweeps(inp.model, sites, inp.lengths, inp.dataset.name, inp.dataset.roles)[1]]
        else:
            from causalscan.tracing import trace_groups

            groups = trace_groups(inp, [k for k in args.kinds.split(",") if k], args.window)[1]
        memplan.patching_stage(plan, inp, groups, direction, budget, name="patching")
    if args.dry_run:
        print(plan, file=sys.stderr)
    limit = None if args.memory_gb is None else {d: int(args.memory_gb * 2**30) for d in plan.peak()}
    plan.check(limit)
    return plan.to_json() if args.dry_run else None


def _data_path(args, prefer: str | None = None) -> str:
    """``--data``, or a dataset shipped with a zoo ``--model`` (``prefer`` if it has one, else its first)."""
    if args.data:
        return args.data
    from causalscan import zoo

    if args.model in zoo.names():
        return str(zoo.dataset_path(args.model, prefer if prefer in zoo.card(args.model)["datasets"] else None))
    raise InputError("--data is required unless --model is a zoo model", field="data")


def _dataset(args, prefer: str | None = None):
    """The dataset of ``--data`` (or the zoo model's), every pair in the chat template with ``--chat``."""
    from causalscan.data import Dataset

    ds = Dataset.from_jsonl(_data_path(args, prefer))
    return Dataset([{**r, "chat": True} for r in ds.records], ds.name, ds.lines) if args.chat else ds


def cmd_patch(args) -> dict:
    from causalscan.patching import patch

    ds = _dataset(args)
    model = _load(args)
    if (plan := _planned(args, model, ds)) is not None:
        return {"plan": plan}
    with _executor(args) as ex:
        res = patch(
            model,
            ds,
            sites=[s for s in args.sites.split(",") if s],
            direction=args.direction,
            metric=args.metric,
            memory_budget=args.memory_budget_mb << 20 if args.memory_budget_mb else None,
            progress=_bars(args),
            samples=args.samples,
            noise_scale=args.noise_scale,
            seed=args.seed,
            executor=ex,
        )
    doc = res.to_json(top=args.top)
    if args.out:
        res.save(args.out, top=args.top)
        doc["out"] = str(args.out)
    print(f"patch: {doc['timings']['forwards']} forwards in {doc['timings']['patch_s']:.2f}s", file=sys.stderr)
    if not args.json:
        for row in doc["components"][:10]:
            print(f"{row['component']:<28} effect {row['exact']:+.4f}  |effect| {row['exact_abs']:.4f}")
    return doc


def cmd_scan(args) -> dict:
    from causalscan.scan import scan

    ds = _dataset(args)
    model = _load(args)
    if (plan := _planned(args, model, ds)) is not None:
        return {"plan": plan}
    with _executor(args) as ex:
        res = scan(
            model,
            ds,
            sites=[s for s in args.sites.split(",") if s],
            method=args.method,
            confirm=args.confirm,
            confirm_random=args.confirm_random,
            direction=args.direction,
            metric=args.metric,
            batch_size=args.batch_size,
            graddrop=args.graddrop,
            fn_subsets=args.fn_subsets,
            seed=args.seed,
            progress=_bars(args),
            samples=args.samples,
            noise_scale=args.noise_scale,
            checkpoint=args.out,
            ig_steps=args.ig_steps,
            ig_path=args.ig_path,
            executor=ex,
            **({} if args.exact_budget is None else {"exact_budget": args.exact_budget}),
        )
    doc = res.to_json(top=args.top)
    if args.out:
        res.save(args.out, top=args.top)
        doc["out"] = str(args.out)
    for name, s in (doc["agreement_by_sweep"] or {}).items():
        if untrusted(s):
            print(
                f"warning: sweep {name}: its estimates disagree with exact patching on {s['n']} confirmed nodes "
                f"(sign {s['sign_agreement']:.2f}, spearman {s['spearman']:.2f}); rank it by `causalscan patch "
                f"--sites {name}` or --method atp-ig",
                file=sys.stderr,
            )
    t = doc["timings"]
    print(f"scan: {len(res.components)} nodes, {len(res.clean)} pairs, {t['total_s']:.2f}s", file=sys.stderr)
    by = doc["settings"]["scored_by"]
    if "exact" in by.values():
        print(
            "patched exactly (cheaper than --exact-budget): "
            + ", ".join(n for n, m in by.items() if m == "exact")
            + "; estimated: "
            + (", ".join(n for n, m in by.items() if m != "exact") or "none"),
            file=sys.stderr,
        )
    if not args.json:
        print(f"{'component':<28} {'score':>10} {'estimate':>10} {'exact':>10}")
        for row in doc["components"][:10]:
            ex = "" if row["exact"] is None else f"{row['exact']:+10.4f}"
            print(f"{row['component']:<28} {row['score']:10.4f} {row['estimate']:+10.4f} {ex:>10}")
        a = doc["agreement"]
        if a:
            print(
                f"agreement on {a['n']} confirmed nodes (top {a['k']} + random): spearman {a['spearman']:.3f}, "
                f"recall@{a['k']} {a['recall_at_k']:.3f}, sign {a['sign_agreement']:.3f}"
            )
            for name, s in (doc["agreement_by_sweep"] if len(doc["agreement_by_sweep"]) > 1 else {}).items():
                print(
                    f"  {name:<12} {s['n']:4d} nodes (top {s['k']} + random): spearman {s['spearman']:.3f}, "
                    f"recall@{s['k']} {s['recall_at_k']:.3f}, sign {s['sign_agreement']:.3f}"
                )
        fn = doc["false_negatives"]
        if fn:
            print(
                f"false negatives: no unconfirmed node above {fn['bound']:.4f} (95% one-sided, "
                f"{fn['subsets']} joint patches)"
            )
    return doc


def untrusted(s: dict, min_sign: float = 0.9, min_spearman: float = 0.5) -> bool:
    """A sweep's agreement that should not be trusted: sign agreement (on at least 4 nodes that
    matter) or Spearman (on at least 4 confirmed nodes) below the bar; NaN is not evidence either way."""
    return (
        s.get("sign_nodes", s["n"]) >= 4
        and s["sign_agreement"] < min_sign
        or s["n"] >= 4
        and s["spearman"] < min_spearman
    )


def cmd_circuit(args) -> dict:
    from causalscan.circuits import circuit

    ds = _dataset(args, prefer="previous")
    model = _load(args)
    with _executor(args) as ex:
        res = circuit(
            model,
            ds,
            method=args.method,
            edges=args.edges,
            confirm=args.confirm,
            confirm_random=args.confirm_random,
            ig_steps=args.ig_steps,
            direction=args.direction,
            metric=args.metric,
            batch_size=args.batch_size,
            curve=not args.no_curve,
            ablation=args.ablation,
            memory_budget=args.memory_budget_mb << 20 if args.memory_budget_mb else None,
            seed=args.seed,
            progress=_bars(args),
            samples=args.samples,
            noise_scale=args.noise_scale,
            checkpoint=args.out,
            executor=ex,
        )
    doc = res.to_json(top=args.top)
    if args.out:
        res.save(args.out, top=args.top)
        doc["out"] = str(args.out)
    t = doc["timings"]
    print(f"circuit: {res.n_rows()} edges scored, {len(res.clean)} pairs, {t['total_s']:.2f}s", file=sys.stderr)
    a = doc["agreement"]
    if a and untrusted(a):
        print(
            f"warning: the edge estimates disagree with exact edge patching on {a['n']} confirmed edges (sign "
            f"{a['sign_agreement']:.2f}, spearman {a['spearman']:.2f}); try --method eap-ig or more --ig-steps",
            file=sys.stderr,
        )
    if not args.json:
        print(f"{'edge':<36} {'score':>10} {'exact':>10}")
        for row in doc["edges"][:10]:
            ex = "" if row["exact"] is None else f"{row['exact']:+10.4f}"
            print(f"{row['edge']:<36} {row['score']:+10.4f} {ex:>10}")
        if a:
            print(
                f"agreement on {a['n']} confirmed edges (top {a['k']} + random): spearman {a['spearman']:.3f}, "
                f"recall@{a['k']} {a['recall_at_k']:.3f}, sign {a['sign_agreement']:.3f}"
            )
        f = doc["faithfulness"]
        if f:
            print(
                "faithfulness (share of clean - corrupt kept by the top n edges): "
                + ", ".join(f"{n}: {r:.2f}" for n, r in zip(f["n"], f["recovered"], strict=True))
                + f"; 80% at {f['n_80']}, 95% at {f['n_95']} edges"
            )
    return doc


def cmd_trace(args) -> dict:
    from causalscan.tracing import trace

    ds = _dataset(args, prefer="subjects")
    model = _load(args)
    if (plan := _planned(args, model, ds)) is not None:
        return {"plan": plan}
    with _executor(args) as ex:
        res = trace(
            model,
            ds,
            kinds=[k for k in args.kinds.split(",") if k],
            window=args.window,
            metric=args.metric,
            samples=args.samples,
            noise_scale=args.noise_scale,
            seed=args.seed,
            progress=_bars(args),
            executor=ex,
        )
    doc = res.to_json(top=args.top)
    if args.out:
        res.save(args.out, top=args.top)
        doc["out"] = str(args.out)
    base = doc["baselines"]
    print(
        f"trace: {len(res.clean)} pairs, {doc['timings']['forwards']} forwards, {doc['timings']['trace_s']:.2f}s; "
        f"{res.metric} clean {base['clean']:.4f}, corrupt {base['corrupt']:.4f}",
        file=sys.stderr,
    )
    if not args.json:
        print(_heatmaps(res))
    return doc


def _heatmaps(res) -> str:
    """Each grid as text: share of ``clean - corrupt`` recovered, tokens x layers (noised tokens starred)."""
    t, lines = res.tensors(), []
    a, b = res.span or (0, 0)
    names = [("*" if a <= i < b else "") + tok.strip() for i, tok in enumerate(res.tokens)]
    width = max(len(n) for n in names) + 1
    for grid in res.effects:
        g = t[f"trace_norm/{grid}"]
        lines.append(f"{grid} (recovered share; layers 0..{g.shape[1] - 1})")
        for name, row in zip(names, g, strict=True):
            lines.append(f"  {name:<{width}}" + " ".join(f"{v:5.2f}" for v in row.tolist()))
    return "\n".join(lines)


def cmd_direction(args) -> dict:
    from causalscan.directions import directions
    from causalscan.elicit import read_prompts

    pos, neg = read_prompts(args.positive), read_prompts(args.negative)
    if (args.bake_layer is not None or args.control_vector) and not args.out:
        raise InputError("--bake-layer and --control-vector write into --out: give --out", field="out")
    model = _load(args)
    if args.bake_layer is not None and not 0 <= args.bake_layer < model.adapter.n_layers:
        raise InputError(
            f"layer {args.bake_layer} out of range for {model.adapter.n_layers} layers", field="bake_layer"
        )
    res = directions(model, pos, neg, position=args.position, probes=args.probes, chat=args.chat, seed=args.seed)
    doc = res.summary()
    if args.out:
        from pathlib import Path

        from causalscan.directions import bake, export_control_vector

        res.save(args.out)
        doc["out"] = str(args.out)
        if args.bake_layer is not None:
            doc["baked"] = str(bake(model, res.diff_means[args.bake_layer], Path(args.out) / "baked"))
        if args.control_vector:  # llama.cpp's direction.N is added to block N's output = our resid_pre of N + 1
            vectors = {n: res.diff_means[n + 1] for n in range(1, model.adapter.n_layers - 1)}
            doc["control_vector"] = str(
                export_control_vector(vectors, Path(args.out) / "control_vector.gguf", model.hf.config.model_type)
            )
    print(
        f"direction: {len(pos)} positive, {len(neg)} negative prompts, {doc['timings']['directions_s']:.2f}s",
        file=sys.stderr,
    )
    if not args.json:
        for layer, norm in enumerate(doc["diff_means_norm"]):
            cos = doc.get("pca_cosine_with_diff_means")
            print(f"layer {layer:3d}  |diff of means| {norm:10.4g}" + (f"  cos(pca) {cos[layer]:+.3f}" if cos else ""))
        for row in doc.get("best_probes", [])[:5]:
            print(f"probe L{row['layer']}.H{row['head']}  held-out accuracy {row['accuracy']:.3f}")
    return doc


def cmd_elicit(args) -> dict:
    from causalscan.elicit import elicit, read_prompts

    prompts = list(args.prompt or []) + (read_prompts(args.prompts) if args.prompts else [])
    try:
        positions = [int(x) for x in args.positions.split(",")] if args.positions else None
    except ValueError:
        raise InputError(
            f"must be comma-separated token positions, not {args.positions!r}", field="positions"
        ) from None
    model = _load(args)
    res = elicit(
        model,
        prompts or None,
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
        progress=_bars(args),
    )
    doc = res.summary()
    if args.out:
        res.save(args.out)
        doc["out"] = str(args.out)
    line = (
        f"elicit: {doc['method']}, {doc['n']} vectors, source {doc['source']} -> target {doc['target']}, "
        f"radius {doc['radius']:.3g}"
    )
    if "hits_learned" in doc:
        line += f"; {doc['phrase']!r} from {doc['hits_learned']} learned, {doc['hits_random']} random vectors"
    print(line, file=sys.stderr)
    if not args.json:
        for k in range(min(args.top, len(res.vectors))):
            print(f"vector {k:3d}  score {res.score[k].item():10.4g}  {res.completions[k][0]!r}")
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


def _radius(text: str) -> str | float:
    """``--radius``: ``auto`` or a number (its range is checked with the other options)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'auto', not {text!r}") from None


def cmd_steer(args) -> dict:
    import torch
    from safetensors import safe_open

    from causalscan.data import encode
    from causalscan.steering import generate

    try:
        with safe_open(args.vectors, "pt") as f:
            meta = f.metadata() or {}
            key = "random" if args.random else "vectors"
            vecs = f.get_tensor(key)
    except (OSError, ValueError, KeyError) as e:  # safetensors' own errors carry no file name
        raise InputError(f"not a vectors file from `causalscan elicit` ({e})", file=args.vectors) from None
    if not 0 <= args.index < len(vecs):
        raise InputError(f"index {args.index} out of range: the file holds {len(vecs)} vectors", field="index")
    if args.model is None:
        if "model" not in meta:
            raise InputError("the file names no model; give --model", file=args.vectors)
        args.model = meta["model"]
    layer = args.layer if args.layer is not None else int(meta.get("source", -1))
    if layer < 0:
        raise InputError("the file names no source layer; give --layer", file=args.vectors)
    if not torch.isfinite(vecs[args.index]).all():  # before loading the model
        raise InputError(f"vector {args.index} holds NaN or infinite entries", file=args.vectors)
    model = _load(args)
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


def cmd_tasks(args) -> dict:
    from causalscan import files, tasks

    model = _load(args)
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


def cmd_zoo(args) -> dict:
    from causalscan import zoo

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
        card = zoo.card(args.name)
        doc = {"path": str(zoo.path(args.name)), **card}
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


def _command(sub, name: str, fn, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose parsed arguments run ``fn``."""
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(fn=fn)
    return p


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="causalscan", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = _command(
        sub,
        "patch",
        cmd_patch,
        help="exact activation patching, many patches per forward",
        description="Exact activation patching of whole sweeps, batched.",
    )
    _model_args(pp)
    _plan_args(pp)
    _report_arg(pp)
    _sweep_args(
        pp,
        "head",
        "comma-separated sweeps: head, head:pos, resid_pre (by position), mlp_out:all, "
        "neuron, q, k, v, ... (default: head)",
    )
    pp.add_argument("--memory-budget-mb", type=int, default=None, help="memory per batched forward")

    sp = _command(
        sub,
        "scan",
        cmd_scan,
        help="AtP / AtP* scan of every component, confirmed by exact patching",
        description="Scan every component of the sweeps with attribution patching (AtP, AtP*), "
        "then confirm the top nodes and a random sample by batched exact patching. "
        "With no --model and no --data: the zoo's induction model on its dataset. "
        "With --out, partial attribution sums are written there as the scan goes "
        "and a rerun with the same settings resumes from them.",
    )
    _model_args(sp, default="induction")
    _plan_args(sp)
    _report_arg(sp)
    _sweep_args(
        sp,
        "head,neuron,resid_pre",
        "comma-separated sweeps (default: head,neuron,resid_pre); also q, k, "
        "v, attn_out, mlp_out, resid_post, head:pos, ...",
    )
    sp.add_argument("--method", default="atp*", choices=["atp", "atp*", "atp-ig"])
    sp.add_argument("--ig-steps", type=int, default=None, help="atp-ig: steps along the path (default 10)")
    sp.add_argument(
        "--ig-path",
        default="inputs",
        choices=["inputs", "activations"],
        help="atp-ig: interpolate the input embeddings (one path for every site, N passes) or each "
        "site's activation (N passes per site and layer; a site's attributions sum to its exact "
        "effect)",
    )
    sp.add_argument(
        "--exact-budget",
        type=float,
        default=None,
        help="patch a sweep exactly, not estimate it, when that costs at most this many plain "
        "forward + backward passes (default: causalscan.scan.EXACT_BUDGET, 20, with which the "
        "residual sweeps over named roles of a 135M model are exact, heads and neurons "
        "estimated; 0: estimate every sweep)",
    )
    sp.add_argument(
        "--graddrop",
        action="store_true",
        help="atp*: also GradDrop (one more backward per layer; it changed no ranking measured so far)",
    )
    sp.add_argument("--confirm", type=int, default=32, help="top nodes re-measured by exact patching (0: none)")
    sp.add_argument(
        "--confirm-random",
        type=int,
        default=None,
        help="random other nodes re-measured (default: as many as --confirm)",
    )
    sp.add_argument(
        "--fn-subsets", type=int, default=0, help="joint random patches for the false-negative bound (0: skip)"
    )
    sp.add_argument(
        "--batch-size", type=int, default=8, help="rows per attribution pass (a noise_span pair is --samples rows)"
    )

    cp = _command(
        sub,
        "circuit",
        cmd_circuit,
        help="edge attribution (EAP, EAP-IG), exact edge patching, faithfulness curve",
        description="Score every edge of the model's graph (each head's and MLP's residual write into "
        "each head's q/k/v input, each MLP's input and the logits) with EAP or EAP-IG, "
        "confirm the top edges and a random sample by exact edge patching, and measure "
        "the faithfulness of the top-n circuits. With --out: circuit.json, "
        "scores.safetensors and circuit.dot (Graphviz); the attribution stage writes its "
        "partial sums there as it goes, and a rerun with the same settings resumes. With no "
        "--model and no --data: the zoo's induction model on its 'previous' dataset.",
    )
    _model_args(cp, default="induction")
    _report_arg(cp)
    _data_args(cp, out="circuit.json")
    cp.add_argument("--direction", default="noising", choices=["noising", "denoising"])
    cp.add_argument("--method", default="eap-ig", choices=["eap", "eap-ig"])
    cp.add_argument("--ig-steps", type=int, default=None, help="eap-ig: steps along the input path (default 5)")
    cp.add_argument("--edges", type=int, default=200, help="the circuit's size: its top edges in the outputs")
    cp.add_argument("--confirm", type=int, default=50, help="top edges re-measured by exact edge patching (0: none)")
    cp.add_argument(
        "--confirm-random",
        type=int,
        default=None,
        help="random other edges re-measured (default: as many as --confirm)",
    )
    cp.add_argument(
        "--ablation",
        default="patch",
        choices=["patch", "mean"],
        help="faithfulness: edges outside the circuit take the corrupt run's value or its mean",
    )
    cp.add_argument("--no-curve", action="store_true", help="skip the faithfulness curve")
    cp.add_argument("--batch-size", type=int, default=8, help="rows per attribution pass")
    cp.add_argument("--memory-budget-mb", type=int, default=None, help="memory per edge-patched forward")

    tp = _command(
        sub,
        "trace",
        cmd_trace,
        help="ROME causal tracing: token x layer effects of restoring clean values",
        description="Causal tracing: restore the clean residual state, MLP or attention output at "
        "each token and layer of the corrupt run (Gaussian noise on noise_span, or the "
        "corrupt prompt). With no --model and no --data: the zoo's facts model on its "
        "subjects dataset.",
    )
    _model_args(tp, default="facts")
    _plan_args(tp)
    _data_args(tp, metric="prob", out="trace.json", top=20)
    _report_arg(tp)
    tp.add_argument("--kinds", default="state,mlp,attn", help="comma-separated: state, mlp, attn")
    tp.add_argument(
        "--window",
        type=int,
        default=10,
        help="layers restored together for mlp and attn (ROME: 10; single-layer grids come too)",
    )

    ep = _command(
        sub,
        "elicit",
        cmd_elicit,
        help="search steering vectors (MELBO, DCT) that surface hidden behaviours",
        description="Learn steering vectors without a target (MELBO or DCT), then generate with "
        "each of them and with as many random vectors of the same norm. With no "
        "--model and no prompt: the zoo's backdoor model on its clean prompts.",
    )
    _model_args(ep, default="backdoor")
    _report_arg(ep)
    ep.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    ep.add_argument("--prompts", default=None, help='JSONL of {"prompt": "..."} lines')
    ep.add_argument("--chat", action="store_true", help="wrap every prompt in the tokenizer's chat template")
    ep.add_argument("--method", default="dct", choices=["dct", "melbo"])
    ep.add_argument("--n", type=int, default=64, help="vectors to learn (and random baselines)")
    ep.add_argument(
        "--source",
        type=int,
        default=None,
        help="add the vector after this block (default: a quarter of the way to the target)",
    )
    ep.add_argument(
        "--target",
        type=int,
        default=None,
        help="read the response after this block (default: L - 8, or the last block below 16 layers)",
    )
    ep.add_argument("--radius", type=_radius, default="auto", help="vector norm, or auto (non-linear share 0.5)")
    ep.add_argument("--p", type=float, default=2.0, help="MELBO objective exponent p")
    ep.add_argument("--q", type=float, default=1.0, help="MELBO objective exponent q")
    ep.add_argument("--positions", default=None, help="comma-separated target positions (default: all)")
    ep.add_argument("--steps", type=int, default=None, help="MELBO steps per vector (50) / DCT iterations (10)")
    ep.add_argument("--max-new-tokens", type=int, default=8)
    ep.add_argument(
        "--phrase", default=None, help="count vectors whose completions contain it (default: the zoo card's phrase)"
    )
    ep.add_argument("--seed", type=int, default=0)
    ep.add_argument("--top", type=int, default=10, help="vectors listed on stdout")
    ep.add_argument(
        "--out",
        default=None,
        help="write vectors.safetensors, completions.jsonl, summary.json here "
        "(MELBO writes its finished vectors there as it goes, and resumes)",
    )
    _output_args(ep)

    dp = _command(
        sub,
        "direction",
        cmd_direction,
        help="directions from contrasting prompts (diff of means, PCA, ITI probes)",
        description="Candidate directions at every layer's residual from two prompt sets: the "
        "difference of their means, the first principal component of paired differences, "
        "and with --probes a logistic probe per head (held-out accuracy).",
    )
    _model_args(dp)
    dp.add_argument("--positive", required=True, help='JSONL of {"prompt": "..."}: prompts with the behaviour')
    dp.add_argument("--negative", required=True, help='JSONL of {"prompt": "..."}: prompts without it')
    dp.add_argument(
        "--position",
        type=_position,
        default="last",
        help="last, mean, a token index (negative: from the end) or a span START:STOP",
    )
    dp.add_argument("--probes", action="store_true", help="fit ITI's per-head logistic probes too")
    dp.add_argument("--chat", action="store_true", help="wrap every prompt in the tokenizer's chat template")
    dp.add_argument("--seed", type=int, default=0, help="seed of the probes' held-out split")
    dp.add_argument("--out", default=None, help="write directions.safetensors and directions.json here")
    dp.add_argument(
        "--bake-layer",
        type=int,
        default=None,
        help="also write OUT/baked: the model with that layer's difference of means orthogonalised "
        "out of its weights (an HF directory, safetensors)",
    )
    dp.add_argument(
        "--control-vector",
        action="store_true",
        help="also write OUT/control_vector.gguf: the differences of means as a llama.cpp control "
        "vector (needs the gguf extra)",
    )
    _output_args(dp)

    stp = _command(
        sub,
        "steer",
        cmd_steer,
        help="generate with one vector of an elicit run",
        description="Greedy generation with vector --index of a vectors.safetensors file added "
        "(times --alpha) after the file's source block, beside the unsteered one.",
    )
    stp.add_argument("--vectors", required=True, help="vectors.safetensors from `causalscan elicit`")
    stp.add_argument("--index", type=int, required=True)
    stp.add_argument("--alpha", type=float, default=1.0, help="scale of the vector (1: its learned norm)")
    stp.add_argument("--prompt", required=True)
    stp.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    stp.add_argument("--random", action="store_true", help="use the file's random baseline vectors")
    stp.add_argument("--layer", type=int, default=None, help="source block (default: the file's)")
    stp.add_argument("--model", default=None, help="default: the model named in the file")
    stp.add_argument("--device", default=None)
    stp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    stp.add_argument("--max-new-tokens", type=int, default=8)
    stp.add_argument("--json", action="store_true")

    kp = _command(
        sub,
        "tasks",
        cmd_tasks,
        help="write a task dataset (IOI, greater-than, facts) for a tokenizer",
        description="Build a pair dataset people know for the tokenizer of --model: names and words "
        "kept only where they are one token. ioi: Wang et al.'s templates with flip_s2 or "
        "abc corruption; greater_than: Hanna et al.'s years (answers of several tokens where "
        "the tokenizer splits digits); facts: factual recall with noise on the subject.",
    )
    kp.add_argument("task", choices=["ioi", "greater_than", "facts"])
    _model_args(kp)
    kp.add_argument("--n", type=int, default=64, help="pairs (facts: at most the built-in list)")
    kp.add_argument("--seed", type=int, default=0)
    kp.add_argument("--templates", default=None, help="ioi: comma-separated template indices (default: all)")
    kp.add_argument("--corruption", default="flip_s2", choices=["flip_s2", "abc"], help="ioi corruption")
    kp.add_argument("--out", default=None, help="JSONL file to write (default: stdout)")
    kp.add_argument("--json", action="store_true", help="print a JSON document (with the records) on stdout")

    rp = _command(
        sub,
        "report",
        cmd_report,
        help="write report.html from a result directory",
        description="One self-contained HTML page (plotly inline, no network) of what scan, patch, "
        "trace or elicit saved in DIR: heatmaps per sweep, estimate against exact, the "
        "ranked table, tracing grids, elicited completions.",
    )
    rp.add_argument("out", metavar="DIR", help="a directory written by scan, patch, trace or elicit --out")
    rp.add_argument("--html", default=None, help="write the page here instead of DIR/report.html")
    rp.add_argument("--json", action="store_true", help="print the result document on stdout")

    zp = _command(
        sub,
        "zoo",
        cmd_zoo,
        help="bundled models with planted mechanisms: list, show NAME, train NAME",
        description="The model zoo: list the bundled models, show a card, or re-run a recipe.",
    )
    zp.add_argument("action", choices=["list", "show", "train"])
    zp.add_argument("name", nargs="?", default=None, help="zoo model (see `causalscan zoo list`)")
    zp.add_argument("--out", default=None, help="train: output directory (default out/zoo/NAME)")
    zp.add_argument("--seed", type=int, default=0, help="train: seed (the shipped models use 0)")
    zp.add_argument("--json", action="store_true", help="print the result document on stdout")
    return p


def _partial(args) -> str:
    """Where an interrupted command left its work, in words."""
    if not getattr(args, "out", None):
        return "nothing was saved (with --out, scan and elicit --method melbo keep their partial work)"
    if args.command == "scan" or args.command == "elicit" and args.method == "melbo":
        return f"partial results are in {args.out}; the same command resumes from them"
    return f"nothing was written to {args.out}; the command starts over when rerun"


def main(argv: list[str] | None = None) -> int:
    from causalscan import files

    args = parser().parse_args(argv)
    out = getattr(args, "out", None)
    try:
        # every numeric option in range, and --out writable, before any file is read or model loaded
        check_options(**{k: v for k, v in vars(args).items() if k in RANGES})
        if out and args.command == "tasks":
            files.out_file(out)
        elif out:
            files.out_dir(out)
        if getattr(args, "report", False) and not out:
            raise InputError("--report writes report.html into --out: give --out", field="report")
        with files.lock(out) if out and args.command != "tasks" else contextlib.nullcontext():
            doc = args.fn(args)
            if getattr(args, "report", False):
                from causalscan import report

                doc["report"] = str(report.write(out))
                print(f"report: {doc['report']}", file=sys.stderr)
    except InputError as e:
        print(f"causalscan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "bars", None):
            args.bars.close()  # ends the bar's line, so the note is a line of its own
        print(f"causalscan: interrupted; {_partial(args)}", file=sys.stderr)
        return 130
    except Exception as e:  # internal failure: keep the traceback for the report
        import traceback

        traceback.print_exc()
        print(f"causalscan: internal error: {e}", file=sys.stderr)
        return 1
    if args.json:
        from causalscan.files import strict_json

        print(strict_json(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
