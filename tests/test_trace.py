"""Gaussian-noise corruption (noise_span) and ROME causal tracing, against plain-hook references."""

import json
from functools import partial

import pytest
import torch

import causalscan
from causalscan.cli import main
from causalscan.data import corruption, metrics
from causalscan.data.pairs import Dataset, stack
from causalscan.data.sweeps import Component
from causalscan.errors import InputError
from causalscan.patching.patch import patch
from causalscan.patching.tracing import trace, window_layers

from naive import embed_noise, grad, module_outputs, patched_logits, read, restored_logits
from tolerance import assert_close

estimated = partial(causalscan.scan, exact_budget=0)  # scans that estimate every sweep

NOISY = [
    {
        "clean": "When Mary and John went to the store , John gave a drink to",
        "noise_span": "Mary and John",
        "answer": "Mary",
        "wrong": "John",
    },
    {
        "clean": "When Alice and Bob went to the park , Bob gave a ball to",
        "noise_span": "Alice and Bob",
        "answer": "Alice",
        "wrong": "Bob",
    },
]


def test_noise_span_positions(tiny):
    tok = tiny("llama").tokenizer
    recs = [
        NOISY[0],
        {**NOISY[0], "noise_span": [5, 7]},
        {"clean_ids": [1, 5, 6, 7], "noise_span": [1, 3], "answer": 9},
    ]
    pairs = Dataset(recs).tokenize(tok)
    assert pairs[0].span == (2, 5)  # <bos> When [Mary and John]
    assert pairs[0].corrupt == pairs[0].clean
    assert pairs[1].span == (5, 7) and pairs[2].span == (1, 3)
    assert tok.convert_ids_to_tokens(list(pairs[0].clean[2:5])) == ["Mary", "and", "John"]


@pytest.mark.parametrize(
    "rec, field, msg",
    [
        ({**NOISY[0], "noise_span": "Carol"}, "noise_span", "not a substring"),
        ({**NOISY[0], "corrupt": NOISY[0]["clean"]}, "noise_span", "not both"),
        ({**NOISY[0], "noise_span": [3, 3]}, "noise_span", "non-empty"),
        ({**NOISY[0], "noise_span": [0, 99]}, "noise_span", "runs past"),
        ({"clean_ids": [1, 5, 6], "noise_span": "x", "answer": 9}, "noise_span", "clean string"),
        ({"clean": 5, "noise_span": "x", "answer": 9}, "clean", "must be a string"),
        ({"clean": "Mary went to", "corrupt": "John went to", "answer": "the"}, "corrupt", "mixes"),
    ],
)
def test_bad_noise_records(tiny, tmp_path, rec, field, msg):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(NOISY[1]) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(InputError, match=msg) as e:
        Dataset.from_jsonl(p).tokenize(tiny("llama").tokenizer)
    assert str(e.value).startswith(f"{p}:2:") and f"field {field!r}" in str(e.value)


def test_noise_std_and_draws(tiny):
    model = tiny("gpt2")
    pairs = Dataset(NOISY).tokenize(model.tokenizer)
    rows = corruption.rows(model, pairs, samples=4, scale=3.0, seed=7)
    span_ids = [t for p in pairs for t in p.clean[p.span[0] : p.span[1]]]
    wte = model.hf.get_input_embeddings().weight
    assert rows.std == pytest.approx(3.0 * wte[span_ids].std().item(), rel=1e-5)  # ROME: 3 x subject-embedding std
    assert len(rows.pairs) == 8 and rows.owner.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    n = rows.noise([0, 1, 4], wte)
    a, b = pairs[0].span
    assert n[:2, :a].abs().sum() == 0 and n[:2, b:].abs().sum() == 0 and n[:2, a:b].abs().min() > 0
    assert not torch.equal(n[0], n[1])  # each sample its own draw
    assert abs(n[:2, a:b].std().item() / rows.std - 1) < 0.1
    again = corruption.rows(model, pairs, samples=4, scale=3.0, seed=7)
    assert torch.equal(again.noise([0, 1, 4], wte), n)


def _rows(model, samples=3, seed=0):
    pairs = Dataset(NOISY).tokenize(model.tokenizer)
    rows = corruption.rows(model, pairs, samples=samples, seed=seed)
    idx = list(range(len(rows.pairs)))
    return pairs, rows, stack(rows.pairs), rows.noise(idx, model.hf.get_input_embeddings().weight)


