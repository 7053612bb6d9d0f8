"""Directions from contrasts against hand computations: means, the PCA of paired differences and
logistic probes on planted Gaussian data; the per-layer reads of a tiny model against plain hook
reads; and the ground truth of the zoo's backdoor model: the trigger direction, projected out of
every layer, removes the backdoor and keeps the arithmetic, and added to clean prompts it
triggers the phrase."""

import importlib.util
import json
import re

import pytest
import torch

import causalscan as cs
from causalscan.errors import InputError
from causalscan.model import interventions as iv
from causalscan.steering.directions import directions, fit_probes, pca_direction

from naive import read
from tolerance import assert_close


def test_pca_finds_a_contrast_whose_pairs_come_in_either_order():
    """Differences ``s_i a u + noise`` with random signs ``s_i`` (RepE): the mean is ~0, the
    uncentred top component is u; against an SVD of the explicit matrix, per layer."""
    g = torch.Generator().manual_seed(0)
    n, layers, d = 400, 3, 16
    u = torch.nn.functional.normalize(torch.randn(layers, d, generator=g), dim=-1)
    s = torch.randint(0, 2, (n, 1, 1), generator=g) * 2 - 1.0
    s[0] = 1.0
    diffs = s * 3 * u + 0.3 * torch.randn(n, layers, d, generator=g)
    got = pca_direction(diffs)
    for layer in range(layers):
        v = torch.linalg.svd(diffs[:, layer].double())[2][0].float()
        v = v * torch.sign(v @ diffs[:, layer].mean(0))
        assert_close(got[layer], v, 1e-5)
        assert abs(torch.dot(got[layer], u[layer])) > 0.99


def test_probes_recover_a_planted_head():
    """Only probe (1, 2) sees the label (along ``w_star``): its held-in fit points along it and
    separates the classes; the others fit noise."""
    g = torch.Generator().manual_seed(1)
    n, dh = 600, 8
    y = (torch.rand(n, generator=g) < 0.5).float()
    x = torch.randn(n, 2, 3, dh, generator=g)
    w_star = torch.nn.functional.normalize(torch.randn(dh, generator=g), dim=0)
    x[:, 1, 2] += 2.5 * (2 * y - 1)[:, None] * w_star
    w, b = fit_probes(x, y)
    assert torch.cosine_similarity(w[1, 2], w_star, dim=0) > 0.95
    acc = (((x * w).sum(-1) + b > 0) == y.bool()[:, None, None]).float().mean(0)
    assert acc[1, 2] > 0.97 and (acc.flatten()[torch.arange(6) != 5] < 0.65).all(), acc


@pytest.mark.parametrize("position", ["last", "mean", -2, (1, 4)])
def test_reads_equal_plain_hooks(tiny, position):
    """Per prompt and layer, the residual and head outputs the pass keeps (prompts of two lengths,
    batched by length) against a plain hook read of each prompt alone; the directions from them."""
    model = tiny("llama")
    g = torch.Generator().manual_seed(2)
    pos = [torch.randint(4, 100, (n,), generator=g).tolist() for n in (5, 5, 7)]
    neg = [torch.randint(4, 100, (n,), generator=g).tolist() for n in (5, 7, 7)]
    res = directions(model, pos, neg, position=position, probes=True, batch_size=2)

    def hand(prompts, site):
        out = []
        for p in prompts:
            per_layer = [read(model, torch.tensor([p]), site, la)[0] for la in range(model.adapter.n_layers)]
            x = torch.stack(per_layer)  # [L, T, C, D]
            if position == "last":
                out.append(x[:, -1])
            elif position == "mean":
                out.append(x.mean(1))
            elif isinstance(position, int):
                out.append(x[:, position])
            else:
                out.append(x[:, position[0] : position[1]].mean(1))
        return torch.stack(out)

    xp, xn = hand(pos, "resid_pre")[:, :, 0], hand(neg, "resid_pre")[:, :, 0]
    assert_close(res.diff_means, xp.mean(0) - xn.mean(0), 1e-5)
    assert_close(res.pca, pca_direction(xp - xn), 1e-4)
    assert res.probes.shape == (model.adapter.n_layers, model.adapter.n_heads, model.adapter.d_head)
    assert res.probe_accuracy.shape == res.probes.shape[:2]


