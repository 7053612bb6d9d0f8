"""Feature sites: SAELens folders read as written by hand, the exact rewrite, patching and scanning
latents against a naive reference (encode both runs, swap one latent, decode plus the clean error,
run the rest of the model), transcoders, refusals, steering by a decoder row."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import causalscan as cs
from causalscan import zoo
from causalscan.cli import main
from causalscan.data import metrics
from causalscan.data.pairs import Dataset, stack
from causalscan.model import features as sites
from causalscan.model import runner, saelens

from conftest import FAMILIES
from naive import read as naive_read
from naive import run as naive_run
from tolerance import assert_close


def _hand_folder(path, d_in=64, d_sae=48, seed=0, hook="blocks.1.hook_resid_pre", **cfg_extra):
    """A standard ReLU SAE folder written field by field as SAELens v6 writes it."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    t = {
        "W_enc": w_dec.T.contiguous() * 1.5,
        "b_enc": -0.2 * torch.rand(d_sae, generator=g),
        "W_dec": w_dec,
        "b_dec": 0.05 * torch.randn(d_in, generator=g),
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "sae_weights.safetensors"))
    cfg = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": hook, "model_name": "induction", "sae_lens_version": "6.5.0"},
        **cfg_extra,
    }
    (path / "cfg.json").write_text(json.dumps(cfg))
    return t


def _encode(t, x):  # the standard SAE by its formula
    return torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])


def _decode(t, f):
    return f @ t["W_dec"] + t["b_dec"]


def _naive_feature_effects(model, records, t, layer, metric="logit_diff"):
    """[P, T, d_sae] effect of each latent patched from the corrupt run, noising; one plain forward
    (hooks written here) per latent and position that differs between the runs."""
    b = stack(Dataset(records).tokenize(model.tokenizer))
    _, fn = metrics.get(metric)
    clean_lp = torch.log_softmax(model.hf(input_ids=b["clean"]).logits[:, -1].float(), -1)
    x_c = naive_read(model, b["clean"], "resid_pre", layer)[:, :, 0]
    x_r = naive_read(model, b["corrupt"], "resid_pre", layer)[:, :, 0]
    f_c, f_r = _encode(t, x_c), _encode(t, x_r)
    err_c = x_c - _decode(t, f_c)
    base = fn(model.hf(input_ids=b["clean"]).logits[:, -1], b["answer"], b["wrong"], clean_lp)
    out = torch.zeros(f_c.shape)
    for pos, i in (f_c != f_r).any(0).nonzero().tolist():
        f = f_c.clone()
        f[:, pos, i] = f_r[:, pos, i]
        x = _decode(t, f) + err_c

        def edit(view, pre, x=x):
            view.copy_(x[:, :, None])

        logits = naive_run(model, b["clean"], "resid_pre", layer, edit)[:, -1]
        out[:, pos, i] = fn(logits, b["answer"], b["wrong"], clean_lp) - base
    return out


def test_hand_written_folder_patch_cli_equals_naive(tmp_path, capsys):
    """The issue's check: a standard SAE written by hand at blocks.1.hook_resid_pre of the induction
    model leaves the logits unchanged, and `patch --sae --sites feature` equals the naive reference."""
    folder = tmp_path / "sae"
    t = _hand_folder(folder)
    model = cs.load("induction", sae=str(folder))
    ids = torch.tensor([[1, 5, 9, 13, 2, 5, 9]])
    ref = model.hf(input_ids=ids).logits
    store = {}
    got = runner.forward(
        model.adapter,
        ids,
        [runner.capture(model.adapter, "feature", 1, store), ("feature", 1, lambda f: f.clone())],
        logits_to_keep=0,
    )
    assert torch.equal(got, ref)
    x = naive_read(model, ids, "resid_pre", 1)[:, :, 0]
    assert_close(store[("feature", 1)][..., 0], _encode(t, x))
    assert 0 < (store[("feature", 1)] > 0).float().mean() < 1  # some latents on, some off

    out = tmp_path / "out"
    argv = ["patch", "--model", "induction", "--sae", str(folder), "--sites", "feature", "--out", str(out)]
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["settings"]["sweeps"] == {"feature": [1, 19, 48]}
    got = load_file(str(out / "scores.safetensors"))["exact/feature"]
    records = Dataset.from_jsonl(zoo.dataset_path("induction")).records
    naive = _naive_feature_effects(model, records, t, 1).mean(0)[None]
    assert_close(got, naive)  # to 1e-5 of the largest effect
    assert naive.abs().max() > 0.05