@pytest.mark.parametrize("family, direction", [("llama", "noising"), ("gpt2", "denoising")])
@torch.no_grad()
def test_patch_with_noise_equals_naive(tiny, family, direction):
    model = tiny(family)
    comps = [
        Component("head", 0, 1),
        Component("resid_pre", 1, 0, 3),
        Component("mlp_out", 0, 0, 4),
        Component("resid_post", 1, 0, None),
    ]
    res = patch(model, NOISY, components=comps, direction=direction, samples=3)
    pairs, rows, b, noise = _rows(model)
    ids = b["clean"]
    with embed_noise(model, noise):
        noisy_ref = {(c.site, c.layer): read(model, ids, c.site, c.layer) for c in comps}
        noisy_logits = model.hf(input_ids=ids).logits[:, -1]
    clean_ref = {(c.site, c.layer): read(model, ids, c.site, c.layer) for c in comps}
    clean_logits = model.hf(input_ids=ids).logits[:, -1]
    ld = metrics.logit_diff
    want = torch.empty(len(rows.pairs), len(comps))
    for j, c in enumerate(comps):
        if direction == "noising":
            logits = patched_logits(model, ids, c.site, c.layer, c.index, c.position, noisy_ref[(c.site, c.layer)])
        else:
            with embed_noise(model, noise):
                logits = patched_logits(model, ids, c.site, c.layer, c.index, c.position, clean_ref[(c.site, c.layer)])
        want[:, j] = ld(logits, b["answer"], b["wrong"])
    base = ld(clean_logits if direction == "noising" else noisy_logits, b["answer"], b["wrong"])
    effect = (want - base[:, None]).view(2, 3, -1).mean(1)  # mean over the samples of each pair
    assert_close(res.effect, effect, 1e-4)
    assert_close(res.corrupt, ld(noisy_logits, b["answer"], b["wrong"]).view(2, 3).mean(1))
    assert res.corruption["kind"] == "gaussian_noise" and res.corruption["samples"] == 3


@pytest.mark.parametrize("family, direction", [("llama", "noising"), ("gpt_neox", "denoising")])
def test_atp_with_noise_equals_autograd(tiny, family, direction):
    model = tiny(family)
    res = estimated(model, NOISY, sites=["head", "resid_pre"], method="atp", confirm=0, direction=direction, samples=3)
    _, rows, b, noise = _rows(model)
    ids = b["clean"]

    def metric(logits):
        return metrics.logit_diff(logits, b["answer"], b["wrong"])

    want = {}
    for site in ("head", "resid_pre"):
        est = []
        for layer in range(2):
            if direction == "noising":
                x, g = grad(model, ids, site, layer, metric)
                with embed_noise(model, noise), torch.no_grad():
                    other = read(model, ids, site, layer)
            else:
                with embed_noise(model, noise):
                    x, g = grad(model, ids, site, layer, metric)
                other = read(model, ids, site, layer)
            sc = ((other - x) * g).sum(-1)  # [R, T, C]
            est.append(sc.sum(1) if site == "head" else sc[..., 0])
        want[site] = torch.stack(est, 1).view(2, 3, 2, -1).mean(1)
    got = res.tensors()  # signed means over pairs
    for site in ("head", "resid_pre"):
        s = res.sweeps[0 if site == "head" else 1]
        assert_close(res.signed[:, s.start : s.stop], want[site].flatten(1), 1e-4)
        assert_close(got[f"atp_signed/{site}"], want[site].mean(0), 1e-4)


def test_window_layers_rome_convention():
    assert list(window_layers(0, 10, 24)) == list(range(0, 5))
    assert list(window_layers(12, 10, 24)) == list(range(7, 17))
    assert list(window_layers(23, 10, 24)) == list(range(18, 24))
    assert list(window_layers(2, 3, 4)) == [1, 2, 3] and list(window_layers(2, 1, 4)) == [2]


