"""Relevance rules (RelP) against independent references: the plain forward bit for bit, each rule's
vector-Jacobian product against its hand formula, and the whole relp scan and relp circuit against
naive autograd with the rules written out by hand (naive.hand_rules)."""

import math
from functools import partial

import pytest
import torch
from test_attribution import ids_of, records, slot
from test_circuits import hand_eap, logit_diff
from torch import nn
from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation, SiLUActivation
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import causalscan
from causalscan.circuits.circuit import circuit
from causalscan.errors import InputError
from causalscan.model import relevance, runner
from causalscan.model.random_models import RANDOM_FAMILIES
from causalscan.model.taps import frozen, graph_forward
from causalscan.patching.scan import scan

import naive
from tolerance import assert_close

relp_scan = partial(scan, method="relp", exact_budget=0, confirm=0)


def vjp(module, rule, x, g):
    """The rule's vector-Jacobian product at ``x`` for the cotangent ``g``, through the autograd
    function the rules install (the module's own forward, the rule's backward)."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        y = relevance._Rule.apply(x, module, rule)
        (gx,) = torch.autograd.grad(y, x, g)
    return gx


def inputs(dtype, d=16):
    """Rows with zeros, mixed signs and one all-zero-but-one row."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, d, generator=gen) * 3
    x[0, ::3] = 0.0
    x[1] = 0.0
    x[1, 2] = -2.0
    g = torch.randn(5, d, generator=gen)
    return x.to(dtype), g.to(dtype)


NORMS = {
    # hand VJPs with the scale s held constant: LN centres, RMSNorm does not; Gemma scales by 1 + w
    "layernorm": (
        lambda d: nn.LayerNorm(d, eps=1e-5),
        lambda m, x, g: (lambda s, v: s * v - (s * v).mean(-1, keepdim=True))(
            1 / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + m.eps), g * m.weight
        ),
    ),
    "llama_rmsnorm": (
        lambda d: LlamaRMSNorm(d, eps=1e-6),
        lambda m, x, g: g * m.weight / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon),
    ),
    "gemma_rmsnorm": (
        lambda d: GemmaRMSNorm(d, eps=1e-6),
        lambda m, x, g: g * (1 + m.weight) / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + m.eps),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(NORMS))
def test_norm_rule_equals_its_hand_formula(kind, dtype):
    make, hand = NORMS[kind]
    m = make(16)
    with torch.no_grad():
        m.weight.normal_(generator=torch.Generator().manual_seed(1))
        if getattr(m, "bias", None) is not None:
            m.bias.normal_()
    x, g = inputs(torch.float32)
    ref = hand(m, x.double(), g.double()).float()
    if dtype == torch.float32:
        assert_close(vjp(m, relevance.norm_rule(m), x, g), ref)
        return
    low = hand(m.to(dtype), x.to(dtype), g.to(dtype))  # torch's own bf16 error on the same formula
    assert_close(vjp(m, relevance.norm_rule(m), x.to(dtype), g.to(dtype)), ref, 0, low=low)
    m.float()


