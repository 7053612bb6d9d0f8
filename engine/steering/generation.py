"""Steered generation: many steering vectors in one batched ``generate`` call.

Row ``(k, i)`` of the batch is prompt ``i`` with ``alpha * vectors[k]`` added to the residual after
block ``layer`` at every position, through the ``perturb`` op's per-row ``add``; the prompt and
every generated token are steered. Greedy decoding by default; ``do_sample`` draws from the
model's distribution (at ``temperature``) under a seed of its own, so the same call gives the same
completions in any process and leaves the caller's random state as it was.
"""

from __future__ import annotations

import torch

from causalscan.errors import InputError, check_options, check_type, is_int
from causalscan.model import interventions as iv
from causalscan.progress import Progress, report


@torch.no_grad()
def generate_ids(
    model,
    prompts: list[list[int]],
    vectors: torch.Tensor | None,
    layer: int,
    alpha: float = 1.0,
    max_new_tokens: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    batch_rows: int = 512,
    progress: Progress | None = None,
    site: str = "resid_post",
) -> torch.Tensor:
    """The generated token ids ``[n_vectors, n_prompts, max_new_tokens]`` (on the CPU) of token-id
    ``prompts`` steered by ``vectors`` [n, d_model] (``None``: one unsteered row per prompt), added at
    ``site`` of ``layer`` (default: the residual after the block; a dictionary latent's direction goes
    where the dictionary writes). A row ends at its first end-of-sequence token; what follows it is
    ``-1``. ``progress(stage, done, total)``: after each batched ``generate`` call."""
    check_options(alpha=alpha, max_new_tokens=max_new_tokens, layer=layer, seed=seed)
    if not 0 <= layer < model.adapter.n_layers:
        raise InputError(f"layer {layer} out of range for {model.adapter.n_layers} layers", field="layer")
    if (
        not isinstance(prompts, list | tuple)
        or not prompts
        or not all(isinstance(x, list | tuple) and x and all(is_int(t) for t in x) for x in prompts)
    ):
        raise InputError(f"must be a non-empty list of token-id lists, not {prompts!r:.60}", field="prompts")
    if vectors is not None:
        check_type(vectors, torch.Tensor, "vectors", "a tensor [n, d_model] or None")
    if not temperature > 0:
        raise InputError(f"must be > 0, not {temperature!r}", field="temperature")
    model.check_length(max(len(x) for x in prompts) + max_new_tokens, field="max_new_tokens")
    if vectors is not None and not torch.isfinite(vectors).all():
        raise InputError("the steering vectors hold NaN or infinite entries", field="vectors")
    dev = model.device
    vecs = torch.zeros(1, model.adapter.d_model, device=dev) if vectors is None else vectors.to(dev)
    n, p = len(vecs), len(prompts)
    out = torch.full((n, p, max_new_tokens), -1, dtype=torch.long)
    tok = model.tokenizer
    eos = end_tokens(model)
    gen_kw = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (eos or [0])[0],
        **({"temperature": temperature, "top_k": None, "top_p": None} if do_sample else {}),
    )
    calls = []  # (prompt length, rows (vector, prompt)) of each generate call
    for length in sorted({len(x) for x in prompts}):
        rows = [(k, i) for k in range(n) for i, x in enumerate(prompts) if len(x) == length]
        calls += [(length, rows[lo : lo + batch_rows]) for lo in range(0, len(rows), batch_rows)]
    devices = [dev] if torch.device(dev).type == "cuda" else []
    for done, (length, chunk) in enumerate(calls, start=1):
        ids = torch.tensor([prompts[i] for _, i in chunk], device=dev)
        steer = vecs[torch.tensor([k for k, _ in chunk], device=dev)]  # [rows, d]
        with torch.random.fork_rng(devices=devices), iv.perturb(model, iv.add(site, steer, alpha=alpha, layers=layer)):
            torch.manual_seed(seed + done)
            seqs = model.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen_kw)[:, length:].cpu()
        is_end = torch.isin(seqs, torch.tensor(eos, dtype=torch.long)).long()
        seqs = seqs.masked_fill(is_end.cumsum(1) - is_end > 0, -1)  # after the first end: -1
        idx = torch.tensor(chunk)
        out[idx[:, 0], idx[:, 1], : seqs.shape[1]] = seqs
        report(progress, "generate", done, len(calls))
    return out


def end_tokens(model) -> list[int]:
    """The ids that end a generated sequence (the generation config's ``eos_token_id``, else the tokenizer's)."""
    eos = getattr(model.hf.generation_config, "eos_token_id", None)
    eos = model.tokenizer.eos_token_id if eos is None else eos
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def decode(tokenizer, ids) -> str:
    """One generated row (a tensor or list; ``-1`` after its end) as text, special tokens skipped."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return tokenizer.decode([t for t in ids if t >= 0], skip_special_tokens=True).strip()


def generate(
    model,
    prompts: list[list[int]],
    vectors: torch.Tensor | None,
    layer: int,
    alpha: float = 1.0,
    max_new_tokens: int = 8,
    do_sample: bool = False,
    batch_rows: int = 512,
    progress: Progress | None = None,
    site: str = "resid_post",
) -> list[list[str]]:
    """Completions ``[n_vectors][n_prompts]`` (decoded, special tokens skipped) of :func:`generate_ids`."""
    ids = generate_ids(
        model,
        prompts,
        vectors,
        layer,
        alpha=alpha,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        batch_rows=batch_rows,
        progress=progress,
        site=site,
    )
    return [[decode(model.tokenizer, row) for row in per_vector] for per_vector in ids]
