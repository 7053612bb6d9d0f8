"""Circuits against independent references.

- EAP scores equal a hand autograd reference: each reader given its own copy of its input (a zero
  probe added before its norm, by plain hooks that call its norm and projection again), one
  backward per reader, dotted with each upstream node's write difference (each head's output
  projection applied to that head alone); EAP-IG equals the same averaged over explicitly
  interpolated embeddings, and one step is EAP.
- Exact edge patching equals a naive two-pass construction (pass 1: the writes; pass 2: the reader
  reads its input plus the upstream node's difference), for single edges and for many edges into one
  reader (the dense path).
- Identities: every edge of the graph patched is the other run; every edge out of a node patched is
  that node patched (activation patching); the faithfulness curve runs from the corrupt run (no
  edge kept) to the clean run (every edge kept).
- Planted: on the zoo's induction model the previous-token heads -> induction heads key edges and
  the induction heads -> logits edges are in the top 10, by EAP-IG and by exact edge patching.
"""

import json
import re
from functools import partial

import pytest
import torch
from test_attribution import ids_of, records
from test_ig import interpolated

import causalscan as cs
from causalscan import report
from causalscan.circuits import edge_patching, edges
from causalscan.circuits.circuit import circuit, grid
from causalscan.circuits.graph import Graph
from causalscan.cli import main
from causalscan.errors import InputError

import naive
from tolerance import assert_close, assert_identical

FAMILIES = ["llama", "gpt2", "gpt_neox"]  # GQA; fused q|k|v (Conv1D); interleaved q|k|v with parallel blocks
MORE = ["phi", "opt", "qwen3"]  # one norm for attention and MLP; an MLP on [B*T, d]; q/k norms after the projection
scores_only = partial(circuit, method="eap", confirm=0, curve=False)


def readers(ad) -> list[tuple[str, int, int]]:
    """``(kind, layer, index)`` of every reader, in the graph's order (written out here, and checked
    against the graph's own numbering)."""
    out = [
        (kind, layer, i)
        for layer in range(ad.n_layers)
        for kind, n in (("q", ad.n_heads), ("k", ad.n_kv_heads), ("v", ad.n_kv_heads), ("mlp", 1))
        for i in range(n)
    ]
    out.append(("logits", ad.n_layers - 1, 0))
    g = Graph(ad)
    assert [g.reader_of(r) for r in range(g.n_read)] == out
    assert [g.reader(*x) for x in out] == list(range(g.n_read))
    return out


def logit_diff(ans, wrong):
    return lambda logits: logits[torch.arange(len(ans)), ans] - logits[torch.arange(len(ans)), wrong]


def hand_eap(model, base, other, metric, interpolate=None) -> torch.Tensor:
    """``[n_up, n_read]`` summed over pairs; ``interpolate``: alphas of embedding paths to average over."""
    g = Graph(model.adapter)
    delta = naive.writes(model, other, g) - naive.writes(model, base, g)
    ref = torch.zeros(g.n_up, g.n_read)
    for r, (kind, layer, i) in enumerate(readers(model.adapter)):
        if interpolate is None:
            grad = naive.reader_grad(model, base, kind, layer, i, metric)
        else:
            grad = 0
            for a in interpolate:
                with interpolated(model, base, other, a):
                    grad = grad + naive.reader_grad(model, base, kind, layer, i, metric) / len(interpolate)
        ref[:, r] = torch.einsum("butd,btd->u", delta, grad)
    return ref * g.valid()


@pytest.mark.parametrize("direction", ["noising", "denoising"])
@pytest.mark.parametrize("family", FAMILIES)
def test_eap_equals_hand_autograd(tiny, family, direction):
    model, recs = tiny(family), records()
    clean, corrupt, ans, wrong = ids_of(recs)
    base, other = (clean, corrupt) if direction == "noising" else (corrupt, clean)
    res = scores_only(model, recs, direction=direction)
    ref = hand_eap(model, base, other, logit_diff(ans, wrong)) / len(recs)
    assert_close(res.scores, ref, 1e-4)
    assert (res.scores[~res.graph.valid()] == 0).all()


