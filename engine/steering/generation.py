"""Steered generation: many steering vectors in one batched ``generate`` call.

Row ``(k, i)`` of the batch is prompt ``i`` with ``alpha * vectors[k]`` added to the residual after
block ``layer`` at every position, through the ``perturb`` op's per-row ``add``; the prompt and
every generated token are steered. Greedy decoding by default.
"""

from __future__ import annotations

import torch

from causalscan.errors import InputError, check_options, check_type, is_int
from causalscan.model import interventions as iv
from causalscan.progress import Progress, report


@torch.no_grad()
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
    """Completions ``[n_vectors][n_prompts]`` (decoded, special tokens skipped) of token-id ``prompts``
    steered by ``vectors`` [n, d_model] (``None``: one unsteered row per prompt), added at ``site``
    of ``layer`` (default: the residual after the block; a dictionary latent's direction goes
    where the dictionary writes).
    ``progress(stage, done, total)``: after each batched ``generate`` call."""
    check_options(alpha=alpha, max_new_tokens=max_new_tokens, layer=layer)
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
    model.check_length(max(len(x) for x in prompts) + max_new_tokens, field="max_new_tokens")
    if vectors is not None and not torch.isfinite(vectors).all():
        raise InputError("the steering vectors hold NaN or infinite entries", field="vectors")
    dev = model.device
    vecs = torch.zeros(1, model.adapter.d_model, device=dev) if vectors is None else vectors.to(dev)
    n, p = len(vecs), len(prompts)
    out: list[list[str]] = [[""] * p for _ in range(n)]
    tok = model.tokenizer
    gen_kw = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    calls = []  # (prompt length, rows (vector, prompt)) of each generate call
    for length in sorted({len(x) for x in prompts}):
        rows = [(k, i) for k in range(n) for i, x in enumerate(prompts) if len(x) == length]
        calls += [(length, rows[lo : lo + batch_rows]) for lo in range(0, len(rows), batch_rows)]
    for done, (length, chunk) in enumerate(calls, start=1):
        ids = torch.tensor([prompts[i] for _, i in chunk], device=dev)
        steer = vecs[torch.tensor([k for k, _ in chunk], device=dev)]  # [rows, d]
        with iv.perturb(model, iv.add(site, steer, alpha=alpha, layers=layer)):
            seqs = model.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen_kw)
        for (k, i), seq in zip(chunk, seqs[:, length:].tolist(), strict=True):
            out[k][i] = tok.decode(seq, skip_special_tokens=True).strip()
        report(progress, "generate", done, len(calls))
    return out
