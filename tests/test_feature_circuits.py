"""Feature circuits: transcoder latents as nodes of the circuit graph, against the independent edge
references of tests/test_circuits.py extended by hand (tests/naive.py: a latent's write ``f_j
W_dec[j]`` of the MLP's input encoded by its formula; a latent reader moves its latent alone, the
MLP's reader moves the rest) - EAP by autograd on each reader's own probe, exact edges by two
passes - and the identities: every edge patched is the corrupt run, every edge out of a latent is
that latent patched, the rest plus the latents is the MLP; refusals."""

import pytest
import torch
from test_attribution import ids_of, records

import causalscan as cs
from causalscan.circuits import edge_patching
from causalscan.circuits.circuit import circuit
from causalscan.circuits.graph import Graph
from causalscan.cli import main
from causalscan.model import features, saelens

import naive
from tolerance import assert_close

FAMILIES = ["llama", "gpt2", "gpt_neox"]  # gated MLP; Conv1D; parallel blocks


def _with_transcoders(tiny, family, archs=("topk_transcoder", "transcoder")):
    m = cs.load(tiny(family).hf)  # a Model of its own: the dictionaries stay on it
    m.tokenizer = tiny(family).tokenizer
    tcs = [
        features.random_dictionary(m, "mlp_in", layer, 24, arch, seed=layer, k=6)
        for layer, arch in zip(range(m.adapter.n_layers), archs, strict=False)
    ]
    return cs.load(m, sae=tcs)


def _readers(g) -> list[tuple[str, int, int]]:
    """Every reader in order, written out: per layer q, k, v, the MLP (the rest), each latent node."""
    ad = g.ad
    out = []
    for layer in range(ad.n_layers):
        for kind, n in (("q", ad.n_heads), ("k", ad.n_kv_heads), ("v", ad.n_kv_heads), ("mlp", 1)):
            out += [(kind, layer, i) for i in range(n)]
        out += [("latent", layer, k) for k in range(len(g.latents.get(layer, ())))]
    return out + [("logits", ad.n_layers - 1, 0)]


def test_graph_numbering_with_latents(tiny):
    m = _with_transcoders(tiny, "llama")
    g = Graph(m.adapter, {0: [3, 7], 1: [5]})
    h = m.adapter.n_heads
    assert g.n_up == 1 + 2 * (h + 1) + 3
    assert [g.node_name(u) for u in range(g.n_up)][h + 1 : h + 4] == ["L0.MLP", "L0.F3", "L0.F7"]
    assert [g.reader_of(r) for r in range(g.n_read)] == _readers(g)
    assert g.reader_name(g.reader("latent", 1, 0)) == "L1.F5.in" and g.reader_node(g.reader("latent", 1, 0)) == "L1.F5"
    # a latent reader sees what the MLP's reader sees: its own layer's heads, not its own layer's latents
    assert g.prefix[g.reader("latent", 1, 0)] == g.prefix[g.reader("mlp", 1)] == g.mlp(1)
    with pytest.raises(cs.InputError, match="out of range"):
        Graph(m.adapter, {0: [99]})


@pytest.mark.parametrize("family", FAMILIES)
def test_feature_eap_equals_hand_autograd(tiny, family):
    m, recs = _with_transcoders(tiny, family), records(pairs=2)
    clean, corrupt, ans, wrong = ids_of(recs)
    res = circuit(m, recs, method="eap", confirm=0, curve=False, latents=3)
    g = res.graph
    assert sum(len(v) for v in g.latents.values()) >= 3  # some latents became nodes
    metric = lambda x: x[torch.arange(len(ans)), ans] - x[torch.arange(len(ans)), wrong]  # noqa: E731
    delta = naive.writes(m, corrupt, g) - naive.writes(m, clean, g)
    ref = torch.zeros(g.n_up, g.n_read)
    for r, (kind, layer, i) in enumerate(_readers(g)):
        grad = naive.reader_grad(m, clean, kind, layer, i, metric, g.latents)
        ref[:, r] = torch.einsum("butd,btd->u", delta, grad)
    ref = ref * g.valid() / len(recs)
    assert_close(res.scores, ref, 1e-4)
    lat_rows = [g.latent(layer, k) for layer, js in g.latents.items() for k in range(len(js))]
    assert ref[lat_rows].abs().max() > 0  # latents write into later readers