ACTS = {
    "silu": (SiLUActivation(), torch.sigmoid),
    "nn_silu": (nn.SiLU(), torch.sigmoid),
    "gelu": (GELUActivation(), lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2)))),
    "nn_gelu": (nn.GELU(), lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2)))),
    "gelu_tanh": (GELUTanh(), lambda x: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
    "gelu_new": (
        NewGELUActivation(),
        lambda x: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    ),
    "relu": (nn.ReLU(), lambda x: (x > 0).to(x.dtype)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(ACTS))
def test_identity_rule_is_the_factor(kind, dtype):
    """act(x) = x f(x): the coefficient is f(x), so no epsilon and no zero at 0 (SiLU and GELU give 1/2)."""
    act, f = ACTS[kind]
    x, g = inputs(torch.float32)
    ref = (g.double() * f(x.double())).float()
    got = vjp(act, relevance.activation_rule(act), x.to(dtype), g.to(dtype))
    if dtype == torch.float32:
        assert_close(got, ref)
    else:
        assert_close(got, ref, 0, low=g.to(dtype) * f(x.to(dtype)))
    if kind not in ("relu",):
        at_zero = vjp(act, relevance.activation_rule(act), torch.zeros(3), torch.ones(3))
        assert torch.allclose(at_zero, torch.full((3,), 0.5))
    with torch.no_grad():
        assert torch.equal(relevance._Rule.apply(x, act, relevance.activation_rule(act)), act(x))


def test_an_activation_without_a_rule_is_refused(tiny):
    with pytest.raises(InputError, match="no relevance rule for the activation Mish"):
        relevance.activation_rule(nn.Mish())
    with pytest.raises(InputError, match="no relevance rule for the norm GroupNorm"):
        relevance.norm_rule(nn.GroupNorm(2, 4))


@pytest.mark.parametrize("family", RANDOM_FAMILIES)
def test_forward_is_bit_identical_and_the_rules_come_off(tiny, family):
    model = tiny(family)
    ad = model.adapter
    ids = torch.randint(4, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    own = {id(m): m.__dict__.get("forward") for m in model.hf.modules()}

    def logits_and_grad(rule):
        store = {}
        tap = ("resid_pre", 1, lambda x: store.setdefault("x", x.clone()))
        with frozen(model.hf), torch.enable_grad(), relevance.rules(ad, rule) if rule else torch.enable_grad():
            logits = graph_forward(ad, ids, [tap], None, 0)
            (g,) = torch.autograd.grad(logits[:, -1, 5].sum(), store["x"])
        return logits, g

    plain, g_plain = logits_and_grad(None)
    with torch.no_grad():
        assert torch.equal(runner.forward(ad, ids, logits_to_keep=0), plain)
    grads = {}
    for rule in relevance.ATTENTION:
        logits, grads[rule] = logits_and_grad(rule)
        assert torch.equal(logits, plain), rule
        assert not torch.allclose(grads[rule], g_plain), rule  # the backward did change
    assert {id(m): m.__dict__.get("forward") for m in model.hf.modules()} == own
    again, g_again = logits_and_grad(None)
    assert torch.equal(again, plain) and torch.equal(g_again, g_plain)


def qkv_grads(model, ids, rule):
    """Gradients of the last layer's q, k, v projection outputs under the rules with ``rule``."""
    ad, store = model.adapter, {}
    blk = ad.blocks[-1].self_attn
    hooks = [
        getattr(blk, f"{s}_proj").register_forward_hook(lambda m, a, o, s=s: store.__setitem__(s, o) or o.retain_grad())
        for s in "qkv"
    ]
    try:
        with frozen(model.hf), torch.enable_grad(), relevance.rules(ad, rule):
            graph_forward(ad, ids, [], None, 1)[:, -1, 5].sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return {s: store[s].grad for s in "qkv"}


def test_attention_rules_scale_or_cut_q_k_v(tiny):
    """At the last layer (nothing downstream but the final norm and the unembedding, which every
    attention rule shares): attnlrp is q, k x 1/4 and v x 1/2 of the plain rule; cp gives q and k
    nothing and v what the plain rule gives (v enters linearly once the pattern is held)."""
    model = tiny("llama")
    ids = torch.randint(4, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    plain, scaled, cp = (qkv_grads(model, ids, r) for r in ("plain", "attnlrp", "cp"))
    for s, c in (("q", 0.25), ("k", 0.25), ("v", 0.5)):
        assert plain[s].abs().max() > 0
        assert_close(scaled[s], c * plain[s])
    assert cp["q"] is None or not cp["q"].any()
    assert cp["k"] is None or not cp["k"].any()
    assert_close(cp["v"], plain["v"])


SITES = ["head", "neuron", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "v", "head:pos"]


@pytest.mark.parametrize(
    "family,attention",
    [("llama", "plain"), ("gpt2", "plain"), ("gpt_neox", "plain"), ("gemma", "plain"), ("llama", "attnlrp")]
    + [("gpt2", "attnlrp")],
)
def test_relp_scan_equals_naive_autograd_with_hand_rules(tiny, family, attention):
    model = tiny(family)
    recs = records()
    clean, corrupt, ans, wrong = ids_of(recs)
    sites = [s for s in SITES if not (s == "resid_mid" and model.adapter.parallel)]
    res = relp_scan(model, recs, sites=sites, relp_attention=attention)

    def metric(logits):
        return logits.gather(-1, ans[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]

    for spec in sites:
        site, _, mode = spec.partition(":")
        s, got = slot(res, site + ("_pos" if mode == "pos" else ""))
        by_pos = mode == "pos" or site.startswith(("resid", "attn_out", "mlp_out"))
        for layer in range(model.adapter.n_layers):
            with naive.hand_rules(model, attention):
                x, g = naive.grad(model, clean, site, layer, metric)
            ref = ((naive.read(model, corrupt, site, layer) - x) * g).sum(-1)
            ref = ref if by_pos else ref.sum(1)
            assert_close(got[:, layer].reshape(ref.shape), ref, 1e-4, msg=str((spec, layer)))
    atp = scan(model, recs, sites="mlp_out", method="atp", exact_budget=0, confirm=0)
    assert not torch.allclose(slot(atp, "mlp_out")[1], slot(res, "mlp_out")[1])  # the rules did something


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_relp_edges_equal_hand_eap_with_hand_rules(tiny, family):
    model, recs = tiny(family), records()
    clean, corrupt, ans, wrong = ids_of(recs)
    res = circuit(model, recs, method="relp", confirm=0, curve=False)
    with naive.hand_rules(model):
        ref = hand_eap(model, clean, corrupt, logit_diff(ans, wrong)) / len(recs)
    assert_close(res.scores, ref, 1e-4)


def test_relp_q_k_use_the_qk_fix_and_cp_is_refused_for_them(tiny):
    model, recs = tiny("llama"), records()
    fixed = relp_scan(model, recs, sites="q,k")
    atp_star = scan(model, recs, sites="q,k", method="atp*", exact_budget=0, confirm=0)
    assert fixed.signed.shape == atp_star.signed.shape and fixed.signed.abs().sum() > 0
    with pytest.raises(InputError, match="cp attention rule holds the pattern constant, so k and q"):
        relp_scan(model, recs, sites="head,q,k", relp_attention="cp")
    with pytest.raises(InputError, match="relp_attention needs method relp or auto"):
        scan(model, recs, sites="head", method="atp", relp_attention="cp")
    with pytest.raises(InputError, match="attention rule must be one of"):
        relp_scan(model, recs, sites="head", relp_attention="gim")
    with pytest.raises(InputError, match="every edge into a q or k reader"):
        circuit(model, recs, method="relp", relp_attention="cp", confirm=0, curve=False)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_auto_is_atp_on_neurons_and_relp_elsewhere_from_one_forward(tiny, family):
    """The default scan's two backwards of one graph: neuron sweeps equal a plain AtP scan, every other
    sweep a RelP scan (the plain backward through the rules' functions is the plain gradient)."""
    model, recs = tiny(family), records()
    sites = "head,neuron,resid_pre,mlp_out,q"
    auto = scan(model, recs, sites=sites, exact_budget=0, confirm=0)
    assert auto.method == "auto"
    assert auto.scored_by == {"head": "relp", "neuron": "atp", "resid_pre": "relp", "mlp_out": "relp", "q": "relp"}
    relp, atp = relp_scan(model, recs, sites=sites), scan(model, recs, sites=sites, method="atp*", exact_budget=0)
    for name, ref in (("head", relp), ("resid_pre", relp), ("mlp_out", relp), ("q", relp), ("neuron", atp)):
        assert_close(slot(auto, name)[1], slot(ref, name)[1], msg=name)
    only_neurons = scan(model, recs, sites="neuron", exact_budget=0, confirm=0)  # no rules needed at all
    assert only_neurons.scored_by == {"neuron": "atp"}
    assert_close(only_neurons.signed, slot(atp, "neuron")[1].flatten(1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["layernorm", "llama_rmsnorm", "gemma_rmsnorm", "silu", "gelu_tanh"])
def test_rules_on_cuda_equal_their_hand_formulas(kind, dtype):
    """Each rule's VJP on the GPU against its hand formula in fp64 on the CPU (bf16: at most twice
    torch's own bf16 error on the GPU)."""
    x, g = inputs(torch.float32)
    if kind in NORMS:
        make, hand = NORMS[kind]
        m = make(16)
        with torch.no_grad():
            m.weight.normal_(generator=torch.Generator().manual_seed(1))
        ref = hand(m, x.double(), g.double()).float()
        rule = relevance.norm_rule(m.cuda().to(dtype))
        low = hand(m, x.cuda().to(dtype), g.cuda().to(dtype)).cpu()
    else:
        m, f = ACTS[kind]
        ref = (g.double() * f(x.double())).float()
        rule = relevance.activation_rule(m)
        low = (g.cuda().to(dtype) * f(x.cuda().to(dtype))).cpu()
    got = vjp(m, rule, x.cuda().to(dtype), g.cuda().to(dtype)).cpu()
    assert_close(got, ref, 1e-5 if dtype == torch.float32 else 0, low=None if dtype == torch.float32 else low)


@pytest.mark.gpu
def test_relp_scan_on_cuda_equals_cpu(tiny):
    recs = records()
    cpu = relp_scan(tiny("llama"), recs, sites="head,resid_pre,mlp_out,v")
    gpu = relp_scan(causalscan.load("random:llama-tiny", device="cuda"), recs, sites="head,resid_pre,mlp_out,v")
    assert_close(gpu.signed, cpu.signed, 1e-3)  # TF32 matmuls on the GPU


def test_cli_relp_and_its_refusals(capsys):
    from causalscan.cli import main

    assert main(["scan", "--method", "relp", "--relp-attention", "attnlrp", "--sites", "head", "--confirm", "2"]) == 0
    capsys.readouterr()
    assert main(["scan", "--method", "relp", "--relp-attention", "cp", "--sites", "head,q"]) == 2
    assert "the cp attention rule holds the pattern constant, so q get no relevance" in capsys.readouterr().err
    assert main(["scan", "--method", "atp", "--relp-attention", "cp", "--sites", "head"]) == 2
    assert "relp_attention needs method relp or auto" in capsys.readouterr().err
    assert main(["circuit", "--method", "relp", "--edges", "4", "--confirm", "2", "--no-curve"]) == 0