def test_patch_skips_off_latents_and_counts_forwards(tmp_path):
    folder = tmp_path / "sae"
    _hand_folder(folder, d_sae=200)
    model = cs.load("induction", sae=str(folder))
    ds = zoo.dataset_path("induction")
    res = cs.patch(model, ds, sites=["feature"])
    from causalscan.data.sweeps import build_sweeps

    inp_comps = build_sweeps(model, ["feature"], [19])[1]
    rows = cs.patch(model, ds, components=inp_comps[:5]).timings  # a few latents: few forwards
    assert rows["forwards"] <= res.timings["forwards"]
    # an off latent (0 in both runs of every pair) has effect exactly 0
    eff = res.tensors()["exact/feature"]
    assert (eff == 0).any() and (eff != 0).any()


@pytest.mark.parametrize(
    "arch", ["standard", "jumprelu", "topk", "gated", "transcoder", "skip_transcoder", "jumprelu_transcoder"]
)
def test_forward_unchanged_every_architecture(arch):
    model = cs.load("random:llama-tiny")
    ids = torch.randint(0, model.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    ref = model.hf(input_ids=ids).logits
    sites.attach(model, sites.random_dictionary(model, "mlp_out", 1, 40, arch))
    taps = [("feature", 1, lambda f: f.clone()), ("feature_error", 1, lambda e: e.clone())]
    assert torch.equal(runner.forward(model.adapter, ids, taps, logits_to_keep=0), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_unchanged_every_family(family):
    model = cs.load(f"random:{family}-tiny")
    ids = torch.randint(0, model.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    ref = model.hf(input_ids=ids).logits
    sites.attach(
        model,
        [
            sites.random_dictionary(model, "resid_pre", 0, 24),
            sites.random_dictionary(model, "mlp_out", 1, 24, "transcoder"),
        ],
    )
    taps = [(s, layer, lambda x: x.clone()) for s in sites.FEATURE_SITES for layer in (0, 1)]
    assert torch.equal(runner.forward(model.adapter, ids, taps, logits_to_keep=0), ref)


def _hand(arch, d, x):
    """Each encoder by SAELens's formula, written out here."""
    pre = (x - d.b_dec * d.apply_b_dec_to_input) @ d.W_enc + d.b_enc
    if arch == "jumprelu":
        return torch.where(pre > d.threshold, pre.clamp(min=0), 0.0)
    if arch == "topk":
        kth = pre.sort(-1, descending=True).values[..., d.k - 1 : d.k]
        return torch.where(pre >= kth, pre.clamp(min=0), 0.0)
    if arch == "gated":
        pi = (x - d.b_dec) @ d.W_enc + d.b_gate
        return (pi > 0) * torch.relu((x - d.b_dec) @ (d.W_enc * d.r_mag.exp()) + d.b_mag)
    return pre.clamp(min=0)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "gated"])
def test_encoders_match_their_formulas_through_a_folder(tmp_path, arch):
    model = cs.load("random:llama-tiny")
    d = sites.random_dictionary(model, "resid_post", 0, 32, arch)
    back = saelens.read(saelens.write(d, tmp_path / arch))
    assert (back.architecture, back.site, back.layer, back.k) == (arch, "resid_post", 0, d.k)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3))
    f, norm = back.encode(x)
    assert_close(f, _hand(arch, d, x))
    assert_close(back.decode(f, norm), f @ d.W_dec + d.b_dec)