@pytest.mark.parametrize("family", FAMILIES)
def test_feature_exact_edges_equal_two_pass_hooks(tiny, family):
    m, recs = _with_transcoders(tiny, family), records()
    clean, corrupt, ans, wrong = ids_of(recs)
    metric = lambda x: x[torch.arange(len(ans)), ans] - x[torch.arange(len(ans)), wrong]  # noqa: E731
    res = circuit(m, recs, method="eap", confirm=8, confirm_random=8, curve=False, latents=3)
    g = res.graph
    delta = naive.writes(m, corrupt, g) - naive.writes(m, clean, g)
    readers = _readers(g)
    # the confirmed edges, and every edge into and out of the first latent node (a reader and a writer)
    u0, r0 = g.latent(min(g.latents), 0), g.reader("latent", min(g.latents), 0)
    extra = [u * g.n_read + r for u in range(g.n_up) for r in range(g.n_read) if g.valid()[u, r] and r0 in (r,)]
    extra += [u0 * g.n_read + r for r in range(g.n_read) if g.valid()[u0, r]]
    edges = res.confirmed.tolist() + extra
    masks = []
    for e in edges:
        mk = torch.zeros(g.n_up * g.n_read, dtype=torch.bool)
        mk[e] = True
        masks.append(mk.view(g.n_up, g.n_read))
    inp = cs.data.inputs.prepare(m, recs, "logit_diff", "noising", 10, 3.0, 0)
    got = edge_patching.measure(inp, g, masks, True, "patch")
    with torch.no_grad():
        base = metric(m.hf(input_ids=clean).logits[:, -1])
        ref = torch.stack(
            [
                naive.reader_run(m, clean, *readers[e % g.n_read], delta[:, e // g.n_read], metric, g.latents)
                for e in edges
            ],
            1,
        )
    assert_close(got, ref, 1e-4, scale=base.abs().max())
    assert (got - base[:, None]).abs().max() > 1e-4 * base.abs().max()  # something moved


def test_feature_identities(tiny):
    """Every edge patched is the corrupt run; every edge out of a latent node is that latent patched
    (the rest of its layer unpatched); no edge patched is the clean run."""
    m, recs = _with_transcoders(tiny, "llama"), records()
    clean, corrupt, ans, wrong = ids_of(recs)
    res = circuit(m, recs, method="eap", confirm=0, edges=10, latents=4)
    g = res.graph
    f = res.faithfulness
    assert f["recovered"][0] == pytest.approx(0.0, abs=1e-4) and f["recovered"][-1] == pytest.approx(1.0, abs=1e-4)
    layer = min(g.latents)
    j = g.latents[layer][0]
    out_of = torch.zeros(g.n_up, g.n_read, dtype=torch.bool)
    out_of[g.latent(layer, 0)] = g.valid()[g.latent(layer, 0)]
    inp = cs.data.inputs.prepare(m, recs, "logit_diff", "noising", 10, 3.0, 0)
    got = edge_patching.measure(inp, g, [out_of], True, "patch")[:, 0]
    d = m.adapter.dictionaries[layer]
    mlp = m.adapter.blocks[layer].get_submodule(m.adapter.family.readers[2])
    seen = {}

    def keep(mod, a, o):
        seen["f"] = naive.hand_encode(d, a[0])[..., j, None] * d.W_dec[j]

    with torch.no_grad():
        h = mlp.register_forward_hook(keep)
        m.hf(input_ids=corrupt)
        other = seen["f"]
        h.remove()

        def swap(mod, a, o):
            return o - naive.hand_encode(d, a[0])[..., j, None] * d.W_dec[j] + other

        h = mlp.register_forward_hook(swap)
        logits = m.hf(input_ids=clean).logits[:, -1]
        h.remove()
    metric = logits[torch.arange(len(ans)), ans] - logits[torch.arange(len(ans)), wrong]
    assert_close(got, metric, 1e-5)
    # the rest node: every edge out of it is it patched, whatever its own reader reads meanwhile
    rest, reader = g.mlp(layer), g.reader("mlp", layer)
    out_rest = torch.zeros(g.n_up, g.n_read, dtype=torch.bool)
    out_rest[rest] = g.valid()[rest]
    both = out_rest.clone()
    both[:, reader] = g.valid()[:, reader]
    got_out, got_both = edge_patching.measure(inp, g, [out_rest, both], True, "patch").unbind(1)
    kept = m.adapter.dictionaries[layer].W_dec[g.latents[layer]]

    def rest_of(mod, a, o):
        return o - naive.hand_encode(d, a[0])[..., g.latents[layer]] @ kept

    with torch.no_grad():
        h = mlp.register_forward_hook(lambda mod, a, o: seen.__setitem__("rest", rest_of(mod, a, o)))
        m.hf(input_ids=corrupt)
        h.remove()
        h = mlp.register_forward_hook(lambda mod, a, o: o - rest_of(mod, a, o) + seen["rest"])
        logits = m.hf(input_ids=clean).logits[:, -1]
        h.remove()
    metric = logits[torch.arange(len(ans)), ans] - logits[torch.arange(len(ans)), wrong]
    assert_close(got_out, metric, 1e-5)
    assert_close(got_both, metric, 1e-5)


def test_feature_circuit_cli_and_refusals(tiny, tmp_path, capsys):
    m = cs.load("induction")
    folders = []
    for layer in (0, 1):
        d = features.random_dictionary(m, "mlp_in", layer, 16, "transcoder", seed=layer)
        folders += ["--sae", str(saelens.write(d, tmp_path / f"tc{layer}"))]
    out = tmp_path / "out"
    args = ["circuit", "--method", "eap", *folders, "--latents", "2", "--edges", "8", "--confirm", "4"]
    assert main(args + ["--out", str(out), "--json", "--report"]) == 0
    doc = __import__("json").loads(capsys.readouterr().out)
    assert any(".F" in n for n in doc["nodes"]) or any(".F" in e["edge"] for e in doc["edges"])
    assert (out / "report.html").is_file()
    sae = saelens.write(features.random_dictionary(m, "resid_pre", 1, 16), tmp_path / "sae")
    assert main(["circuit", "--sae", str(sae), "--edges", "8"]) == 2
    assert "circuits take transcoders" in capsys.readouterr().err


@pytest.mark.gpu
def test_feature_circuit_on_cuda_equals_cpu(tiny):
    recs = records()
    cpu_m = _with_transcoders(tiny, "llama")
    tcs = list(cpu_m.adapter.dictionaries.values())
    cpu = circuit(cpu_m, recs, method="eap", confirm=5, edges=6, latents=3)
    gpu = circuit(
        cs.load(cs.load("random:llama-tiny", device="cuda"), sae=tcs), recs, method="eap", confirm=5, edges=6, latents=3
    )
    assert gpu.graph.latents == cpu.graph.latents
    assert_close(gpu.scores, cpu.scores, 1e-3)  # TF32 matmuls on the GPU
    gap = (cpu.clean - cpu.corrupt).abs().max()
    assert_close(gpu.curve, cpu.curve, 1e-3, scale=gap)
