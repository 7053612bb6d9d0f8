"""A direction in the weights: a copy of the model with the direction orthogonalised out of every
residual write (Arditi et al. 2024's weight orthogonalisation: the same model as projecting it out
at run time), saved as an HF directory, and directions exported as llama.cpp control vectors.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from causalscan import files
from causalscan.errors import InputError, check_vector
from causalscan.model.adapters import Adapter
from causalscan.model.load import Model, load

POSITION_TABLES = ("wpe", "embed_positions")  # learned position embeddings that write to the residual


def _writers(model) -> list[tuple[torch.nn.Module, str]]:
    """Every module whose output is added to the residual stream, with how its weight maps into it:
    ``"rows"`` (embedding tables: one residual vector per row), ``"linear"`` (``nn.Linear``: output
    = ``W x + b``, ``W`` [d_model, in]) or ``"conv1d"`` (GPT-2's ``Conv1D``: ``x W + b``, ``W`` [in, d_model])."""
    ad = model.adapter
    out = [(model.hf.get_input_embeddings(), "rows")]
    out += [(m, "rows") for name, m in model.hf.named_modules() if name.rsplit(".", 1)[-1] in POSITION_TABLES]
    for layer in range(ad.n_layers):
        for site in ("attn_out", "mlp_out"):
            module, _ = ad.hook_point(site, layer)
            if isinstance(module, torch.nn.Linear):
                out.append((module, "linear"))
            elif type(module).__name__ == "Conv1D":
                out.append((module, "conv1d"))
            else:
                raise InputError(
                    f"{ad.family.name}: the {site} write of layer {layer} comes from a "
                    f"{type(module).__name__}, not a linear map; its weights cannot be made "
                    "orthogonal to a direction (ablate at run time instead)",
                    field="model",
                )
    return out


@torch.no_grad()
def orthogonalise(model, direction: torch.Tensor) -> None:
    """Make every residual write of ``model`` (embeddings, position table, attention and MLP output
    projections, their biases) orthogonal to ``direction`` [d_model], in place: the same model as
    projecting ``direction`` out of each write at run time. A tied output embedding is untied first
    (the unembedding reads the residual and keeps its weights)."""
    hf = model.hf
    out_emb, in_emb = hf.get_output_embeddings(), hf.get_input_embeddings()
    if out_emb is not None and out_emb.weight is in_emb.weight:
        out_emb.weight = torch.nn.Parameter(in_emb.weight.detach().clone())
        hf.config.tie_word_embeddings = False
        if hasattr(hf.config, "get_text_config"):
            hf.config.get_text_config().tie_word_embeddings = False
    writers = _writers(model)
    u = direction.detach().double()
    u = u / u.norm()
    for module, kind in writers:
        w = module.weight
        wd, ud = w.double(), u.to(w.device)
        if kind == "rows":
            w.copy_(wd - (wd @ ud)[:, None] * ud)
        elif kind == "linear":
            w.copy_(wd - ud[:, None] * (ud @ wd)[None])
        else:
            w.copy_(wd - (wd @ ud)[:, None] * ud[None])
        b = getattr(module, "bias", None)
        if b is not None and kind != "rows":
            b.copy_(b.double() - (b.double() @ ud) * ud)


def bake(model, direction: torch.Tensor, out_dir: str | Path) -> Path:
    """A copy of ``model`` with ``direction`` orthogonalised out of its weights (:func:`orthogonalise`),
    saved as an HF directory (safetensors) with its tokenizer; ``causalscan.load`` reads it back."""
    model = load(model)
    check_vector(direction, model.adapter.d_model, "direction")
    hf = copy.deepcopy(model.hf)
    copy_ = Model(hf, Adapter(hf), model.tokenizer, model.name, model.card)
    orthogonalise(copy_, direction)
    out = files.out_dir(out_dir)
    copy_.hf.save_pretrained(str(out), safe_serialization=True)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
    return out


def export_control_vector(vectors: dict[int, torch.Tensor], path: str | Path, model_hint: str) -> Path:
    """``vectors`` ``{layer: [d_model]}`` (each added to the output of block ``layer``, our
    ``resid_post``) as a llama.cpp control-vector GGUF file: architecture ``controlvector``,
    ``controlvector.model_hint`` and ``controlvector.layer_count``, one fp32 tensor ``direction.<layer>``
    per layer (llama.cpp's layer index; its loader ignores ``direction.0``). Not checked against a
    llama.cpp build here: none is installed."""
    import gguf

    if not vectors or not all(isinstance(k, int) and k >= 1 for k in vectors):
        raise InputError(
            "needs vectors for layers >= 1 (llama.cpp steers the outputs of blocks 1..L-1)", field="vectors"
        )
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "controlvector")
    writer.add_string("controlvector.model_hint", model_hint)
    writer.add_uint32("controlvector.layer_count", len(vectors))
    for layer in sorted(vectors):
        v = vectors[layer]
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or not torch.isfinite(v).all():
            raise InputError(f"layer {layer}: must be a finite tensor [d_model]", field="vectors")
        writer.add_tensor(f"direction.{layer}", v.detach().float().cpu().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


__all__ = ["bake", "export_control_vector", "orthogonalise"]