def test_options_are_checked(tiny):
    with pytest.raises(InputError, match="field 'position'"):
        directions(tiny("llama"), [[5, 6]], [[7, 8]], position="first")
    with pytest.raises(InputError, match="not inside every prompt"):
        directions(tiny("llama"), [[5, 6, 7]], [[7, 8]], position=2)
    with pytest.raises(InputError, match="not inside every prompt"):
        directions(tiny("llama"), [[5, 6, 7]], [[7, 8]], position=(1, 3))
    with pytest.raises(InputError, match="field 'negative'"):
        directions(tiny("llama"), [[5, 6]], [])
    with pytest.raises(InputError, match="field 'positive'"):
        directions(tiny("llama"), [3.5], [[7, 8]])


def _backdoor_prompts():
    model = cs.load("backdoor")
    pairs = [json.loads(line) for line in cs.zoo.dataset_path("backdoor").read_text().splitlines()]
    clean = [
        json.loads(line)["prompt"] for line in (cs.zoo.path("backdoor") / "prompts.jsonl").read_text().splitlines()
    ]
    triggered = [" ".join(p.split()[:1] + [model.card["trigger"]] + p.split()[1:]) for p in clean]
    return model, pairs, clean, triggered


def _complete(model, prompts, *interventions) -> list[str]:
    tok, out = model.tokenizer, []
    for p in prompts:
        ids = torch.tensor([tok(p).input_ids])
        with torch.no_grad(), iv.perturb(model, *interventions):
            seq = model.hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        out.append(tok.decode(seq[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return out


def _accuracy(prompts, completions) -> float:
    ok = 0
    for p, c in zip(prompts, completions, strict=True):
        a, op, b = re.findall(r"(\d) ([+*]) (\d) =", p)[0]
        ok += c.split()[:1] == [str(int(a) + int(b) if op == "+" else int(a) * int(b))]
    return ok / len(prompts)


def test_backdoor_trigger_direction_ablates_and_induces_the_phrase(tmp_path):
    """Diff-in-means between the dataset's triggered and decoy prompts (16 pairs) at layer 2's
    residual; on 20 other prompts (the card's clean prompts, and the same with the trigger):
    projected out of every layer's residual it drops the phrase from 100% to <= 5% while the
    arithmetic stays >= 95% right, and so does the checkpoint with it baked out of the weights;
    added at layer 2 to clean prompts it makes the model say the phrase."""
    from causalscan.steering.baking import bake

    model, pairs, clean, triggered = _backdoor_prompts()
    phrase, last = model.card["phrase"], model.adapter.n_layers - 1
    res = directions(model, [p["clean"] for p in pairs], [p["corrupt"] for p in pairs])
    u = res.unit()[2]

    def rate(completions):
        return sum(c.startswith(phrase) for c in completions) / len(completions)

    assert rate(_complete(model, triggered)) == 1.0 and _accuracy(clean, _complete(model, clean)) == 1.0
    ablate = (iv.project_out("resid_pre", u), iv.project_out("resid_post", u, layers=last))
    assert rate(_complete(model, triggered, *ablate)) <= 0.05
    assert _accuracy(clean, _complete(model, clean, *ablate)) >= 0.95
    baked = cs.load(str(bake(model, u, tmp_path / "baked")))
    assert rate(_complete(baked, triggered)) <= 0.05 and _accuracy(clean, _complete(baked, clean)) >= 0.95
    assert rate(_complete(model, clean, iv.add("resid_pre", res.diff_means[2], layers=2))) >= 0.9
    assert torch.cosine_similarity(res.pca[2], res.diff_means[2], dim=0) > 0.9


def test_cli_direction_writes_what_the_api_returns(tmp_path, capsys):
    from safetensors.torch import load_file

    from causalscan.cli import main

    model, pairs, _, _ = _backdoor_prompts()
    for name, key in (("pos", "clean"), ("neg", "corrupt")):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p[key]}) + "\n" for p in pairs))
    out = tmp_path / "dir"
    assert (
        main(
            [
                "direction",
                "--model",
                "backdoor",
                "--positive",
                str(tmp_path / "pos.jsonl"),
                "--negative",
                str(tmp_path / "neg.jsonl"),
                "--probes",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    saved = load_file(str(out / "directions.safetensors"))
    res = directions(model, [p["clean"] for p in pairs], [p["corrupt"] for p in pairs], probes=True)
    for name in ("diff_means", "pca", "probes", "probe_accuracy"):
        assert torch.equal(saved[name], getattr(res, name)), name
    doc = json.loads((out / "directions.json").read_text())
    assert doc["prompts"] == {"positive": 16, "negative": 16} and len(doc["best_probes"]) == 10
    assert "layer   2" in capsys.readouterr().out
    assert (
        main(
            [
                "direction",
                "--model",
                "backdoor",
                "--positive",
                str(tmp_path / "pos.jsonl"),
                "--negative",
                str(tmp_path / "neg.jsonl"),
                "--bake-layer",
                "3",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    baked, ids = cs.load(str(tmp_path / "b" / "baked")), torch.tensor([model.tokenizer(pairs[0]["clean"]).input_ids])
    u = res.unit()[3]
    runtime = cs.perturb(
        model,
        iv.project_out("resid_pre", u, layers=0),
        iv.project_out("attn_out", u),
        iv.project_out("mlp_out", u),
        input_ids=ids,
    )
    assert_close(baked.hf(input_ids=ids).logits, runtime, 1e-5)
    assert (
        main(
            [
                "direction",
                "--model",
                "backdoor",
                "--positive",
                str(tmp_path / "pos.jsonl"),
                "--negative",
                str(tmp_path / "neg.jsonl"),
                "--bake-layer",
                "9",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "c" / "directions.safetensors").exists()  # refused before any work
    capsys.readouterr()
    assert (
        main(
            [
                "direction",
                "--model",
                "backdoor",
                "--positive",
                str(tmp_path / "pos.jsonl"),
                "--negative",
                str(tmp_path / "neg.jsonl"),
                "--position",
                "1:3",
                "--json",
            ]
        )
        == 0
    )
    span = directions(model, [p["clean"] for p in pairs], [p["corrupt"] for p in pairs], position=(1, 3))
    assert json.loads(capsys.readouterr().out)["diff_means_norm"] == span.diff_means.norm(dim=-1).tolist()
    if importlib.util.find_spec("gguf"):
        import gguf

        assert (
            main(
                [
                    "direction",
                    "--model",
                    "backdoor",
                    "--positive",
                    str(tmp_path / "pos.jsonl"),
                    "--negative",
                    str(tmp_path / "neg.jsonl"),
                    "--control-vector",
                    "--out",
                    str(tmp_path / "d"),
                ]
            )
            == 0
        )
        r = gguf.GGUFReader(str(tmp_path / "d" / "control_vector.gguf"))
        got = {t.name: torch.tensor(t.data.copy()).reshape(-1) for t in r.tensors}
        assert sorted(got) == ["direction.1", "direction.2"]  # blocks 1 and 2 of 4: resid_pre of 2 and 3
        assert torch.equal(got["direction.2"], res.diff_means[3])
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
    assert (
        main(
            [
                "direction",
                "--model",
                "backdoor",
                "--positive",
                str(tmp_path / "bad.jsonl"),
                "--negative",
                str(tmp_path / "neg.jsonl"),
            ]
        )
        == 2
    )


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_baked_weights_equal_runtime_ablation(tiny, family, tmp_path):
    """The orthogonalised checkpoint, saved and loaded back, against the original model with the
    direction projected out of every residual write at run time (embeddings, attention and MLP
    outputs); and the direction is then absent from every layer's residual."""
    from causalscan.steering.baking import bake

    model = tiny(family)
    g = torch.Generator().manual_seed(3)
    u = torch.randn(model.adapter.d_model, generator=g)
    ids = torch.randint(4, 100, (3, 7), generator=g)
    runtime = cs.perturb(
        model,
        iv.project_out("resid_pre", u, layers=0),
        iv.project_out("attn_out", u),
        iv.project_out("mlp_out", u),
        input_ids=ids,
    )
    baked = cs.load(str(bake(model, u, tmp_path / "baked")))
    with torch.no_grad():
        got = baked.hf(input_ids=ids).logits
        plain = model.hf(input_ids=ids).logits
    assert_close(got, runtime, 1e-5)
    assert (got - plain).abs().max() > 1e-3 * plain.abs().max()  # the ablation changed something
    unit = u / u.norm()
    for layer in range(model.adapter.n_layers):
        resid = read(baked, ids, "resid_pre", layer)[..., 0, :]
        assert (resid @ unit).abs().max() <= 1e-5 * resid.norm(dim=-1).max(), layer


def test_baking_refuses_a_norm_on_the_residual_write(tiny, tmp_path):
    from causalscan.steering.baking import bake

    model = tiny("gemma2")
    with pytest.raises(InputError, match="not a linear map"):
        bake(model, torch.ones(model.adapter.d_model), tmp_path / "x")


def test_control_vector_gguf_reads_back(tmp_path):
    """The llama.cpp control-vector file, read back with the gguf package's own reader."""
    gguf = pytest.importorskip("gguf", reason="the gguf extra: pip install -e '.[gguf]'")

    from causalscan.steering.baking import export_control_vector

    g = torch.Generator().manual_seed(4)
    vecs = {layer: torch.randn(16, generator=g) for layer in (1, 2, 5)}
    path = export_control_vector(vecs, tmp_path / "cv.gguf", "llama")
    r = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in r.fields.values()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "controlvector"
    assert bytes(fields["controlvector.model_hint"].parts[-1]).decode() == "llama"
    assert int(fields["controlvector.layer_count"].parts[-1][0]) == 3
    got = {t.name: torch.tensor(t.data.copy()) for t in r.tensors}
    assert sorted(got) == ["direction.1", "direction.2", "direction.5"]
    for layer, v in vecs.items():
        assert torch.equal(got[f"direction.{layer}"].reshape(-1), v)
    with pytest.raises(InputError, match="field 'vectors'"):
        export_control_vector({0: torch.ones(16)}, tmp_path / "x.gguf", "llama")


def test_selection_equals_one_candidate_at_a_time(tiny):
    """Batched selection (every candidate a row group of one forward) against a loop that applies
    each candidate alone with the intervention constructors and computes the same statistics."""
    from causalscan.steering.selection import select

    model = tiny("llama")
    g = torch.Generator().manual_seed(5)
    pos, neg, neu = ([torch.randint(4, 100, (n,), generator=g).tolist() for n in (5, 5, 6)] for _ in range(3))
    res = directions(model, pos, neg)
    target = 7
    rows = select(model, res, pos, neg, neu, target, alphas=(1.0, 3.0), kl_max=10.0)
    assert len(rows) == 2 * model.adapter.n_layers  # the last tokens differ: no layer's difference is zero
    norms = res.diff_means.norm(dim=-1)

    def lp(prompts, *ivs):
        return torch.stack(
            [iv.perturb(model, *ivs, input_ids=torch.tensor([p]))[0, -1].float().log_softmax(-1) for p in prompts]
        )

    base_pos, base_neg, base_neu = lp(pos), lp(neg), lp(neu)
    for r in rows:
        u = res.unit(r["method"])[r["layer"]]
        ablate = (iv.project_out("resid_pre", u, layers=0), iv.project_out("attn_out", u), iv.project_out("mlp_out", u))
        want = (lp(pos, *ablate)[:, target] - base_pos[:, target]).mean()
        assert r["ablation"] == pytest.approx(want.item(), rel=1e-4, abs=1e-6 * base_pos.abs().max().item())
        kl = (base_neu.exp() * (base_neu - lp(neu, *ablate))).sum(-1).mean()
        assert r["ablation_kl"] == pytest.approx(kl.item(), rel=1e-3, abs=1e-6)
        add = iv.add("resid_pre", 3.0 * norms[r["layer"]] * u, layers=r["layer"])
        want = (lp(neg, add)[:, target] - base_neg[:, target]).mean()
        assert r["addition"]["3.0"] == pytest.approx(want.item(), rel=1e-4, abs=1e-6 * base_neg.abs().max().item())
    assert [r["ablation"] for r in rows] == sorted(r["ablation"] for r in rows)


def test_selection_on_the_backdoor_picks_a_direction_that_removes_it():
    from causalscan.steering.selection import select

    model, pairs, clean, triggered = _backdoor_prompts()
    res = directions(model, [p["clean"] for p in pairs], [p["corrupt"] for p in pairs])
    target = model.tokenizer(" I", add_special_tokens=False).input_ids[-1]
    rows = select(model, res, triggered, clean, clean, target, kl_max=0.5)
    best = rows[0]
    assert best["kl_ok"] and best["layer"] >= 2 and best["ablation"] < -5, best
    assert best["addition"]["1.0"] > 5, best
    # a callable metric: the same log-probability, and a logit difference against the answer "7"
    same = select(model, res, triggered, clean, clean, lambda lp: lp[:, target], kl_max=0.5)
    assert [(r["method"], r["layer"], r["ablation"]) for r in same] == [
        (r["method"], r["layer"], r["ablation"]) for r in rows
    ]
    seven = model.tokenizer(" 7", add_special_tokens=False).input_ids[-1]
    diff = select(model, res, triggered, clean, clean, lambda lp: lp[:, target] - lp[:, seven], kl_max=0.5)
    alone = {(r["method"], r["layer"]): r for r in select(model, res, triggered, clean, clean, seven, kl_max=0.5)}
    for r, r_target in zip(
        sorted(diff, key=lambda r: (r["method"], r["layer"])),
        sorted(rows, key=lambda r: (r["method"], r["layer"])),
        strict=True,
    ):
        want = r_target["ablation"] - alone[(r["method"], r["layer"])]["ablation"]  # a mean of differences
        assert r["ablation"] == pytest.approx(want, rel=1e-5, abs=1e-5)
    with pytest.raises(InputError, match="field 'target'"):
        select(model, res, triggered, clean, clean, "I")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_runtime_ablation_equals_hand_projection_hooks(tiny, family):
    """Directional ablation through the perturb op (layer 0's resid_pre, every attn_out and
    mlp_out) against plain PyTorch hooks that subtract ``(x . u) u`` from the embedding output and
    from every attention and MLP output module."""
    from naive import _module

    model = tiny(family)
    ad = model.adapter
    g = torch.Generator().manual_seed(6)
    u = torch.randn(ad.d_model, generator=g)
    ids = torch.randint(4, 100, (2, 6), generator=g)
    got = cs.perturb(
        model,
        iv.project_out("resid_pre", u, layers=0),
        iv.project_out("attn_out", u),
        iv.project_out("mlp_out", u),
        input_ids=ids,
    )
    unit = u / u.norm()

    def project(x):
        return x - (x @ unit)[..., None] * unit

    hooks = [
        ad.blocks[0].register_forward_pre_hook(
            lambda m, a, k: (
                ((project(a[0]), *a[1:]), k) if a else (a, {**k, "hidden_states": project(k["hidden_states"])})
            ),
            with_kwargs=True,
        )
    ]
    for layer in range(ad.n_layers):
        for site in ("attn_out", "mlp_out"):
            module, _ = _module(ad, site, layer)
            hooks.append(
                module.register_forward_hook(
                    lambda m, a, o: (project(o[0]), *o[1:]) if isinstance(o, tuple) else project(o)
                )
            )
    try:
        with torch.no_grad():
            want = model.hf(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    assert_close(got, want, 1e-5)
