"""The option groups several commands share: the model, the data and corruption, sweeps, the memory
plan, the report, and the output (``--json``, ``--progress``)."""

from __future__ import annotations

import argparse

DTYPES = ["float32", "bfloat16", "float16"]


def command(sub, name: str, fn, help: str, description: str, result=None) -> argparse.ArgumentParser:
    """A subcommand whose parsed arguments run ``fn``; ``result``: the result class it makes (whether an
    interrupted run resumes)."""
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(fn=fn, result=result)
    return p


def output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result document on stdout")
    p.add_argument("--progress", action="store_true", help="progress bars on stderr even with --json")


def report_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", action="store_true", help="also write report.html (one self-contained page) into --out")


def model_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
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
    p.add_argument("--dtype", default="float32", choices=DTYPES)


def sae_arg(p: argparse.ArgumentParser, what: str = "adds the sites feature (its latents) and feature_error") -> None:
    p.add_argument(
        "--sae",
        action="append",
        default=None,
        metavar="DIR",
        help="a dictionary folder in SAELens's format (cfg.json, sae_weights.safetensors), repeatable (one per "
        f"layer): {what}",
    )


def data_args(p: argparse.ArgumentParser, metric: str = "logit_diff", out: str = "scan.json", top: int = 50) -> None:
    """Data, corruption, metric, output and Ray options shared by ``patch``, ``scan``, ``trace`` and ``circuit``."""
    p.add_argument(
        "--data",
        default=None,
        help="JSONL of prompt pairs (clean, corrupt or noise_span, answer, "
        "wrong); default for a zoo model: its dataset",
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
    ray_args(p)
    output_args(p)


def ray_args(p: argparse.ArgumentParser, units: str = "batches") -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help=f"run the {units} on a Ray cluster's actors (ADDRESS: auto or host:port; none: start a local "
        "cluster); the result is the single-process result",
    )
    p.add_argument(
        "--actors",
        type=int,
        default=None,
        help="--ray: actors (default: one per GPU, or per CPU of the cluster without GPUs)",
    )


def search_args(p: argparse.ArgumentParser, methods) -> None:
    """The prompts and the search method of ``elicit`` and ``audit``."""
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help='JSONL of {"prompt": "..."} lines')
    p.add_argument("--chat", action="store_true", help="wrap every prompt in the tokenizer's chat template")
    p.add_argument("--method", default="dct", choices=sorted(methods))


def sweep_args(p: argparse.ArgumentParser, sites: str, sites_help: str) -> None:
    """Sweeps and direction (``patch`` and ``scan``), with the data options."""
    data_args(p)
    p.add_argument("--sites", default=sites, help=sites_help)
    p.add_argument("--direction", default="noising", choices=["noising", "denoising"])


def plan_args(p: argparse.ArgumentParser) -> None:
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


def names(text: str) -> list[str]:
    """A comma-separated option as its names (empty pieces skipped)."""
    return [s for s in text.split(",") if s]