@torch.no_grad()
def test_trace_equals_naive_restoration():
    model = causalscan.load("random:llama-small")
    tr = trace(model, NOISY, window=3, metric="prob", samples=2, seed=3)
    pairs = Dataset(NOISY).tokenize(model.tokenizer)
    rows = corruption.rows(model, pairs, samples=2, seed=3)
    b = stack(rows.pairs)
    ids, ans = b["clean"], b["answer"]
    noise = rows.noise(list(range(len(rows.pairs))), model.hf.get_input_embeddings().weight)
    n_layers, seq = model.adapter.n_layers, ids.shape[1]
    clean = module_outputs(
        model, ids, [(s, la) for s in ("resid_post", "mlp_out", "attn_out") for la in range(n_layers)]
    )

    def p(restores=()):
        with embed_noise(model, noise):
            logits = restored_logits(model, ids, restores, clean)
        return metrics.prob(logits, ans).view(2, 2).mean(1)

    corrupt = p()
    assert_close(tr.corrupt, corrupt)
    assert set(tr.effects) == {"state", "mlp", "mlp_single", "attn", "attn_single"}
    cells = [
        ("state", "resid_post", 1),
        ("mlp", "mlp_out", 3),
        ("mlp_single", "mlp_out", 1),
        ("attn", "attn_out", 3),
        ("attn_single", "attn_out", 1),
    ]
    for grid, site, w in cells:
        for t in (0, 3, seq - 1):
            for layer in (0, 2, 3):
                want = p([(site, la, t) for la in window_layers(layer, w, n_layers)]) - corrupt
                # the effect is a difference of probabilities: measured against p(clean), not itself
                assert_close(
                    tr.effects[grid][:, t, layer],
                    want,
                    1e-4,
                    scale=tr.clean.abs().max(),
                    msg=f"{grid} t={t} layer={layer}",
                )
    # restoring the last token's final state restores the clean run exactly
    assert_close(tr.effects["state"][:, -1, -1], tr.clean - tr.corrupt, 1e-4, scale=tr.clean.abs().max())


def test_trace_finds_the_facts_recall_sites():
    """The facts card's peaks, as first measured by the zoo's own (pre-engine) tracer with other noise
    draws: MLP at the relation's last token, layer 2 (97.7%); attention there, layer 0 (91.3%); the
    best subject-token state, subject last, layer 0, recovers only 21.3%."""
    model = causalscan.load("facts")
    tr = trace(model, causalscan.zoo.dataset_path("facts", "subjects"), window=1, metric="prob", seed=1)
    norm = tr.tensors()
    last = len(tr.tokens) - 1
    for grid, layer, share in (("mlp", 2, 0.977), ("attn", 0, 0.913)):
        g = norm[f"trace_norm/{grid}"]
        assert divmod(int(g.argmax()), g.shape[1]) == (last, layer), grid
        assert abs(g[last, layer].item() - share) < 0.05, (grid, g[last, layer].item())
    subj = norm["trace_norm/state"][tr.span[0] : tr.span[1]]
    assert divmod(int(subj.argmax()), subj.shape[1]) == (1, 0)  # subject last, layer 0
    assert abs(subj.max().item() - 0.213) < 0.05
    assert tr.clean.mean() > 0.99 and tr.corrupt.mean() < 0.5


def test_cli_trace(tmp_path, capsys):
    out = tmp_path / "tr"
    assert main(["trace", "--kinds", "mlp,attn", "--window", "1", "--samples", "2", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "facts" and doc["dataset"]["path"].endswith("subjects.jsonl")
    assert set(doc["grids"]) == {"trace/mlp", "trace/attn"} and doc["span"] == [1, 3]
    assert doc["top"][0]["token"] == "in" and doc["settings"]["corruption"]["samples"] == 2
    assert (out / "trace.json").is_file() and (out / "scores.safetensors").is_file()


@pytest.mark.parametrize(
    "argv",
    [
        ["trace", "--kinds", "mlp,bogus"],
        ["trace", "--window", "0"],
        ["trace", "--model", "random:llama-tiny", "--data", "LENGTHS"],
    ],
)
def test_cli_trace_bad_input_exits_2(argv, tmp_path, capsys):
    data = tmp_path / "lengths.jsonl"
    data.write_text(json.dumps(NOISY[0]) + "\n" + json.dumps({**NOISY[0], "clean": "Mary and John went to"}) + "\n")
    assert main([str(data) if a == "LENGTHS" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert "error" in err and ("same token length" in err if "LENGTHS" in argv else True)
