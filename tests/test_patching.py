import pytest
import torch

import causalscan
from causalscan.data.sweeps import Component
from causalscan.errors import InputError
from causalscan.patching.patch import patch

from conftest import IOI
from naive import naive_effects
from tolerance import assert_close

ALL_SITES = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head", "head:pos", "q", "k:pos", "v"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "gpt_neox", "phi3", "opt"])
@torch.no_grad()
def test_batched_equals_naive_every_site(tiny, family):
    model = tiny(family)
    sites = [s for s in ALL_SITES if not (s == "resid_mid" and model.adapter.parallel)]
    res = patch(model, IOI[:2], sites=sites)
    ref = naive_effects(model, IOI[:2], res.components)
    assert_close(res.patched, ref)


@torch.no_grad()
def test_neuron_subset_denoising_small_budget_matches_naive(tiny):
    model = tiny("llama")
    comps = [
        Component("neuron", 0, 3),
        Component("neuron", 1, 100, 5),
        Component("neuron", 1, 7),
        Component("head", 1, 2, 14),
        Component("resid_pre", 1, 0, 0),
    ]
    # a budget of a few rows forces many chunks per group
    res = patch(model, IOI, components=comps, direction="denoising", metric="logprob", memory_budget=200_000)
    ref = naive_effects(model, IOI, comps, direction="denoising", metric="logprob")
    assert_close(res.patched, ref)
    assert res.timings["forwards"] > 2 + 4  # the budget really split the work
    assert res.tensors()["exact/components"].shape == (5,)


@pytest.mark.parametrize("family", ["gpt2", "gemma3", "qwen3", "phi"])
@torch.no_grad()
def test_clean_into_clean_changes_nothing(tiny, family):
    model = tiny(family)
    same = [dict(r, corrupt=r["clean"]) for r in IOI[:2]]
    res = patch(model, same, sites=["head", "resid_pre", "neuron"])
    assert_close(res.patched, res.base[:, None].expand_as(res.patched))


@torch.no_grad()
def test_patching_the_whole_input_gives_the_other_run(tiny):
    """resid_pre at layer 0, all positions, replaces the prompt: noising lands on corrupt."""
    model = tiny("llama")
    res = patch(model, IOI, components=[Component("resid_pre", 0, 0, None)])
    assert_close(res.patched[:, 0], res.corrupt)
    assert abs(res.tensors()["exact_norm/components"][0].item()) < 1e-4
    den = patch(model, IOI, components=[Component("resid_pre", 0, 0, None)], direction="denoising")
    assert_close(den.patched[:, 0], den.clean)


def test_result_tensors_and_save(tiny, tmp_path):
    from safetensors.torch import load_file

    model = tiny("gpt2")
    res = patch(model, IOI, sites=["head", "resid_pre", "mlp_out:all"])
    res.save(tmp_path)
    t = load_file(str(tmp_path / "scores.safetensors"))
    assert t["exact/head"].shape == (2, 4)
    assert t["exact/resid_pre"].shape == (2, 15)
    assert t["exact/mlp_out_all"].shape == (2,)
    eff = res.effect
    torch.testing.assert_close(t["exact_abs/head"].flatten(), eff[:, :8].abs().mean(0))
    import json

    doc = json.loads((tmp_path / "scan.json").read_text())
    assert doc["components"][0]["exact_abs"] == max(c["exact_abs"] for c in doc["components"])
    assert doc["dataset"]["pairs"] == 3 and doc["settings"]["direction"] == "noising"


def test_by_position_needs_equal_lengths(tiny):
    recs = [IOI[0], {"clean": "Mary went to", "corrupt": "John went to", "answer": "the", "wrong": "a"}]
    with pytest.raises(InputError, match="same token length"):
        patch(tiny("llama"), recs, sites="resid_pre")
    res = patch(tiny("llama"), recs, sites="head")  # all-position sweeps take mixed lengths
    ref = naive_effects(tiny("llama"), recs[:1], res.components)
    assert_close(res.patched[:1], ref)


def test_bad_sweep_and_direction(tiny):
    with pytest.raises(InputError, match="unknown site"):
        patch(tiny("llama"), IOI, sites="heads")
    with pytest.raises(InputError, match="direction"):
        patch(tiny("llama"), IOI, direction="sideways")
    with pytest.raises(InputError, match="resid_mid"):
        patch(tiny("gpt_neox"), IOI, sites="resid_mid")
    for sites in (",", [], ["head", ""]):
        with pytest.raises(InputError, match="field 'sites'"):
            patch(tiny("llama"), IOI, sites=sites)


def test_sites_string_splits_on_commas_as_the_cli_does(tiny):
    one = patch(tiny("llama"), IOI, sites="head, mlp_out:all")
    two = patch(tiny("llama"), IOI, sites=["head", "mlp_out:all"])
    assert [s.name for s in one.sweeps] == [s.name for s in two.sweeps] == ["head", "mlp_out_all"]
    assert torch.equal(one.patched, two.patched)


def test_load_accepts_hf_module(tiny):
    model = tiny("gpt2")
    again = causalscan.load(model.hf, tokenizer=model.tokenizer)
    assert again.adapter.n_layers == 2
