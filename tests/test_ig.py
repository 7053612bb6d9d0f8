"""AtP-IG (integrated gradients along the input path, and along each site's own activation path)
against independent references: one step is AtP; a plain autograd loop over explicitly interpolated
embeddings or activations (HF modules and hooks only); completeness (the attributions of every
position of layer 0's residual sum to the exact effect of swapping the whole input; on the
activation path, every site's attributions sum to the exact effect of patching that whole site),
the error shrinking as steps grow; and exactness where the metric is linear in the site."""

from contextlib import contextmanager
from functools import partial

import pytest
import torch
from test_attribution import ids_of, records, slot

from causalscan.errors import InputError
from causalscan.patching.patch import patch
from causalscan.patching.scan import scan as _scan

from naive import grad, read, run
from tolerance import assert_close

scan = partial(_scan, exact_budget=0)  # estimates only: these tests check the estimators

SITES = ["head", "neuron", "resid_pre", "attn_out", "mlp_out", "v", "head:pos"]


@contextmanager
def interpolated(model, base, other, alpha: float):
    """Every forward inside sees token embeddings ``e(base) + alpha (e(other) - e(base))``."""
    emb = model.hf.get_input_embeddings()
    with torch.no_grad():
        e_base, e_other = emb(base), emb(other)
    handle = emb.register_forward_hook(lambda m, a, out: e_base + alpha * (e_other - e_base))
    try:
        yield
    finally:
        handle.remove()


def _name(spec):
    site, _, mode = spec.partition(":")
    return site, site + {"": "", "pos": "_pos"}[mode], mode


