"""Dictionaries on disk in SAELens's format: a folder with ``cfg.json`` and ``sae_weights.safetensors``.

``cfg.json``, SAELens v6: ``architecture`` (one of
:data:`causalscan.model.dictionary.ARCHITECTURES`), ``d_in``, ``d_sae``, ``d_out`` (transcoders),
``apply_b_dec_to_input``, ``normalize_activations``, ``k`` (TopK) and ``metadata.hook_name``
(``metadata.hook_name_out`` for a transcoder); the flat configs before v6 (``hook_name`` at the top,
``activation_fn_str`` ``relu`` or ``topk`` with ``activation_fn_kwargs.k``) read too. Hook names are
TransformerLens's, mapped to our sites by :data:`HOOKS` (``blocks.3.hook_resid_pre`` is
``resid_pre`` at layer 3). Only safetensors are read, never a pickle; a Gemma Scope ``.npz`` is
converted once (:func:`from_npz`, ``causalscan sae convert``), read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from causalscan.errors import InputError
from causalscan.model.dictionary import ARCHITECTURES, NORMS, TOPK, TRANSCODERS, Dictionary

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"

# TransformerLens hook (after ``blocks.L.``) -> our site; ``mlp_in`` (the MLP's normed input) is read
# by transcoders only
HOOKS = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "attn.hook_z": "head",
    "mlp.hook_post": "neuron",
    "hook_mlp_in": "mlp_in",
    "ln2.hook_normalized": "mlp_in",
}
SITE_HOOKS = {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head", "neuron"}


def site_of(hook: object, file: str, field: str) -> tuple[str, int]:
    """``(site, layer)`` of a TransformerLens hook name, or an :class:`InputError` naming ``field``."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook) if isinstance(hook, str) else None
    if m is None or m.group(2) not in HOOKS:
        raise InputError(
            f"cannot map hook {hook!r} to a site; hooks read: blocks.<layer>.{{{', '.join(HOOKS)}}}",
            file=file,
            field=field,
        )
    return HOOKS[m.group(2)], int(m.group(1))


def hook_of(site: str, layer: int) -> str:
    """The TransformerLens hook name of ``site`` at ``layer`` (the inverse of :func:`site_of`)."""
    name = next(h for h, s in HOOKS.items() if s == site)
    return f"blocks.{layer}.{name}"


def _architecture(cfg: dict, file: str) -> tuple[str, int | None]:
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn_str", "relu")  # before v6
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if act == "topk" and arch == "standard":
        arch = "topk"
    elif act not in ("relu", "topk"):
        raise InputError(f"activation {act!r} is not read; relu or topk", file=file, field="activation_fn_str")
    if arch not in ARCHITECTURES:
        raise InputError(
            f"architecture {arch!r} is not read; one of {', '.join(ARCHITECTURES)}", file=file, field="architecture"
        )
    if arch in TOPK and not (isinstance(k, int) and not isinstance(k, bool) and k > 0):
        raise InputError(f"a {arch} dictionary needs a positive integer k, not {k!r}", file=file, field="k")
    return arch, k if arch in TOPK else None


def _tensor(weights: dict, name: str, shape: tuple, file: str) -> torch.Tensor:
    t = weights.get(name)
    if t is None:
        raise InputError(f"missing tensor {name} {list(shape)}", file=file, field=name)
    if tuple(t.shape) != shape:
        raise InputError(f"{name} is {list(t.shape)}, the config says {list(shape)}", file=file, field=name)
    return t.float()


