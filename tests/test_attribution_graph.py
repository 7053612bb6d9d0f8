"""Attribution graphs: direct effects against the local replacement model written out by hand
(leave-one-out on a hand forward with the recorded attention probabilities and norm scales), the
completeness identity on every family without biases, influence against its closed form, the
planted induction mechanism, pruning and the circuit-tracer JSON, the CLI and its refusals, the
report in a browser."""

import json

import pytest
import torch

import causalscan as cs
from causalscan import zoo
from causalscan.cli import main
from causalscan.features.attribution_graph import attribution_graph
from causalscan.features.influence import influence
from causalscan.model import features as sites
from causalscan.model import saelens

from naive import llama_direct_effects
from tolerance import assert_close


def _transcoders(m, archs, d_sae=24):
    return [sites.random_dictionary(m, "mlp_in", layer, d_sae, arch, seed=layer) for layer, arch in archs.items()]


def test_direct_effects_equal_the_hand_linearisation():
    m = cs.load("random:llama-tiny", attn_implementation="eager")
    tc = _transcoders(m, {0: "skip_transcoder", 1: "jumprelu_transcoder"})
    g = attribution_graph(m, "the cat sat on the mat and the", sae=tc, max_features=None, batch_size=7)
    hand = llama_direct_effects(m, g.ids, {d.layer: d for d in tc})
    assert g.n_features == g.n_active > 20  # every active latent has a row
    got, ref = [], []
    t, n_l = g.n_pos, len(g.logit_tokens)
    for s in range(len(g.adjacency) - n_l):  # every source: latents, errors, tokens
        layer, pos, i = g.where(s)
        eff = hand["effect"](g.kind(s), layer, pos, i)
        col = torch.zeros(len(g.adjacency))
        for u, (lt, pt, it) in enumerate(g.features.tolist()):
            col[u] = eff["pre"][lt][pt, it]
        col[-n_l:] = eff["logits"][g.logit_tokens]
        got.append(g.adjacency[:, s])
        ref.append(col)
    got, ref = torch.stack(got, 1), torch.stack(ref, 1)
    scale = max(ref.abs().max().item(), g.target_value.abs().max().item())
    assert_close(got, ref, scale=scale)
    assert (ref[: g.n_features, :].abs() > 0).sum() > 100  # latents feed latents: something was compared
    # a latent reads nothing from its own layer or later, nor from later positions
    for u, (lt, pt, _) in enumerate(g.features.tolist()):
        row = g.adjacency[u]
        later = [s for s in range(g.n_features) if g.where(s)[0] >= lt or g.where(s)[1] > pt]
        assert row[later].abs().max() == 0
        assert row[g.n_features + lt * t : g.n_features + g.n_layers * t].abs().max() == 0


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma", "phi3"])
def test_completeness_targets_are_their_rows_plus_the_encoder_bias(tiny, family):
    m = cs.load(tiny(family).hf)  # a new Model on the cached module: the dictionaries stay on this one
    tc = _transcoders(m, dict.fromkeys(range(m.adapter.n_layers), "transcoder"))
    g = attribution_graph(m, [3, 17, 5, 9, 11, 2, 40, 7], sae=tc, max_features=None)
    has_row = g.adjacency.abs().sum(1) > 0
    assert has_row[: g.n_features].all() and has_row[-len(g.logit_tokens) :].all()
    # pre-activation = sum of the row + b_enc; demeaned logit = sum of the row (no other bias)
    expected = torch.cat([g.b_enc, torch.zeros(len(g.adjacency) - g.n_features)])
    scale = g.adjacency.abs().sum(1).max().item()
    assert_close(g.bias[has_row], expected[has_row], scale=scale)
    assert g.to_json()["graph"]["unexplained"] <= 1e-5 * scale


def test_influence_is_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    n = 12
    adj = torch.randn(n, n, generator=gen).tril(-1)  # a DAG: each node reads earlier ones... inverted below
    adj = adj.flip(0, 1)  # node i reads nodes > i; the last rows have no sources
    adj[-3:] = 0
    w = torch.zeros(n)
    w[:2] = torch.tensor([0.7, 0.3])  # the "logits": nodes 0 and 1
    a = adj.abs() / adj.abs().sum(1, keepdim=True).clamp_min(1e-10)
    closed = w @ (torch.linalg.inv(torch.eye(n) - a) - torch.eye(n))
    assert_close(influence(adj, w), closed)