@pytest.mark.parametrize("path", ["inputs", "activations"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_one_step_is_atp(tiny, family, path):
    model, recs = tiny(family), records()
    atp = scan(model, recs, sites=SITES, method="atp", confirm=0)
    ig = scan(model, recs, sites=SITES, method="atp-ig", ig_steps=1, ig_path=path, confirm=0)
    assert_close(ig.signed, atp.signed, 1e-5)
    assert_close(ig.clean, atp.clean) and assert_close(ig.corrupt, atp.corrupt)


@pytest.mark.parametrize("direction", ["noising", "denoising"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_ig_equals_an_autograd_loop_over_interpolated_embeddings(tiny, family, direction):
    model, recs, steps = tiny(family), records(), 4
    clean, corrupt, ans, wrong = ids_of(recs)
    base, other = (clean, corrupt) if direction == "noising" else (corrupt, clean)
    res = scan(model, recs, sites=SITES, method="atp-ig", ig_steps=steps, confirm=0, direction=direction)

    def metric(logits):
        return logits.gather(-1, ans[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]

    for spec in SITES:
        site, name, mode = _name(spec)
        s, got = slot(res, name)
        by_pos = mode == "pos" or site in ("resid_pre", "attn_out", "mlp_out")
        for layer in range(model.adapter.n_layers):
            g_sum = 0
            for k in range(steps):
                with interpolated(model, base, other, k / steps):
                    g_sum = g_sum + grad(model, base, site, layer, metric)[1]
            delta = read(model, other, site, layer) - read(model, base, site, layer)
            ref = (delta * g_sum / steps).sum(-1)  # [P, T, C]
            ref = ref if by_pos else ref.sum(1)
            assert_close(got[:, layer].reshape(ref.shape), ref, 1e-4, msg=str((spec, layer)))


@pytest.mark.parametrize("direction", ["noising", "denoising"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_activation_path_equals_an_autograd_loop_over_interpolated_activations(tiny, family, direction):
    model, recs, steps = tiny(family), records(), 3
    clean, corrupt, ans, wrong = ids_of(recs)
    base, other = (clean, corrupt) if direction == "noising" else (corrupt, clean)
    sites = ["head", "neuron", "resid_pre", "mlp_out", "k", "head:pos"]
    res = scan(
        model, recs, sites=sites, method="atp-ig", ig_steps=steps, ig_path="activations", confirm=0, direction=direction
    )

    def metric(logits):
        return logits.gather(-1, ans[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]

    for spec in sites:
        site, name, mode = _name(spec)
        s, got = slot(res, name)
        by_pos = mode == "pos" or site in ("resid_pre", "attn_out", "mlp_out")
        for layer in range(model.adapter.n_layers):
            a_base, a_other = read(model, base, site, layer), read(model, other, site, layer)
            delta = a_other - a_base
            g_sum = sum(
                grad(model, base, site, layer, metric, value=a_base + (k / steps) * delta)[1] for k in range(steps)
            )
            ref = (delta * g_sum / steps).sum(-1)  # [P, T, C]
            ref = ref if by_pos else ref.sum(1)
            assert_close(got[:, layer].reshape(ref.shape), ref, 1e-4, msg=str((spec, layer)))


def test_activation_path_completeness_tightens_with_steps(tiny):
    """Every node of one site and layer together: the attributions sum to the exact effect of patching
    the whole site from the other run (a plain hook forward), up to the Riemann error, O(1/N)."""
    model, recs = tiny("llama"), records()
    clean, corrupt, ans, wrong = ids_of(recs)
    sites = ["head", "neuron", "resid_pre", "attn_out"]

    def metric(logits):
        return logits.gather(-1, ans[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]

    exact = {}
    for site in sites:
        for layer in range(model.adapter.n_layers):
            source = read(model, corrupt, site, layer)

            def edit(view, pre, source=source):
                view[...] = source

            patched = run(model, clean, site, layer, edit)[:, -1]
            exact[(site, layer)] = metric(patched) - metric(model.hf(clean).logits[:, -1])
    errors = []
    for steps in (2, 8, 32):
        res = scan(model, recs, sites=sites, method="atp-ig", ig_steps=steps, ig_path="activations", confirm=0)
        err = 0.0
        for site in sites:
            s, got = slot(res, site)
            for layer in range(model.adapter.n_layers):
                total = got[:, layer].flatten(1).sum(1)  # [P]: every node of the site
                ref = exact[(site, layer)]
                err = max(err, (total - ref).abs().max().item() / ref.abs().max().item())
        errors.append(err)
    # the worst site and layer, relative to its effect: 3.1, 0.75, 0.20 here (a left Riemann sum on a
    # random model far from linear: the error falls about fourfold with four times the steps)
    assert all(b < a / 2.5 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.3, errors


def test_completeness_at_the_embeddings_tightens_with_steps(tiny):
    """Layer 0's residual (llama: the token embeddings) summed over positions: the IG attribution of
    the whole input equals ``metric(other) - metric(base)`` up to the Riemann error, O(1/N)."""
    model, recs = tiny("llama"), records()
    errors = []
    for steps in (1, 4, 16, 64):
        res = scan(model, recs, sites="resid_pre", method="atp-ig", ig_steps=steps, confirm=0)
        s, got = slot(res, "resid_pre")
        total = got[:, 0].sum(-1)  # [P]: every position of layer 0
        exact = res.corrupt - res.clean
        errors.append((total - exact).abs().max().item() / exact.abs().max().item())
    # a left Riemann sum: the error falls about fourfold with four times the steps (6.4, 0.82, 0.19,
    # 0.048 of the effect here)
    assert all(b < a / 2.5 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.1, errors


@pytest.mark.parametrize("path", ["inputs", "activations"])
def test_ig_is_exact_where_the_metric_is_linear_in_the_site(tiny, path):
    """Without the final norm, the logit difference is linear in the last block's MLP output, so the
    gradient there is the same at every point of any path: IG = AtP = exact patching."""
    model, recs = tiny("llama"), records()
    norm = model.hf.model.norm
    model.hf.model.norm = torch.nn.Identity()
    try:
        res = scan(model, recs, sites="mlp_out", method="atp-ig", ig_steps=3, ig_path=path, confirm=0)
        exact = patch(model, recs, sites="mlp_out")
        last = [i for i, c in enumerate(res.components) if c.layer == model.adapter.n_layers - 1]
        assert last and [exact.components[i] for i in last] == [res.components[i] for i in last]
        assert_close(res.signed[:, last], exact.effect[:, last], 1e-4)
    finally:
        model.hf.model.norm = norm


def test_ig_options_are_checked(tiny):
    with pytest.raises(InputError, match="field 'ig_steps'"):
        scan(tiny("llama"), records(), sites="head", method="atp-ig", ig_steps=0)
    with pytest.raises(InputError, match="field 'ig_steps'"):
        scan(tiny("llama"), records(), sites="head", method="atp", ig_steps=4)
    with pytest.raises(InputError, match="field 'graddrop'"):
        scan(tiny("llama"), records(), sites="head", method="atp-ig", graddrop=True)
    with pytest.raises(InputError, match="field 'ig_path'"):
        scan(tiny("llama"), records(), sites="head", method="atp-ig", ig_path="edges")
    with pytest.raises(InputError, match="field 'ig_path'"):
        scan(tiny("llama"), records(), sites="head", method="atp", ig_path="activations")


def test_ig_along_gaussian_noise_equals_the_autograd_loop(tiny):
    """Noise corruption: the path runs from the clean embeddings to the noised ones (same tokens)."""
    from causalscan.data.sweeps import build_sweeps
    from causalscan.patching import attribution

    model, steps = tiny("llama"), 3
    clean, _, ans, wrong = ids_of(records())
    noise = 0.5 * torch.randn(*clean.shape, model.adapter.d_model, generator=torch.Generator().manual_seed(1))
    sweeps, _ = build_sweeps(model, "head,resid_pre", [clean.shape[1]])

    def metric(logits, clean_logprobs=None):
        logits = logits[:, -1] if logits.dim() == 3 else logits
        return logits.gather(-1, ans[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]

    out = attribution.attribute(model.adapter, clean, clean, metric, sweeps, other_noise=noise, ig_steps=steps)
    emb = model.hf.get_input_embeddings()
    for sw in sweeps:
        for layer in range(model.adapter.n_layers):
            g_sum = 0
            for k in range(steps):
                h = emb.register_forward_hook(lambda m, a, o, k=k: o + (k / steps) * noise)
                try:
                    g_sum = g_sum + grad(model, clean, sw.site, layer, metric)[1]
                finally:
                    h.remove()
            h = emb.register_forward_hook(lambda m, a, o: o + noise)
            try:
                noised = read(model, clean, sw.site, layer)
            finally:
                h.remove()
            ref = ((noised - read(model, clean, sw.site, layer)) * g_sum / steps).sum(-1)
            ref = ref if sw.by_pos else ref.sum(1)
            assert_close(out["signed"][sw.name][:, layer].reshape(ref.shape), ref, 1e-4, msg=str((sw.name, layer)))


def test_cli_scan_with_atp_ig(tmp_path):
    import json

    from causalscan.cli import main

    assert (
        main(
            [
                "scan",
                "--method",
                "atp-ig",
                "--ig-steps",
                "2",
                "--sites",
                "head",
                "--confirm",
                "4",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "scan.json").read_text())
    assert doc["settings"]["method"] == "atp-ig" and doc["settings"]["ig_steps"] == 2