def test_transcoder_patch_equals_naive(tmp_path):
    """A transcoder reads the MLP input and its latents replace the MLP output: patching latent i
    equals mlp_out = decode(f') + clean error, written by hand."""
    model = cs.load("induction")
    d = sites.random_dictionary(model, None, 1, 16, "skip_transcoder")
    d.W_dec *= 4  # latents that move the answer
    d = saelens.read(saelens.write(d, tmp_path / "tc"))
    sites.attach(model, d)
    records = Dataset.from_jsonl(zoo.dataset_path("induction")).records[:3]
    comps = [cs.Component("feature", 1, i, None) for i in range(16)] + [cs.Component("feature_error", 1, 0, None)]
    res = cs.patch(model, records, components=comps)
    b = stack(Dataset(records).tokenize(model.tokenizer))
    _, fn = metrics.get("logit_diff")
    mlp = model.adapter.blocks[1].mlp
    seen = {}
    h = mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    y_c = naive_read(model, b["clean"], "mlp_out", 1)[:, :, 0]
    x_c = seen["in"]
    naive_read(model, b["corrupt"], "mlp_out", 1)
    x_r = seen["in"]
    h.remove()

    def enc(x):
        return torch.relu(x @ d.W_enc + d.b_enc)

    def dec(f, x):
        return f @ d.W_dec + d.b_dec + x @ d.W_skip.T

    f_c, f_r = enc(x_c), enc(x_r)
    err_c = y_c - dec(f_c, x_c)
    y_r = naive_read(model, b["corrupt"], "mlp_out", 1)[:, :, 0]
    err_r = y_r - dec(f_r, x_r)
    clean_lp = torch.log_softmax(model.hf(input_ids=b["clean"]).logits[:, -1].float(), -1)
    base = fn(model.hf(input_ids=b["clean"]).logits[:, -1], b["answer"], b["wrong"], clean_lp)
    naive = torch.zeros(len(records), 17)
    for j in range(17):
        f, e = f_c.clone(), err_c.clone()
        if j < 16:
            f[:, :, j] = f_r[:, :, j]
        else:
            e = err_r
        y = dec(f, x_c) + e

        def edit(view, pre, y=y):
            view.copy_(y[:, :, None])

        naive[:, j] = fn(naive_run(model, b["clean"], "mlp_out", 1, edit)[:, -1], b["answer"], b["wrong"], clean_lp)
    assert_close(res.effect, naive - base[:, None])
    assert (naive - base[:, None])[:, :16].abs().max() > 0.01


def test_attribution_on_features_is_the_gradient_times_the_difference():
    """AtP at a latent: (f_corrupt - f_clean) * dmetric/df by plain autograd through the decoder."""
    model = cs.load("induction")
    d = sites.random_dictionary(model, "resid_pre", 1, 32)
    sites.attach(model, d)
    records = Dataset.from_jsonl(zoo.dataset_path("induction")).records[:4]
    res = cs.scan(model, records, sites=["feature", "feature_error"], method="atp", confirm=0, confirm_random=0)
    b = stack(Dataset(records).tokenize(model.tokenizer))
    _, fn = metrics.get("logit_diff")
    x_c = naive_read(model, b["clean"], "resid_pre", 1)[:, :, 0]
    x_r = naive_read(model, b["corrupt"], "resid_pre", 1)[:, :, 0]
    (f_c, norm), (f_r, _) = d.encode(x_c), d.encode(x_r)
    err_c, err_r = x_c - d.decode(f_c, norm), x_r - d.decode(f_r, norm)
    f = f_c.clone().requires_grad_()
    e = err_c.clone().requires_grad_()

    def edit(view, pre):
        view.copy_((d.decode(f, norm) + e)[:, :, None])

    clean_lp = torch.log_softmax(model.hf(input_ids=b["clean"]).logits[:, -1].float(), -1).detach()
    with torch.enable_grad():
        m = fn(naive_run(model, b["clean"], "resid_pre", 1, edit)[:, -1], b["answer"], b["wrong"], clean_lp)
        gf, ge = torch.autograd.grad(m.sum(), [f, e])
    tens = res.tensors()
    assert_close(tens["atp_signed/feature"], ((f_r - f_c) * gf).mean(0)[None])
    assert_close(tens["atp_signed/feature_error"], ((err_r - err_c) * ge).sum(-1).mean(0)[None])


def test_scan_confirms_feature_sweeps_like_any_other(tmp_path):
    folder = tmp_path / "sae"
    _hand_folder(folder)
    model = cs.load("induction", sae=str(folder))
    ds = zoo.dataset_path("induction")
    res = cs.scan(model, ds, sites=["feature", "feature_error"], confirm=6, confirm_random=4)
    exact = cs.patch(model, ds, sites=["feature", "feature_error"])
    summ, ref = res.summary(), exact.summary()
    done = ~summ["exact"].isnan()
    assert done.sum() >= 6 + 6  # every error node (19 <= 10) is patched; the latents' confirmed 10
    assert_close(summ["exact"][done], ref["exact"][done])
    doc = res.to_json()
    assert doc["agreement"]["recall_at_k"] is not None
    notes = res.notes(doc)
    assert any(line.startswith("sweep feature:") for line in notes)
    assert any(line.startswith("sweep feature_error:") for line in notes)