def read(path: str | Path) -> Dictionary:
    """The dictionary in folder ``path`` (SAELens's format), on the CPU in float32.

    Every problem is an :class:`InputError` naming the file and field: a missing or unreadable
    ``cfg.json``, an architecture, normalisation or hook we cannot map, a tensor of the wrong shape.
    """
    folder = Path(path)
    cfg_file, w_file = folder / CFG, folder / WEIGHTS
    if not cfg_file.is_file():
        raise InputError(f"no {CFG} in {folder} (a dictionary folder in SAELens's format)", file=str(folder))
    if not w_file.is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl")]
        extra = f" ({', '.join(pickles)} not read: only safetensors are)" if pickles else ""
        raise InputError(f"no {WEIGHTS} in {folder}{extra}", file=str(folder))
    where = str(cfg_file)
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"not JSON: {e}", file=where) from e
    if not isinstance(cfg, dict):
        raise InputError("must be a JSON object", file=where)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    arch, k = _architecture(cfg, where)
    for name in ("d_in", "d_sae"):
        if not (isinstance(cfg.get(name), int) and cfg[name] > 0):
            raise InputError(f"must be a positive integer, not {cfg.get(name)!r}", file=where, field=name)
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    d_out = cfg.get("d_out", d_in) if arch in TRANSCODERS else d_in
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm not in NORMS:
        raise InputError(
            f"{norm!r} is not read; one of {', '.join(NORMS)} (fold a fixed scaling factor into W_enc, "
            "W_dec and b_dec first)",
            file=where,
            field="normalize_activations",
        )
    hook_field = "metadata.hook_name" if "hook_name" in meta else "hook_name"
    site, layer = site_of(meta.get("hook_name", cfg.get("hook_name")), where, hook_field)
    out_site = None
    if arch in TRANSCODERS:
        out_hook = meta.get("hook_name_out", cfg.get("hook_name_out"))
        out_site, out_layer = site_of(out_hook, where, "metadata.hook_name_out") if out_hook else ("mlp_out", layer)
        if (site, out_site) != ("mlp_in", "mlp_out") or out_layer != layer:
            raise InputError(
                f"a transcoder here reads the MLP input and writes the MLP output of one layer "
                f"(blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out), not {site} -> {out_site}.L{out_layer}",
                file=where,
                field="metadata.hook_name_out",
            )
    elif site not in SITE_HOOKS:
        raise InputError(
            f"an SAE reads and writes one of {', '.join(sorted(SITE_HOOKS))}, not {site}", file=where, field=hook_field
        )
    weights = load_file(str(w_file))
    wf = str(w_file)
    t = {
        "W_enc": _tensor(weights, "W_enc", (d_in, d_sae), wf),
        "W_dec": _tensor(weights, "W_dec", (d_sae, d_out), wf),
        "b_dec": _tensor(weights, "b_dec", (d_out,), wf),
    }
    if arch == "gated":
        t |= {n: _tensor(weights, n, (d_sae,), wf) for n in ("b_gate", "r_mag", "b_mag")}
        b_enc = t["b_gate"]
    else:
        b_enc = _tensor(weights, "b_enc", (d_sae,), wf)
    if arch in ("jumprelu", "jumprelu_transcoder"):
        t["threshold"] = _tensor(weights, "threshold", (d_sae,), wf)
    if arch == "skip_transcoder":
        t["W_skip"] = _tensor(weights, "W_skip", (d_out, d_in), wf)
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", arch not in TRANSCODERS))
    if apply_b_dec and d_out != d_in:
        raise InputError(
            "b_dec is subtracted from the input, but d_out != d_in", file=where, field="apply_b_dec_to_input"
        )
    return Dictionary(
        arch,
        site,
        layer,
        b_enc=b_enc,
        k=k,
        apply_b_dec_to_input=apply_b_dec,
        normalize_activations=norm,
        out_site=out_site,
        name=folder.name,
        hook_name=meta.get("hook_name", cfg.get("hook_name")),
        **t,
    )


def write(d: Dictionary, path: str | Path, **metadata) -> Path:
    """Write ``d`` to folder ``path`` in SAELens's v6 format (``metadata`` added to the config's)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    names = ["W_enc", "W_dec", "b_dec", "threshold", "W_skip", "b_gate", "r_mag", "b_mag"]
    names += [] if d.architecture == "gated" else ["b_enc"]
    tensors = {n: getattr(d, n).detach().float().cpu().contiguous() for n in names if getattr(d, n) is not None}
    save_file(tensors, str(folder / WEIGHTS))
    meta = {"hook_name": hook_of(d.site, d.layer), **metadata}
    if d.transcoder:
        meta["hook_name_out"] = hook_of(d.writes, d.layer)
    cfg = {
        "architecture": d.architecture,
        "d_in": d.d_in,
        "d_sae": d.d_sae,
        **({"d_out": d.d_out} if d.transcoder else {}),
        "dtype": "float32",
        "apply_b_dec_to_input": d.apply_b_dec_to_input,
        "normalize_activations": d.normalize_activations,
        **({"k": d.k} if d.k is not None else {}),
        "metadata": meta,
    }
    (folder / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def from_npz(npz: str | Path, out: str | Path, hook_name: str, architecture: str = "jumprelu") -> Path:
    """Convert a Gemma Scope style ``.npz`` (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``,
    ``threshold``) into a SAELens folder ``out``, read without unpickling."""
    import numpy as np

    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: torch.from_numpy(z[k].astype("float32")) for k in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read as an .npz of arrays: {e}", file=str(npz)) from e
    need = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if "jumprelu" in architecture else [])
    for name in need:
        if name not in arrays:
            raise InputError(f"missing array {name} (has {', '.join(arrays)})", file=str(npz), field=name)
    site, layer = site_of(hook_name, str(npz), "hook_name")
    d = Dictionary(
        architecture,
        site,
        layer,
        **{n: arrays[n] for n in need},
        apply_b_dec_to_input=False,
        out_site="mlp_out" if architecture in TRANSCODERS else None,
    )
    write(d, out, converted_from=Path(npz).name)
    read(out)  # the same checks as any folder
    return Path(out)


__all__ = ["CFG", "HOOKS", "WEIGHTS", "from_npz", "hook_of", "read", "site_of", "write"]
