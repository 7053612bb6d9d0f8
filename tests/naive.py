"""Independent references: plain hooks, one patch per full forward, no runner, cache or perturb op.

Site layouts are re-derived here from the HF modules, not taken from ``Adapter.view``.
"""

from __future__ import annotations

import torch

from causalscan.data import metrics
from causalscan.data.pairs import Dataset, stack


def _raw_view(ad, site, raw, b, t):
    """[B, T, C, D] view of a raw module tensor, written independently of Adapter.view."""
    raw = raw.reshape(b, t, raw.shape[-1])
    h, kv, dh = ad.n_heads, ad.n_kv_heads, ad.d_head
    fam = ad.family.qkv_layout
    if site in ("q", "k", "v"):
        i = "qkv".index(site)
        if fam == "gpt2":
            return raw.split(h * dh, dim=-1)[i].reshape(b, t, h, dh)
        if fam == "neox":
            return raw.reshape(b, t, h, 3 * dh).chunk(3, dim=-1)[i]
        if fam == "phi3":
            return raw.split([h * dh, kv * dh, kv * dh], dim=-1)[i].reshape(b, t, -1, dh)
        return raw.reshape(b, t, -1, dh)
    if site == "head":
        return raw.reshape(b, t, h, dh)
    if site == "neuron":
        return raw.reshape(b, t, -1, 1)
    return raw.reshape(b, t, 1, -1)


def _module(ad, site, layer):
    f, blk = ad.family, ad.blocks[layer]
    name = {
        "head": f.head,
        "neuron": f.neuron,
        "attn_out": f.attn_out,
        "mlp_out": f.mlp_out,
        "resid_mid": f.attn_out,
    }.get(site)
    if site in ("q", "k", "v"):
        name = f.qkv["qkv".index(site)] if len(f.qkv) == 3 else f.qkv[0]
    side = "in" if site in ("head", "neuron", "resid_pre") else "out"
    return (blk if name is None else blk.get_submodule(name)), side