def test_steer_by_a_latent(tmp_path, capsys):
    folder = tmp_path / "sae"
    t = _hand_folder(folder)
    argv = [
        "steer",
        "--model",
        "induction",
        "--sae",
        str(folder),
        "--feature",
        "3",
        "--alpha",
        "40",
        "--prompt",
        "Mary are time",
        "--json",
    ]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["site"], doc["layer"], doc["feature"]) == ("resid_pre", 1, 3)
    # the same generation by hand: W_dec[3] * 40 added to the block-1 input at every position
    model = cs.load("induction")
    with cs.interventions.perturb(model, cs.interventions.add("resid_pre", t["W_dec"][3], alpha=40.0, layers=1)):
        (want,) = cs.steering.generate(model, [model.tokenizer.encode("Mary are time")], None, 0)[0:1]
    assert doc["completion"] == want[0]
    assert doc["completion"] != doc["unsteered"]


def test_pre_v6_flat_config_and_npz(tmp_path):
    folder = tmp_path / "old"
    _hand_folder(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    flat = {k: v for k, v in cfg.items() if k not in ("metadata", "architecture")}
    flat |= {
        "hook_name": "blocks.0.hook_mlp_out",
        "hook_layer": 0,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 5},
    }
    (folder / "cfg.json").write_text(json.dumps(flat))
    d = saelens.read(folder)
    assert (d.architecture, d.site, d.layer, d.k) == ("topk", "mlp_out", 0, 5)
    import numpy as np

    npz = tmp_path / "params.npz"
    w = load_file(str(folder / "sae_weights.safetensors"))
    np.savez(npz, **{k: v.numpy() for k, v in w.items()}, threshold=np.full(48, 0.1, dtype=np.float32))
    conv = saelens.read(saelens.from_npz(npz, tmp_path / "conv", "blocks.1.hook_resid_post"))
    assert (conv.architecture, conv.site, conv.apply_b_dec_to_input) == ("jumprelu", "resid_post", False)
    assert torch.equal(conv.threshold, torch.full((48,), 0.1))


def test_bad_folders_name_file_and_field(tmp_path, capsys):
    def expect(folder, field):
        with pytest.raises(cs.InputError, match=field) as e:
            cs.load("induction", sae=str(folder))
        return str(e.value)

    f = tmp_path / "a"
    _hand_folder(f, hook="blocks.1.attn.hook_pattern")
    assert "cfg.json: field 'metadata.hook_name'" in expect(f, "hook_name")
    f = tmp_path / "b"
    _hand_folder(f, d_in=32)
    expect(f, "d_in")
    f = tmp_path / "c"
    t = _hand_folder(f)
    save_file({**t, "W_dec": t["W_dec"][:, :10].contiguous()}, str(f / "sae_weights.safetensors"))
    assert "sae_weights.safetensors: field 'W_dec'" in expect(f, "W_dec")
    f = tmp_path / "d"
    _hand_folder(f, architecture="matryoshka")
    expect(f, "architecture")
    f = tmp_path / "e"
    _hand_folder(f)
    (f / "sae_weights.safetensors").rename(f / "sae_weights.pt")
    assert "only safetensors" in expect(f, "sae_weights.pt")
    f = tmp_path / "g"
    _hand_folder(f, normalize_activations="expected_average_only_in")
    expect(f, "normalize_activations")
    with pytest.raises(cs.InputError, match="needs a dictionary"):
        cs.patch("induction", zoo.dataset_path("induction"), sites=["feature"])
    assert main(["patch", "--model", "induction", "--sae", str(tmp_path / "a"), "--sites", "feature"]) == 2
    assert "hook_name" in capsys.readouterr().err


def test_interventions_reach_latents():
    """Zeroing a latent through the intervention API is decoding without it, plus the error."""
    model = cs.load("induction")
    d = sites.random_dictionary(model, "resid_pre", 1, 32)
    sites.attach(model, d)
    ids = torch.tensor([[1, 5, 9, 13, 2, 5, 9]])
    x = naive_read(model, ids, "resid_pre", 1)[:, :, 0]
    f, norm = d.encode(x)
    on = int(f[0, -1].argmax())
    g = f.clone()
    g[:, :, on] = 0
    x2 = x + (d.decode(g, norm) - d.decode(f, norm))

    def edit(view, pre):
        view.copy_(x2[:, :, None])

    want = naive_run(model, ids, "resid_pre", 1, edit)
    got = cs.perturb(model, cs.interventions.zero("feature", layers=1, index=[on]), input_ids=ids)
    assert_close(got, want)
    assert not torch.allclose(want, model.hf(input_ids=ids).logits)
