"""AtP and AtP* against independent references: plain autograd through HF modules (naive.py),
explicit attention recomputation, exact patching on toys where linearisation is exact, and a
planted cancellation."""

from functools import partial

import pytest
import torch

import causalscan
from causalscan.bindings import ops
from causalscan.patching.agreement import spearman
from causalscan.patching.scan import scan as _scan

from naive import grad, read
from tolerance import assert_close

scan = partial(_scan, exact_budget=0)  # estimates only: these tests check the estimators

SITES = [
    "head",
    "neuron",
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "q",
    "k",
    "v",
    "head:pos",
    "resid_pre:all",
]


def records(vocab=100, pairs=3, seq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, vocab, (pairs, seq), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(4, vocab, (pairs,), generator=g)
    corrupt[:, 4] = torch.randint(4, vocab, (pairs,), generator=g)
    ans, wrong = torch.randint(4, vocab, (2, pairs), generator=g)
    return [
        {"clean_ids": c.tolist(), "corrupt_ids": k.tolist(), "answer": a.item(), "wrong": w.item()}
        for c, k, a, w in zip(clean, corrupt, ans, wrong, strict=True)
    ]


def ids_of(recs):
    return (
        torch.tensor([r["clean_ids"] for r in recs]),
        torch.tensor([r["corrupt_ids"] for r in recs]),
        torch.tensor([r["answer"] for r in recs]),
        torch.tensor([r["wrong"] for r in recs]),
    )


def slot(res, name):
    s = next(s for s in res.sweeps if s.name == name)
    return s, res.signed[:, s.start : s.stop].reshape(-1, *s.shape)


@pytest.mark.parametrize("direction", ["noising", "denoising"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_atp_equals_autograd(tiny, family, direction):
    model = tiny(family)
    recs = records()
    clean, corrupt, ans, wrong = ids_of(recs)
    base, other = (clean, corrupt) if direction == "noising" else (corrupt, clean)
    sites = [s for s in SITES if not (s == "resid_mid" and model.adapter.parallel)]
    res = scan(model, recs, sites=sites, method="atp", confirm=0, direction=direction)

    def metric(logits):
        return logits.gather(-1, ans[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]

    for spec in sites:
        site, _, mode = spec.partition(":")
        name = site + {"": "", "pos": "_pos", "all": "_all"}[mode]
        s, got = slot(res, name)
        by_pos = (
            len(s.shape) >= 2
            and s.shape[1] == clean.shape[1]
            and (mode == "pos" or (mode == "" and site.startswith(("resid", "attn_out", "mlp_out"))))
        )
        for layer in range(model.adapter.n_layers):
            x, g = grad(model, base, site, layer, metric)
            ref = ((read(model, other, site, layer) - x) * g).sum(-1)  # [P, T, C]
            ref = ref if by_pos else ref.sum(1)
            assert_close(got[:, layer].reshape(ref.shape), ref, 1e-4, msg=str((spec, layer)))


def loop_qk_reference(q, k, v, dz, bias, scaling, softcap, q_other, k_other):
    """Explicit recomputation: one softmax per patched query position and per patched key position."""
    grp = q.shape[1] // k.shape[1]

    def pattern(qq, kk):
        s = qq @ kk.repeat_interleave(grp, 1).transpose(-1, -2) * scaling
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        return torch.softmax(s + bias, -1)

    def effect(a_new, a):  # downstream linear: dz . sum_j (A' - A) v_j, per head [B, H]
        dzv = (a_new - a) @ v.repeat_interleave(grp, 1)  # [B, H, T, Dh]
        return (dzv * dz.transpose(1, 2)).sum((-1, -2))

    a = pattern(q, k)
    b, h, t, _ = q.shape
    iq, ik = torch.zeros(b, t, h), torch.zeros(b, t, k.shape[1])
    for pos in range(t):
        qq = q.clone()
        qq[:, :, pos] = q_other[:, :, pos]
        iq[:, pos] = effect(pattern(qq, k), a)
        kk = k.clone()
        kk[:, :, pos] = k_other[:, :, pos]
        ik[:, pos] = effect(pattern(q, kk), a).unflatten(1, (k.shape[1], grp)).sum(2)
    ik_all = effect(pattern(q, k_other), a).unflatten(1, (k.shape[1], grp)).sum(2)
    return iq, ik, ik_all


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("t", [1, 7])
def test_qk_fix_equals_explicit_recomputation(softcap, t):
    g = torch.Generator().manual_seed(t)
    b, h, hkv, dh = 2, 4, 2, 5

    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    q, q_other = r(b, h, t, dh, s=3.0), r(b, h, t, dh, s=3.0)  # large scores: saturated rows
    k, k_other, v = r(b, hkv, t, dh, s=3.0), r(b, hkv, t, dh, s=3.0), r(b, hkv, t, dh)
    dz = r(b, t, h, dh)
    bias = torch.zeros(t, t).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    got = ops.qk_fix(q, k, v, dz, bias, 0.4, softcap, q_other=q_other, k_other=k_other)
    iq, ik, ik_all = loop_qk_reference(q, k, v, dz, bias, 0.4, softcap, q_other, k_other)
    assert_close(got["q"], iq, 1e-5)
    assert_close(got["k"], ik, 1e-5)
    assert_close(got["k_all"], ik_all, 1e-5)


def linear_after_attention(family):
    """A fresh random model whose metric is linear in layer 0's attention output: layer 0's MLP and
    all of layer 1 write nothing, the final norm is the identity. Layer-0 queries are scaled up
    so the attention saturates."""
    m = causalscan.load(f"random:{family}-tiny", attn_implementation="eager")
    ad, f = m.adapter, m.adapter.family
    with torch.no_grad():
        for layer, name in [(0, f.neuron), (1, f.neuron), (1, f.head)]:  # the projections (Gemma's norms follow)
            for p in ad.blocks[layer].get_submodule(name).parameters():
                p.zero_()
        q = ad.blocks[0].get_submodule(f.qkv[0])
        q.weight.mul_(8.0)
    norm = "transformer.ln_f" if family == "gpt2" else "model.norm"
    parent, _, attr = norm.rpartition(".")
    setattr(m.hf.get_submodule(parent), attr, torch.nn.Identity())
    if family == "gemma2":
        for blk in ad.blocks:
            blk.post_attention_layernorm = torch.nn.Identity()
        m.hf.config.final_logit_softcapping = None
    return m


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma2"])
def test_qk_fix_is_exact_when_downstream_is_linear(family):
    """Linearising only downstream of the pattern is exact here, so AtP* equals exact patching on
    q and k nodes; plain AtP, through the saturated softmax, is far off."""
    model = linear_after_attention(family)
    recs = records(seed=3)
    sites = ["q", "k", "q:pos", "k:pos"]
    star = scan(model, recs, sites=sites, method="atp*", graddrop=False, confirm=0)
    plain = scan(model, recs, sites=sites, method="atp", confirm=0)
    exact = causalscan.patch(model, recs, sites=sites)
    ex = exact.effect
    assert ex.abs().max() > 0.1
    assert_close(star.signed, ex, 1e-4)
    err_plain = (plain.signed - ex).abs().sum() / ex.abs().sum()
    assert err_plain > 0.3, err_plain.item()  # saturation: the gradient misses most of the effect


def test_atp_equals_exact_on_a_linear_toy():
    """Layer 1's neurons, MLP output and output residual reach the metric linearly (final norm removed)."""
    m = causalscan.load("random:gpt2-tiny")
    m.hf.transformer.ln_f = torch.nn.Identity()
    recs = records(seed=1)
    sites = ["neuron", "mlp_out", "resid_post", "neuron:pos"]
    est = scan(m, recs, sites=sites, method="atp", confirm=0)
    ex = causalscan.patch(m, recs, sites=sites)
    last = torch.tensor([c.layer == 1 for c in est.components])
    assert ex.effect[:, last].abs().max() > 0.1
    assert_close(est.signed[:, last], ex.effect[:, last], 1e-4)
    early = ~last & torch.tensor([c.site == "neuron" for c in est.components])  # layer 0: through layer 1's MLP
    err = (est.signed[:, early] - ex.effect[:, early]).abs().max()
    assert err > 1e-2 * ex.effect[:, early].abs().max()


def cancelling_model():
    """2-layer GPT-2 whose block 1 writes exactly minus its input: the final residual is zero, so every
    earlier node's direct effect is cancelled by its indirect one (AtP = 0 everywhere)."""
    m = causalscan.load("random:gpt2-tiny")
    blk, d = m.hf.transformer.h[1], m.adapter.d_model
    with torch.no_grad():
        blk.attn.c_proj.weight.zero_()
        blk.attn.c_proj.bias.zero_()
        blk.mlp.c_fc.weight.zero_()
        blk.mlp.c_fc.weight[:, :d] = torch.eye(d)  # Conv1D weight is [in, out]
        blk.mlp.c_fc.bias.zero_()
        blk.mlp.c_proj.weight.zero_()
        blk.mlp.c_proj.weight[:d] = -torch.eye(d)
        blk.mlp.c_proj.bias.zero_()
    blk.ln_2, blk.mlp.act = torch.nn.Identity(), torch.nn.Identity()
    m.hf.transformer.ln_f = torch.nn.Identity()
    return m


def test_graddrop_exposes_cancelled_effects():
    m = cancelling_model()
    recs = records(seed=2)
    clean, corrupt, ans, wrong = ids_of(recs)
    res = scan(m, recs, sites=["mlp_out", "head"], method="atp*", graddrop=True, confirm=0)
    s, atp = slot(res, "mlp_out")
    gd = res.graddrop[:, s.start : s.stop].reshape(-1, *s.shape)
    # block 0: direct and indirect effects cancel, to rounding of the effects that cancel
    assert_close(atp[:, 0], torch.zeros_like(atp[:, 0]), scale=gd[:, 0].abs().max())
    # by hand: dropping block 1 leaves the direct path, d logit_diff / d resid = W_U[answer] - W_U[wrong]
    w = m.hf.lm_head.weight
    direction = w[ans] - w[wrong]  # [P, d]
    with torch.no_grad():
        delta = read(m, corrupt, "mlp_out", 0)[:, -1, 0] - read(m, clean, "mlp_out", 0)[:, -1, 0]
    hand = (delta * direction).sum(-1).abs()
    assert hand.max() > 0.05
    assert_close(gd[:, 0, -1], hand, 1e-4)
    assert_close(res.score[:, s.start : s.stop].reshape(-1, *s.shape)[:, 0, -1], hand, 1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_graddrop_equals_detached_backwards(tiny, family):
    """GradDrop against one plain-autograd backward per dropped block (writes detached)."""
    model = tiny(family)
    recs = records(seed=4)
    clean, corrupt, ans, wrong = ids_of(recs)
    n_layers = model.adapter.n_layers
    res = scan(
        model, recs, sites=["head", "resid_pre", "neuron", "resid_post"], method="atp*", graddrop=True, confirm=0
    )

    def metric(logits):
        return logits.gather(-1, ans[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]

    for name in ["head", "resid_pre", "neuron", "resid_post"]:
        s = next(s for s in res.sweeps if s.name == name)
        got = res.graddrop[:, s.start : s.stop].reshape(-1, *s.shape)
        for layer in range(n_layers):
            terms = []
            for drop in range(n_layers):
                x, g = grad(model, clean, name, layer, metric, drop_layer=drop)
                i = ((read(model, corrupt, name, layer) - x) * g).sum(-1)
                terms.append((i if name.startswith("resid") else i.sum(1)).abs())
            denom = n_layers if name.startswith("resid") else n_layers - 1
            ref = torch.stack(terms).sum(0) / denom
            assert_close(got[:, layer].reshape(ref.shape), ref, 1e-4, msg=str((name, layer)))


def test_spearman_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): rho = 4.5 / sqrt(4.5 * 5)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), a) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