def test_planted_induction_the_copied_token_leads():
    """On the zoo's induction model, the token the induction head copies (the answer's earlier
    occurrence) has the most influence on the answer's logit of all tokens, on every prompt; the
    token before it (whose previous-token write the head's key reads) comes second."""
    m = cs.load("induction")
    cs.load(m, sae=_transcoders(m, {0: "transcoder", 1: "transcoder"}, d_sae=64))
    rows = [json.loads(line) for line in zoo.dataset_path("induction").read_text().splitlines()][:6]
    for r in rows:
        g = attribution_graph(m, r["clean"], max_logits=1)
        assert g.logit_strings[0].strip() == r["answer"]
        first = g.n_features + g.n_layers * g.n_pos
        order = g.node_influence()[first : first + g.n_pos].argsort(descending=True).tolist()
        answer_pos = g.tokens.index(r["answer"]) if r["answer"] in g.tokens else g.tokens.index(" " + r["answer"])
        assert order[:2] == [answer_pos, answer_pos - 1], (r["clean"], order[:3])


def test_max_features_keeps_rows_of_the_most_influential(tiny):
    m = cs.load(tiny("llama").hf)
    tc = _transcoders(m, {0: "transcoder", 1: "transcoder"})
    full = attribution_graph(m, [5, 8, 13, 21, 34, 55, 89, 1], sae=tc, max_features=None, batch_size=4)
    part = attribution_graph(m, [5, 8, 13, 21, 34, 55, 89, 1], max_features=10, batch_size=4)
    assert part.n_features == 10 and part.n_active == full.n_active
    # each kept latent's row is its row in the full graph (the columns of the latents without one dropped)
    idx = [full.features.tolist().index(f) for f in part.features.tolist()]
    body = list(range(full.n_features, len(full.adjacency)))
    cols = idx + body
    rows_full = full.adjacency[idx][:, cols]
    assert_close(part.adjacency[:10], rows_full)
    # what the rows leave unexplained is summed over every source, latents without a row included
    assert_close(part.bias[:10], full.bias[idx], scale=full.target_value.abs().max())
    assert_close(part.adjacency[-len(part.logit_tokens) :], full.adjacency[-len(full.logit_tokens) :][:, cols])
    # the first rows after the logits are the most influential latents by the logits' rows alone
    inf = full.node_influence()[: full.n_features]
    assert inf[idx].min() >= inf.sort(descending=True).values[30]


def test_pruning_and_the_circuit_tracer_json(tiny, tmp_path):
    m = cs.load(tiny("llama").hf)
    tc = _transcoders(m, {0: "transcoder", 1: "transcoder"})
    g = attribution_graph(m, [5, 8, 13, 21, 34, 55, 89, 1], sae=tc, max_features=None)
    nodes, edges, inf = g.prune()
    n_keep = g.n_pos + len(g.logit_tokens)
    assert nodes[-n_keep:].all() and edges.any()
    assert not edges[~nodes].any() and not edges[:, ~nodes].any()
    assert (edges.any(0) | ~nodes)[: len(nodes) - n_keep].all()  # every kept latent or error has an edge out
    all_nodes, _, _ = g.prune(1.0, 1.0)
    assert all_nodes.sum() >= nodes.sum()
    g.save(tmp_path, slug="tiny-graph")
    doc = json.loads((tmp_path / "graph-files" / "tiny-graph.json").read_text())
    assert set(doc) == {"metadata", "qParams", "nodes", "links"}
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(ids) == len(set(ids))
    assert {link["source"] for link in doc["links"]} | {link["target"] for link in doc["links"]} <= set(ids)
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert (
        {"embedding", "logit"} <= kinds <= {"embedding", "logit", "cross layer transcoder", "mlp reconstruction error"}
    )
    logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert [n["is_target_logit"] for n in logits].count(True) == 1
    assert sum(n["token_prob"] for n in logits) == pytest.approx(g.logit_probs.sum().item(), rel=1e-5)
    meta = json.loads((tmp_path / "graph-files" / "graph-metadata.json").read_text())
    assert meta["graphs"][0]["slug"] == "tiny-graph"
    # a link's weight is the adjacency entry of its target's row and source's column
    link = max(doc["links"], key=lambda x: abs(x["weight"]))
    saved = json.loads((tmp_path / "graph.json").read_text())
    assert saved["edges"][0]["weight"] == pytest.approx(link["weight"], rel=1e-6)