def run(model, ids, site=None, layer=None, edit=None):
    """Logits [B, T, V] of a plain forward; ``edit(view [B,T,C,D], block_input)`` may modify the
    view in place (on a clone of the raw tensor)."""
    ad = model.adapter
    b, t = ids.shape
    handles, seen = [], {}
    if site is not None:
        module, side = _module(ad, site, layer)
        handles.append(
            ad.blocks[layer].register_forward_pre_hook(
                lambda m, a, k: seen.__setitem__("pre", a[0] if a else k["hidden_states"]), with_kwargs=True
            )
        )

        def apply(raw):
            raw = raw.clone()
            edit(_raw_view(ad, site, raw, b, t), seen["pre"])
            return raw

        def pre(m, a, k):
            if a:
                return (apply(a[0]), *a[1:]), k
            return a, {**k, "hidden_states": apply(k["hidden_states"])}

        if side == "in":
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o: (apply(o[0]), *o[1:]) if isinstance(o, tuple) else apply(o)
                )
            )
    try:
        return model.hf(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def read(model, ids, site, layer):
    """The site's activation [B, T, C, D] in a plain forward (resid_mid = block input + attn_out)."""
    out = {}

    def edit(view, pre):
        if site == "resid_mid":
            out["x"] = view + pre.reshape(view.shape)
        else:
            out["x"] = view.clone()

    run(model, ids, site, layer, edit)
    return out["x"]


def patched_logits(model, ids, site, layer, index, position, source):
    """Logits at the last position with component (index, position) of ``site`` set from ``source``."""
    sl = slice(None) if position is None else slice(position, position + 1)

    def edit(view, pre):
        if site == "resid_mid":  # resid_mid = pre + attn_out: move attn_out so the sum is the source
            view[:, sl, index] = source[:, sl, index] - pre.reshape(view.shape)[:, sl, index]
        else:
            view[:, sl, index] = source[:, sl, index]

    return run(model, ids, site, layer, edit)[:, -1]


def grad(model, ids, site, layer, metric, drop_layer=None, keep=None, value=None):
    """``(activation, dmetric/dactivation)`` [B, T, C, D] at ``site`` of ``layer`` by plain autograd:
    a zero probe is added to the raw module tensor and differentiated. ``metric(logits [B, V]) -> [B]``
    (with ``keep``: the last ``keep`` positions' logits [B, keep, V]) is summed. ``drop_layer``: the
    outputs of that block's attention and MLP (its residual writes) are detached, the GradDrop
    reference. ``value`` [B, T, C, D]: the site's activation is set to it first (the gradient is
    taken there)."""
    import torch

    ad = model.adapter
    b, t = ids.shape
    module, side = _module(ad, site, layer)
    held = {}

    def apply(raw):
        if value is not None:  # upstream of the probe: no gradient needed
            with torch.no_grad():
                raw = raw.clone()
                view = _raw_view(ad, site, raw, b, t)
                view[...] = value - (held["pre"].reshape(view.shape) if site == "resid_mid" else 0)
        held["probe"] = torch.zeros_like(raw, requires_grad=True)
        view = _raw_view(ad, site, raw, b, t)
        held["x"] = (view + held["pre"].reshape(view.shape) if site == "resid_mid" else view).detach().clone()
        return raw + held["probe"]

    hooks = [
        ad.blocks[layer].register_forward_pre_hook(
            lambda m, a, k: held.__setitem__("pre", a[0] if a else k["hidden_states"]), with_kwargs=True
        )
    ]
    if side == "in":
        hooks.append(
            module.register_forward_pre_hook(
                lambda m, a, k: (
                    ((apply(a[0]), *a[1:]), k) if a else (a, {**k, "hidden_states": apply(k["hidden_states"])})
                ),
                with_kwargs=True,
            )
        )
    else:  # before any detach hook on the same module
        hooks.append(
            module.register_forward_hook(lambda m, a, o: (apply(o[0]), *o[1:]) if isinstance(o, tuple) else apply(o))
        )
    if drop_layer is not None:
        for s in ("attn_out", "mlp_out"):
            mod, _ = _module(ad, s, drop_layer)
            hooks.append(
                mod.register_forward_hook(
                    lambda m, a, o: (o[0].detach(), *o[1:]) if isinstance(o, tuple) else o.detach()
                )
            )
    try:
        with torch.enable_grad():
            logits = model.hf(input_ids=ids).logits
            logits = logits[:, -1] if keep is None else logits[:, -keep:]
            (g,) = torch.autograd.grad(metric(logits).sum(), held["probe"], allow_unused=True)
        g = torch.zeros_like(held["probe"]) if g is None else g  # the probe's only path was detached
    finally:
        for h in hooks:
            h.remove()
    return held["x"], _raw_view(ad, site, g, b, t)


class embed_noise:
    """Context: add ``noise`` [B, T, D] to the output of the input embedding module (plain hook)."""

    def __init__(self, model, noise):
        self.emb, self.noise = model.hf.get_input_embeddings(), noise

    def __enter__(self):
        self.h = self.emb.register_forward_hook(lambda m, a, o: o + self.noise)

    def __exit__(self, *exc):
        self.h.remove()


def restored_logits(model, ids, restores, clean):
    """Logits at the last position with clean values put back: ``restores`` lists
    ``(site, layer, position)`` for ``attn_out``, ``mlp_out`` (module outputs) and ``resid_post``
    (block output); ``clean[(site, layer)]`` is the clean run's raw module output [B, T, D]."""
    handles = []
    for site, layer, pos in restores:
        blk = model.adapter.blocks[layer]
        module = blk if site == "resid_post" else _module(model.adapter, site, layer)[0]

        def put(m, a, o, key=(site, layer), pos=pos):
            x = (o[0] if isinstance(o, tuple) else o).clone()
            x[:, pos] = clean[key][:, pos]
            return (x, *o[1:]) if isinstance(o, tuple) else x

        handles.append(module.register_forward_hook(put))
    try:
        return model.hf(input_ids=ids).logits[:, -1]
    finally:
        for h in handles:
            h.remove()


def module_outputs(model, ids, sites):
    """Raw outputs [B, T, D] of ``(site, layer)`` modules (resid_post: the block) in a plain forward."""
    out, handles = {}, []
    for site, layer in sites:
        blk = model.adapter.blocks[layer]
        module = blk if site == "resid_post" else _module(model.adapter, site, layer)[0]
        handles.append(
            module.register_forward_hook(
                lambda m, a, o, key=(site, layer): out.__setitem__(key, (o[0] if isinstance(o, tuple) else o).clone())
            )
        )
    try:
        model.hf(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def naive_effects(model, records, comps, direction="noising", metric="logit_diff"):
    """[P, n] patched metric, one full forward per (pair, component)."""
    pairs = Dataset(records).tokenize(model.tokenizer)
    b = stack(pairs)
    base, src = (b["clean"], b["corrupt"]) if direction == "noising" else (b["corrupt"], b["clean"])
    _, fn = metrics.get(metric)
    clean_lp = torch.log_softmax(model.hf(input_ids=b["clean"]).logits[:, -1].float(), -1)
    out = torch.empty(len(pairs), len(comps))
    cache = {}
    for j, c in enumerate(comps):
        key = (c.site, c.layer)
        if key not in cache:
            cache[key] = read(model, src, c.site, c.layer)
        logits = patched_logits(model, base, c.site, c.layer, c.index, c.position, cache[key])
        out[:, j] = fn(logits, b["answer"], b["wrong"], clean_lp)
    return out


def teacher_forced(logits, prompt_len: int, cont) -> torch.Tensor:
    """``sum_k log p(cont[k])`` read at position ``prompt_len - 1 + k`` of ``logits`` [T, V] (one row)."""
    lp = torch.log_softmax(logits.float(), -1)
    return sum(lp[prompt_len - 1 + k, tok] for k, tok in enumerate(cont))


@torch.no_grad()
def naive_continuation_effects(model, records, comps, direction="noising", metric="logit_diff"):
    """[P, n] patched metric of multi-token answers: every pair, continuation and component its own
    full forward of the prompt followed by the continuation (no padding, no batching)."""
    pairs = Dataset(records).tokenize(model.tokenizer)
    out = torch.empty(len(pairs), len(comps))
    for i, p in enumerate(pairs):
        base, src = (p.clean, p.corrupt) if direction == "noising" else (p.corrupt, p.clean)
        t = len(p.clean)
        conts = [(p.answer, 1.0)] + ([(p.wrong, -1.0)] if metric == "logit_diff" else [])
        for j, c in enumerate(comps):
            total = 0.0
            for cont, sign in conts:
                ids = torch.tensor([base + cont[:-1]])
                source = read(model, torch.tensor([src + cont[:-1]]), c.site, c.layer)
                sl = slice(None) if c.position is None else slice(c.position, c.position + 1)

                def edit(view, pre, c=c, sl=sl, source=source):
                    view[:, sl, c.index] = source[:, sl, c.index]

                logits = run(model, ids, c.site, c.layer, edit)[0]
                if metric == "kl":
                    clean = torch.log_softmax(
                        model.hf(input_ids=torch.tensor([p.clean + cont[:-1]])).logits[0].float(), -1
                    )[t - 1 :]
                    lp = torch.log_softmax(logits.float(), -1)[t - 1 :]
                    total += (clean.exp() * (clean - lp)).sum()
                    continue
                s = teacher_forced(logits, t, cont)
                total += s.exp() if metric == "prob" else sign * s
            out[i, j] = total
    return out


# Edges (circuits) -------------------------------------------------------------------------------
def writes(model, ids, graph):
    """Upstream writes [B, n_up, T, d] in a plain forward: the block-0 input, each head's output
    projection applied to that head alone (the bias, shared by every head, taken off), each MLP's
    output module. Numbered as ``graph``."""
    ad = model.adapter
    f = ad.family
    b, t = ids.shape
    out = torch.zeros(b, graph.n_up, t, ad.d_model)

    def embed(m, a, k):
        out[:, 0] = a[0] if a else k["hidden_states"]

    hooks = [ad.blocks[0].register_forward_pre_hook(embed, with_kwargs=True)]
    for layer in range(ad.n_layers):
        o_proj = ad.blocks[layer].get_submodule(f.head)

        def heads(m, a, layer=layer):
            z = a[0].reshape(b, t, ad.n_heads, ad.d_head)
            zero = m.forward(torch.zeros_like(a[0]))
            for h in range(ad.n_heads):
                only = torch.zeros_like(z)
                only[:, :, h] = z[:, :, h]
                out[:, graph.head(layer, h)] = m.forward(only.reshape(a[0].shape)) - zero

        hooks.append(o_proj.register_forward_pre_hook(heads))

        def mlp(m, a, o, layer=layer):
            out[:, graph.mlp(layer)] = (o[0] if isinstance(o, tuple) else o).reshape(b, t, -1)  # OPT: [B * T, d]

        hooks.append(ad.blocks[layer].get_submodule(f.mlp_out).register_forward_hook(mlp))
        js = getattr(graph, "latents", {}).get(layer)
        if js:  # latent nodes: f_j W_dec[j] of the MLP's input; the MLP node keeps the rest

            def split(m, a, o, layer=layer, js=js):
                d = ad.dictionaries[layer]
                f = hand_encode(d, a[0].reshape(b, t, -1))
                for k, j in enumerate(js):
                    w = f[..., j, None] * d.W_dec[j]
                    out[:, graph.latent(layer, k)] = w
                    out[:, graph.mlp(layer)] -= w

            hooks.append(ad.blocks[layer].get_submodule(f.readers[2]).register_forward_hook(split))
    try:
        with torch.no_grad():
            model.hf(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return out


def hand_encode(d, z):
    """A transcoder's latents of its input ``z`` [.., d_in], by its formula (ReLU, JumpReLU or TopK)."""
    pre = z @ d.W_enc + d.b_enc
    if d.architecture in ("topk", "topk_transcoder"):
        top = pre.topk(d.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return pre.relu() if d.threshold is None else pre.relu() * (pre > d.threshold)


def reader_run(model, ids, kind, layer, index, extra, metric, latents=None):
    """``metric(last logits)`` [B] with reader (``kind`` q/k/v/mlp/latent/logits, ``layer``, ``index``)
    reading its input (the residual before its norm) plus ``extra`` [B, T, d]; every other reader reads
    the plain residual. Plain hooks: the reader's norm and projection (its own slice) are called again
    on the shifted input. ``latents``: the layer's latent nodes (a transcoder there): a latent reader
    (``index``-th node) moves its latent alone, ``f_j(norm(x + extra)) - f_j(norm(x))`` times its
    decoder row, and the MLP's reader moves the rest, ``mlp(z') - f(z') W_dec`` over those latents."""
    ad = model.adapter
    f = ad.family
    b, t = ids.shape
    blk = ad.blocks[layer]
    seen, hooks = {}, []

    def keep(m, a, k):
        seen.setdefault("x", a[0] if a else k["hidden_states"])

    js = (latents or {}).get(layer)
    if kind == "latent" or (kind == "mlp" and js):
        ln, mlp = blk.get_submodule(f.readers[1]), blk.get_submodule(f.readers[2])
        d = ad.dictionaries[layer]
        hooks.append(ln.register_forward_pre_hook(keep, with_kwargs=True))

        def moved(m, a, o):
            z0, z1 = a[0], ln.forward(seen["x"] + extra)
            if kind == "latent":
                j = js[index]
                return o + (hand_encode(d, z1)[..., j, None] - hand_encode(d, z0)[..., j, None]) * d.W_dec[j]
            kept = d.W_dec[js]
            return o + (m.forward(z1) - hand_encode(d, z1)[..., js] @ kept) - (o - hand_encode(d, z0)[..., js] @ kept)

        hooks.append(mlp.register_forward_hook(moved))
    elif kind == "logits":
        hooks.append(model.hf.get_submodule(f.final_norm).register_forward_pre_hook(lambda m, a: (a[0] + extra,)))
    elif kind == "mlp":
        ln = blk.get_submodule(f.readers[1])
        hooks.append(ln.register_forward_pre_hook(keep, with_kwargs=True))
        hooks.append(
            blk.get_submodule(f.readers[2]).register_forward_pre_hook(  # OPT: [B * T, d]
                lambda m, a: (ln.forward(seen["x"] + extra.reshape(seen["x"].shape)), *a[1:])
            )
        )
    else:
        ln = blk.get_submodule(f.readers[0])
        proj = blk.get_submodule(f.qkv["qkv".index(kind)] if len(f.qkv) == 3 else f.qkv[0])
        hooks.append(ln.register_forward_pre_hook(keep, with_kwargs=True))

        def swap(m, a, o):
            new = m.forward(ln.forward(seen["x"] + extra))
            with torch.no_grad():  # 1 on the reader's own slice of the projection output
                own = torch.zeros_like(o)
                _raw_view(ad, kind, own, b, t)[:, :, index] = 1
            return o + own * (new - o)

        hooks.append(proj.register_forward_hook(swap))
    try:
        return metric(model.hf(input_ids=ids).logits[:, -1])
    finally:
        for h in hooks:
            h.remove()


def reader_grad(model, ids, kind, layer, index, metric, latents=None):
    """``dM/dx_r`` [B, T, d] at a reader's input by autograd on a zero shift of that reader alone."""
    probe = torch.zeros(*ids.shape, model.adapter.d_model, requires_grad=True)
    with torch.enable_grad():
        m = reader_run(model, ids, kind, layer, index, probe, metric, latents)
        return torch.autograd.grad(m.sum(), probe)[0]


class hand_rules:
    """Context: the relevance rules written out by hand on a llama, gemma, gpt2 or gpt_neox model,
    independently of ``causalscan.model.relevance``: norms with their scale detached, each MLP's
    forward replaced by its rule form (identity rule for the activation, half rule for gated MLPs),
    and with ``attention="attnlrp"`` the gradients of q, k (1/4) and v (1/2) scaled where they enter
    SDPA."""

    def __init__(self, model, attention="plain"):
        self.model, self.attention, self.undo = model, attention, []

    def __enter__(self):
        import math

        import torch

        hf = self.model.hf
        mt = hf.config.model_type

        def tanh_gelu_factor(x):
            return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

        def phi(x):
            return 0.5 * (1 + torch.erf(x / math.sqrt(2)))

        def set_forward(mod, fn):
            mod.forward = fn
            self.undo.append(lambda: mod.__dict__.pop("forward"))

        for name, mod in hf.named_modules():
            cls = type(mod).__name__
            if name.endswith(("q_norm", "k_norm")):
                continue
            if isinstance(mod, torch.nn.LayerNorm):
                set_forward(
                    mod,
                    lambda x, m=mod: (
                        (x - x.mean(-1, keepdim=True))
                        / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + m.eps).detach()
                        * m.weight
                        + m.bias
                    ),
                )
            elif cls.endswith("RMSNorm"):
                offset = 1.0 if cls.startswith("Gemma") else 0.0
                eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
                set_forward(
                    mod,
                    lambda x, m=mod, o=offset, e=eps: (
                        (o + m.weight) * (x * (x.pow(2).mean(-1, keepdim=True) + e).rsqrt().detach())
                    ),
                )
            elif cls.endswith("MLP") and mt in ("llama", "gemma"):
                f = torch.sigmoid if mt == "llama" else tanh_gelu_factor

                def gated(x, m=mod, f=f):
                    g, u = m.gate_proj(x), m.up_proj(x)
                    a = g * f(g).detach()
                    return m.down_proj(0.5 * (a * u.detach()) + 0.5 * (a.detach() * u))

                set_forward(mod, gated)
            elif cls == "GPT2MLP":
                set_forward(mod, lambda x, m=mod: m.c_proj((h := m.c_fc(x)) * tanh_gelu_factor(h).detach()))
            elif cls == "GPTNeoXMLP":
                set_forward(mod, lambda x, m=mod: m.dense_4h_to_h((h := m.dense_h_to_4h(x)) * phi(h).detach()))
        if self.attention == "attnlrp":
            self._scale_qkv(hf)
        return self

    def _scale_qkv(self, hf):
        """Scale the gradients at the inputs of SDPA (downstream of the q/k/v sites): ``c x + (1 - c)
        x.detach()`` is ``x`` in the forward (up to rounding) and ``c`` in the backward."""
        import torch

        assert hf.config._attn_implementation == "sdpa", "hand attnlrp rule written for SDPA"
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def scaled(q, k, v, *args, **kwargs):
            def part(x, c):
                return c * x + (1 - c) * x.detach()

            return sdpa(part(q, 0.25), part(k, 0.25), part(v, 0.5), *args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = scaled
        self.undo.append(lambda: setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa))

    def __exit__(self, *exc):
        for fn in reversed(self.undo):
            fn()


@torch.no_grad()
def llama_direct_effects(model, ids, dictionaries: dict) -> dict:
    """A Llama prompt's local replacement model written out by hand, and its direct effects by
    leave-one-out (independent of the engine's runner, taps, rules and backward).

    One eager forward of ``ids`` [T] records each norm's input (their scales are then constants)
    and the attention probabilities (``output_attentions``); the replacement model is rebuilt from
    the module weights: ``x <- x + o_proj(P @ v_proj(norm1(x)))``, the transcoder reads
    ``norm2(x)`` and the MLP's output is ``f W_dec (+ skip) + err`` (``err`` alone without a
    transcoder). It is affine in its leaves (the embeddings, latents and errors), so a source's direct
    effect on a target is ``target(leaves) - target(leaves with that source zeroed)``.
    Returns ``{"effect": fn(kind, layer, pos, index) -> {"pre": {layer: [T, d_sae]}, "logits": [V]},
    "leaves": ...}`` where the effect is on every latent's pre-activation and every demeaned logit.
    """
    hf = model.hf
    blocks = hf.model.layers
    rec: dict = {}
    hooks = []
    for i, blk in enumerate(blocks):
        hooks.append(blk.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: rec.__setitem__(("x", i), a[0])))
        hooks.append(
            blk.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: rec.__setitem__(("h", i), a[0]))
        )
        hooks.append(blk.mlp.register_forward_hook(lambda m, a, o, i=i: rec.__setitem__(("mlp", i), (a[0], o))))
    hooks.append(hf.model.norm.register_forward_pre_hook(lambda m, a: rec.__setitem__("final", a[0])))
    try:
        out = hf(ids[None], output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    att = [a[0] for a in out.attentions]  # [H, T, T] per layer

    def scale(x, norm):
        return torch.rsqrt(x[0].float().pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)

    leaves = {"embed": rec[("x", 0)][0].clone(), "f": {}, "err": {}}
    for i in range(len(blocks)):
        m_in, y = rec[("mlp", i)]
        d = dictionaries.get(i)
        if d is None:
            leaves["err"][i] = y[0].clone()
            continue
        pre = m_in[0] @ d.W_enc + d.b_enc
        if d.architecture == "topk_transcoder":
            top = pre.topk(d.k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        else:
            f = pre.relu() * (pre > d.threshold) if d.threshold is not None else pre.relu()
        skip = 0.0 if d.W_skip is None else m_in[0] @ d.W_skip.T
        leaves["f"][i] = f
        leaves["err"][i] = y[0] - f @ d.W_dec - skip

    def run(lv) -> dict:
        x, pre = lv["embed"], {}
        for i, blk in enumerate(blocks):
            a = blk.input_layernorm.weight * (x * scale(rec[("x", i)], blk.input_layernorm))
            h_n, d_head = att[i].shape[0], blk.self_attn.o_proj.weight.shape[1] // att[i].shape[0]
            v = (a @ blk.self_attn.v_proj.weight.T).unflatten(-1, (-1, d_head))  # [T, H_kv, Dh]
            v = v.repeat_interleave(h_n // v.shape[1], 1)
            z = torch.einsum("htu,uhd->thd", att[i], v)
            h = x + z.flatten(1) @ blk.self_attn.o_proj.weight.T
            m_in = blk.post_attention_layernorm.weight * (h * scale(rec[("h", i)], blk.post_attention_layernorm))
            d = dictionaries.get(i)
            mlp = lv["err"][i]
            if d is not None:
                pre[i] = m_in @ d.W_enc + d.b_enc
                mlp = mlp + lv["f"][i] @ d.W_dec + (0.0 if d.W_skip is None else m_in @ d.W_skip.T)
            x = h + mlp
        logits = (hf.model.norm.weight * (x * scale(rec["final"], hf.model.norm))) @ hf.lm_head.weight.T
        return {"pre": pre, "logits": logits[-1] - logits[-1].mean()}

    base = run(leaves)

    def effect(kind: str, layer: int, pos: int, index: int = 0) -> dict:
        lv = {"embed": leaves["embed"].clone(), "f": dict(leaves["f"]), "err": dict(leaves["err"])}
        if kind == "token":
            lv["embed"][pos] = 0
        elif kind == "error":
            lv["err"][layer] = lv["err"][layer].clone()
            lv["err"][layer][pos] = 0
        else:
            lv["f"][layer] = lv["f"][layer].clone()
            lv["f"][layer][pos, index] = 0
        cut = run(lv)
        return {
            "pre": {i: base["pre"][i] - cut["pre"][i] for i in base["pre"]},
            "logits": base["logits"] - cut["logits"],
        }

    return {"effect": effect, "leaves": leaves, "base": base}