@pytest.mark.parametrize("family", MORE)
def test_eap_equals_hand_autograd_more_families(tiny, family):
    model, recs = tiny(family), records(pairs=2)
    clean, corrupt, ans, wrong = ids_of(recs)
    assert_close(scores_only(model, recs).scores, hand_eap(model, clean, corrupt, logit_diff(ans, wrong)) / 2, 1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eap_ig_equals_an_average_over_interpolated_embeddings(tiny, family):
    model, recs, steps = tiny(family), records(pairs=2), 3
    clean, corrupt, ans, wrong = ids_of(recs)
    res = scores_only(model, recs, method="eap-ig", ig_steps=steps)
    ref = hand_eap(model, clean, corrupt, logit_diff(ans, wrong), [k / steps for k in range(steps)]) / 2
    assert_close(res.scores, ref, 1e-4)
    one = scores_only(model, recs, method="eap-ig", ig_steps=1)
    assert_close(one.scores, scores_only(model, recs).scores, 1e-5)


@pytest.mark.parametrize("family", FAMILIES + ["phi"])
def test_exact_edges_equal_two_pass_hooks(tiny, family):
    model, recs = tiny(family), records()
    clean, corrupt, ans, wrong = ids_of(recs)
    metric = logit_diff(ans, wrong)
    res = circuit(model, recs, method="eap", confirm=6, confirm_random=6, curve=False)
    g = res.graph
    delta = naive.writes(model, corrupt, g) - naive.writes(model, clean, g)
    with torch.no_grad():
        base = metric(model.hf(input_ids=clean).logits[:, -1])
        ref = torch.stack(
            [
                naive.reader_run(model, clean, *readers(model.adapter)[e % g.n_read], delta[:, e // g.n_read], metric)
                - base
                for e in res.confirmed.tolist()
            ],
            1,
        )
    kinds = {readers(model.adapter)[e % g.n_read][0] for e in res.confirmed.tolist()}
    assert len(kinds) >= 3, kinds  # several kinds of reader confirmed
    assert_close(res.exact, ref, 1e-4, scale=base.abs().max())


def _masks(g, *edge_sets):
    out = torch.zeros(len(edge_sets), g.n_up, g.n_read, dtype=torch.bool)
    for j, es in enumerate(edge_sets):
        for u, r in es:
            out[j, u, r] = True
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_many_edges_into_one_reader(tiny, family):
    """Every upstream node into the logits, and into one query: the dense path, against the naive
    construction with the summed differences."""
    model = tiny(family)
    clean, corrupt, ans, wrong = ids_of(records(pairs=2))
    g = Graph(model.adapter)
    other = edge_patching.record(g, corrupt).writes
    delta = naive.writes(model, corrupt, g) - naive.writes(model, clean, g)
    q = g.reader("q", 1, 1)
    sets = [[(u, g.n_read - 1) for u in range(g.n_up)], [(u, q) for u in range(int(g.prefix[q]))]]
    for s, (kind, layer, i) in zip(sets, [("logits", 0, 0), ("q", 1, 1)], strict=True):
        m = _masks(g, s, s)  # one row per pair
        got = edge_patching.patched_logits(g, clean, other, m)[:, -1]
        with torch.no_grad():
            ref = naive.reader_run(model, clean, kind, layer, i, delta[:, : len(s)].sum(1), lambda x: x)
        assert_close(got, ref, 1e-5)
        # started at block 1 from the base residual, the layer-0 nodes' differences taken from the base run
        _, base, blocks = edge_patching.record(g, clean, resid=True)
        late = edge_patching.patched_logits(g, clean, other, m, start=1, resid=blocks[:, 1], base_diff=other - base)[
            :, -1
        ]
        assert_close(late, ref, 1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_patching_every_edge_is_patching_every_node(tiny, family):
    model = tiny(family)
    clean, corrupt, _, _ = ids_of(records(pairs=2))
    ad = model.adapter
    g = Graph(ad)
    other = edge_patching.record(g, corrupt).writes
    valid = g.valid()
    # every edge: the other run
    every = edge_patching.patched_logits(g, clean, other, valid.expand(2, -1, -1))[:, -1]
    with torch.no_grad():
        ref = model.hf(input_ids=corrupt).logits[:, -1]
    assert_close(every, ref, 1e-4)
    # every edge out of one node: that node patched (head 0.1, the layer-0 MLP, the embeddings)
    for u, site, layer, index in [(g.head(0, 1), "head", 0, 1), (g.mlp(0), "mlp_out", 0, 0), (0, "resid_pre", 0, 0)]:
        out_edges = torch.zeros_like(valid)
        out_edges[u] = valid[u]
        got = edge_patching.patched_logits(g, clean, other, out_edges.expand(2, -1, -1))[:, -1]
        with torch.no_grad():
            src = naive.read(model, corrupt, site, layer)
            ref = naive.patched_logits(model, clean, site, layer, index, None, src)
        assert_close(got, ref, 1e-4, msg=site)


def test_faithfulness_runs_from_corrupt_to_clean(tiny):
    model, recs = tiny("llama"), records(pairs=4)
    res = circuit(model, recs, method="eap", confirm=0, edges=7)
    assert set(grid(res.n_rows(), 7)) <= set(res.curve_n) and res.curve_n == sorted(set(res.curve_n))
    assert res.curve_n[0] == 0 and res.curve_n[-1] == res.n_rows() and 7 in res.curve_n
    gap = (res.clean - res.corrupt).abs().max()
    assert_close(res.curve[:, 0], res.corrupt, 1e-4, scale=gap)
    assert_close(res.curve[:, -1], res.clean, 1e-4, scale=gap)
    f = res.faithfulness
    assert f["recovered"][0] == pytest.approx(0, abs=1e-4) and f["recovered"][-1] == pytest.approx(1, abs=1e-4)
    assert f["n_95"] is not None and all(r < 0.95 for n, r in zip(f["n"], f["recovered"], strict=True) if n < f["n_95"])
    for t, n_t in ((0.8, f["n_80"]), (0.95, f["n_95"])):  # bisected: the size below it is within 2% or one edge
        below = max(n for n in f["n"] if n < n_t)
        assert n_t - below <= max(1, n_t // 50), (t, n_t, below, f["n"])
    grid_only = circuit(model, recs, method="eap", confirm=0, edges=7, refine=0)
    assert grid_only.curve_n == grid(res.n_rows(), 7)


@pytest.mark.parametrize("kind", ["multi-token answers", "gaussian noise"])
def test_faithfulness_ends_with_continuations_and_noise(tiny, kind):
    """Rows of multi-token answers (continuations teacher-forced as extra rows) and Gaussian-noise
    rows (several draws per pair): no edge kept is the corrupt run, every edge the clean run."""
    from test_answers import MULTI

    from conftest import IOI

    if kind == "gaussian noise":
        recs = [{"clean": r["clean"], "noise_span": r["clean"].split()[1], "answer": r["answer"]} for r in IOI[:2]]
        res = circuit(
            tiny("gpt2"), recs, method="eap", confirm=2, confirm_random=0, edges=5, metric="logprob", samples=3
        )
    else:
        res = circuit(tiny("llama"), MULTI, method="eap", confirm=2, confirm_random=0, edges=5)
    gap = (res.clean - res.corrupt).abs().max()
    assert_close(res.curve[:, 0], res.corrupt, 1e-4, scale=gap)
    assert_close(res.curve[:, -1], res.clean, 1e-4, scale=gap)
    assert res.exact.isfinite().all()


def test_mean_ablation_of_one_pair_is_the_patch(tiny):
    model, recs = tiny("gpt2"), records(pairs=1)
    patch = circuit(model, recs, method="eap", confirm=0, edges=5)
    mean = circuit(model, recs, method="eap", confirm=0, edges=5, ablation="mean")
    assert_close(mean.curve, patch.curve, 1e-5, scale=(patch.clean - patch.corrupt).abs())
    two = records(pairs=2)
    two[1]["clean_ids"] = two[1]["clean_ids"][:5]
    two[1]["corrupt_ids"] = two[1]["corrupt_ids"][:5]
    with pytest.raises(InputError, match="same token length"):
        circuit(model, two, ablation="mean")


@pytest.fixture(scope="module")
def induction():
    data = cs.zoo.dataset_path("induction", "previous")
    return (
        circuit("induction", data, method="eap-ig", confirm=0, curve=False),
        circuit("induction", data, method="eap", confirm=46, confirm_random=0, curve=False),
    )


def test_induction_circuit_is_the_planted_one(induction):
    card = cs.zoo.card("induction")["components"]
    ig, exact = induction
    assert exact.n_rows() == 46 and len(exact.confirmed) == 46  # every edge patched exactly
    by_exact = exact.confirmed[exact.exact.mean(0).abs().argsort(descending=True)]
    g = ig.graph
    for top in ({e["edge"] for e in ig.top(10)}, {g.edge_name(*divmod(e, g.n_read)) for e in by_exact[:10].tolist()}):
        for layer, h in card["induction"]:
            assert f"L{layer}.H{h} -> logits" in top
            assert any(f"L{pl}.H{ph} -> L{layer}.KV{h}.k" in top for pl, ph in card["previous_token"]), top


def test_eap_misses_the_key_edges_eap_ig_finds(induction):
    """The reason EAP-IG is the default: the induction head's softmax saturates, so EAP's gradient
    at the clean run barely sees the key edges that exact patching measures."""
    _, eap = induction
    ranks = {e["edge"]: e["rank"] for e in eap.top(46)}
    assert min(ranks[f"L0.H{a} -> L1.KV{b}.k"] for a in (0, 1) for b in (0, 1)) >= 10


def test_export_json_dot_and_report(tmp_path):
    data = cs.zoo.dataset_path("induction", "previous")
    res = circuit("induction", data, method="eap-ig", confirm=5, edges=8)
    out = res.save(tmp_path)
    doc = json.loads((out / "circuit.json").read_text())
    assert doc["kind"] == "circuit" and doc["settings"]["size"] == 8
    assert [e["edge"] for e in doc["edges"]] == [e["edge"] for e in res.top(50)]
    assert doc["faithfulness"]["recovered"] == pytest.approx(res.faithfulness["recovered"])
    dot = (out / "circuit.dot").read_text()
    lines = re.findall(r'^  "([^"]+)" -> "([^"]+)" \[color="(#[0-9a-f]+)", penwidth=([\d.]+)', dot, re.M)
    assert [(a, b) for a, b, *_ in lines] == [(e["upstream"], e["reader_node"]) for e in res.top(8)]
    assert all((c == "#2166ac") == (e["score"] >= 0) for (_, _, c, _), e in zip(lines, res.top(8), strict=True))
    saved, tensors = report.load(out)
    figs = report.figures(saved, tensors)
    assert list(figs) == ["circuit", "faithfulness", "agreement/edges"]
    assert list(figs["faithfulness"].data[0].y) == pytest.approx(res.faithfulness["recovered"][1:])
    drawn = [tr for tr in figs["circuit"].data if tr.mode == "lines"]
    assert len(drawn) == 8
    assert "ranked edges" in report.render(saved, tensors) and "top edges" in res._repr_html_()


def test_cli_circuit(tmp_path, capsys):
    d = tmp_path / "c"
    assert (
        main(["circuit", "--method", "eap", "--edges", "6", "--confirm", "3", "--out", str(d), "--json", "--report"])
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["settings"]["method"] == "eap" and len(doc["edges"]) == 46 and doc["agreement"]["k"] == 3
    assert {p.name for p in d.iterdir()} >= {"circuit.json", "scores.safetensors", "circuit.dot", "report.html"}
    assert main(["circuit", "--model", "random:gemma2-tiny", "--data", str(cs.zoo.dataset_path("induction"))]) == 2
    assert "per-head writes" in capsys.readouterr().err
    assert main(["circuit", "--method", "eap", "--ig-steps", "3"]) == 2
    assert "ig_steps needs method eap-ig" in capsys.readouterr().err


def test_attribution_resumes_from_its_checkpoint(tiny, tmp_path):
    model, recs = tiny("llama"), records(pairs=4)
    full = scores_only(model, recs, batch_size=1)

    def stop(stage, done, total):
        if stage == "attribution" and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scores_only(model, recs, batch_size=1, checkpoint=tmp_path, progress=stop)
    assert (tmp_path / "circuit.partial.safetensors").is_file()
    seen = []
    res = scores_only(model, recs, batch_size=1, checkpoint=tmp_path, progress=lambda s, d, t: seen.append((s, d)))
    assert seen[0] == ("attribution", 3)  # batches 0 and 1 came from the file
    assert torch.equal(res.scores, full.scores) and torch.equal(res.clean, full.clean)
    assert not (tmp_path / "circuit.partial.safetensors").exists()


@pytest.mark.gpu
def test_circuit_on_cuda_equals_cpu(tiny):
    """Every stage on CUDA (reader gradients, edge patching, the curve) against the same model on the CPU."""
    recs = records()
    cpu = circuit(tiny("llama"), recs, method="eap-ig", ig_steps=2, confirm=5, edges=6)
    gpu = circuit(cs.load("random:llama-tiny", device="cuda"), recs, method="eap-ig", ig_steps=2, confirm=5, edges=6)
    assert_close(gpu.scores, cpu.scores, 1e-3)  # TF32 matmuls on the GPU
    assert torch.equal(gpu.confirmed, cpu.confirmed) or set(gpu.ranked()[:5].tolist()) == set(cpu.ranked()[:5].tolist())
    gap = (cpu.clean - cpu.corrupt).abs().max()
    assert_close(gpu.curve, cpu.curve, 1e-3, scale=gap)


def test_ctrl_c_on_the_cli_says_where_the_partial_sums_are_and_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    """The interrupt lands in the third attribution batch of `circuit --out`: one line saying the partial
    sums are in --out (the result class says circuit resumes), and the rerun equals an uninterrupted run."""
    from safetensors.torch import load_file
    from torch._subclasses.fake_tensor import FakeTensor

    argv = ["circuit", "--method", "eap", "--edges", "6", "--confirm", "2", "--batch-size", "4", "--no-curve"]
    assert main([*argv, "--out", str(tmp_path / "full")]) == 0
    real, calls = edges.attribute, []

    def interrupted(g, *args, **kw):
        if not isinstance(next(g.ad.model.parameters()), FakeTensor):  # not the memory plan's trial batch
            calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(g, *args, **kw)

    monkeypatch.setattr(edges, "attribute", interrupted)
    capsys.readouterr()
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("causalscan:")]
    assert err == [f"causalscan: interrupted; partial results are in {out}; the same command resumes from them"]
    assert (out / "circuit.partial.safetensors").is_file() and not (out / "circuit.json").exists()
    monkeypatch.setattr(edges, "attribute", real)
    assert main([*argv, "--out", str(out)]) == 0
    assert_identical(load_file(tmp_path / "full" / "scores.safetensors"), load_file(out / "scores.safetensors"))