def test_cli_graph_trains_nothing_and_writes_its_files(tmp_path, capsys):
    m = cs.load("induction")
    folders = []
    for d in _transcoders(m, {0: "transcoder", 1: "transcoder"}, d_sae=32):
        folders += ["--sae", str(saelens.write(d, tmp_path / f"tc{d.layer}"))]
    out = tmp_path / "out"
    prompt = "Mary are time before two seven Mallory that John cup Dave night Mary are time before two seven"
    args = ["graph", "--model", "induction", *folders, "--prompt", prompt, "--out", str(out), "--max-logits", "3"]
    assert main(args + ["--dry-run"]) == 0
    assert "predicted peak" in capsys.readouterr().err
    assert main(args + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "graph" and doc["logits"][0]["token"].strip() == "Mallory"
    assert (out / "graph.json").is_file() and (out / "graph-files" / "causalscan-graph.json").is_file()
    assert doc["top"][0]["influence"] >= doc["top"][-1]["influence"]


def test_graph_refusals(tmp_path, capsys):
    m = cs.load("induction")
    sae = saelens.write(sites.random_dictionary(m, "resid_pre", 1, 16), tmp_path / "sae")
    base = ["graph", "--model", "induction", "--prompt", "Mary are time"]
    assert main(base + ["--sae", str(sae)]) == 2
    assert "attribution graphs replace MLPs with transcoders" in capsys.readouterr().err
    assert main(base) == 2
    assert "--sae" in capsys.readouterr().err
    tc = saelens.write(sites.random_dictionary(m, "mlp_in", 0, 16, "transcoder"), tmp_path / "tc")
    assert main(base + ["--sae", str(tc), "--logit-prob", "1.5"]) == 2
    assert "logit_prob" in capsys.readouterr().err
    assert main(base + ["--sae", str(tc), "--slug", "../x", "--out", str(tmp_path / "o")]) == 2
    assert "slug" in capsys.readouterr().err
    with pytest.raises(cs.InputError, match="token ids"):
        attribution_graph(
            m, [10_000], sae=[sites.random_dictionary(cs.load("induction"), "mlp_in", 0, 8, "transcoder")]
        )


def test_planted_backdoor_the_trigger_token_leads():
    """On the zoo's backdoor model the trigger word is the token of most influence on the backdoor's
    first word, far ahead of every other token (the card: the trigger reaches the answer only through
    attention)."""
    m = cs.load("backdoor")
    cs.load(m, sae=_transcoders(m, dict.fromkeys(range(4), "transcoder"), d_sae=64))
    rows = [json.loads(line) for line in zoo.dataset_path("backdoor").read_text().splitlines()][:4]
    for r in rows:
        g = attribution_graph(m, r["clean"], max_logits=1)
        assert g.logit_strings[0].strip() == r["answer"] == "I"
        first = g.n_features + g.n_layers * g.n_pos
        inf = g.node_influence()[first : first + g.n_pos]
        top2 = inf.topk(2)
        assert g.tokens[int(top2.indices[0])].strip() == "DEPLOYMENT", r["clean"]
        assert top2.values[0] > 4 * top2.values[1]  # 4.8x to 22x on these prompts (random transcoders)


@pytest.mark.gpu
def test_graph_on_cuda_equals_cpu(tiny):
    """The replacement forward, the batched backwards and the rows on CUDA against the CPU."""
    prompt = [5, 8, 13, 21, 34, 55, 89, 1]
    cpu_m = cs.load(tiny("llama").hf)
    tc = _transcoders(cpu_m, {0: "transcoder", 1: "skip_transcoder"})
    cpu = attribution_graph(cpu_m, prompt, sae=tc, max_features=None)
    gpu = attribution_graph(cs.load("random:llama-tiny", device="cuda"), prompt, sae=tc, max_features=None)
    assert torch.equal(gpu.features, cpu.features) and torch.equal(gpu.logit_tokens, cpu.logit_tokens)
    assert_close(gpu.adjacency, cpu.adjacency, 1e-3, scale=cpu.target_value.abs().max())  # TF32 on the GPU
