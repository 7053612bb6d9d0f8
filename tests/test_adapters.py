import dataclasses

import pytest
import torch
import transformers

import causalscan
from causalscan.errors import InputError
from causalscan.model import runner
from causalscan.model.adapters import SITES, Adapter
from causalscan.model.load import check_adapter

from conftest import FAMILIES
from tolerance import assert_close


def _all_taps(ad, store):
    sites = [s for s in SITES if not (s == "resid_mid" and ad.parallel)]
    taps = [runner.capture(ad, s, layer, store) for layer in range(ad.n_layers) for s in sites]
    return taps + [(s, layer, lambda x: x * 1.0) for layer in range(ad.n_layers) for s in sites]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_tapped_run_equals_hf_logits(tiny, family):
    model = tiny(family)
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model.hf(input_ids=ids, output_hidden_states=True)
    store = {}
    got = runner.forward(model.adapter, ids, _all_taps(model.adapter, store), logits_to_keep=0)
    assert_close(got, out.logits)
    # resid_pre read by the adapter is HF's own hidden state entering each block
    for layer in range(model.adapter.n_layers):
        assert_close(store[("resid_pre", layer)][:, :, 0], out.hidden_states[layer])
    c, d = model.adapter.shape("head")
    assert store[("head", 0)].shape == (2, 9, c, d)
    assert store[("neuron", 0)].shape == (2, 9, model.adapter.d_mlp, 1)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
@torch.no_grad()
def test_any_attn_implementation(family):
    ids = torch.randint(4, 300, (1, 6), generator=torch.Generator().manual_seed(2))
    eager = causalscan.load(f"random:{family}-tiny", attn_implementation="eager")
    sdpa = causalscan.load(f"random:{family}-tiny", attn_implementation="sdpa")
    a, b = {}, {}
    runner.forward(eager.adapter, ids, _all_taps(eager.adapter, a))
    runner.forward(sdpa.adapter, ids, _all_taps(sdpa.adapter, b))
    assert_close(a[("head", 1)], b[("head", 1)])


@torch.no_grad()
def test_adapter_shapes_gqa_and_head_dim(tiny):
    assert tiny("llama").adapter.shape("k") == (2, 16)  # 4 heads, 2 kv heads
    assert tiny("gemma").adapter.shape("head") == (4, 32)  # explicit head_dim != d_model / heads
    assert tiny("phi3").adapter.shape("v") == (2, 16)  # fused qkv with GQA
    assert tiny("gpt_neox").adapter.parallel and tiny("phi").adapter.parallel
    assert not tiny("llama").adapter.parallel


def test_check_catches_a_wrong_map(tiny):
    model = tiny("llama")
    bad = Adapter(model.hf)
    bad.family = dataclasses.replace(bad.family, attn_out="mlp.down_proj")
    with pytest.raises(RuntimeError, match="adapter check failed"):
        check_adapter(causalscan.Model(model.hf, bad, None, "bad"))


def test_unsupported_architecture_names_the_supported():
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    with pytest.raises(InputError, match="supported model types: .*gpt2.*llama"):
        causalscan.load(transformers.BertModel(cfg))


def test_unknown_spec_and_family():
    with pytest.raises(InputError, match="random families"):
        causalscan.load("no-such-model")
    with pytest.raises(InputError, match="unknown random family"):
        causalscan.load("random:mamba-tiny")
    with pytest.raises(InputError, match="unknown random size"):
        causalscan.load("random:llama-huge")


def test_local_directory_roundtrip_safetensors(tiny, tmp_path):
    model = tiny("qwen2")
    model.hf.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    again = causalscan.load(str(tmp_path))
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        assert_close(again.hf(input_ids=ids).logits, model.hf(input_ids=ids).logits)
    assert again.tokenizer("Mary")["input_ids"] == model.tokenizer("Mary")["input_ids"]


def test_runner_start_and_stop_equal_full_run(tiny):
    model = tiny("gemma2")
    ad = model.adapter
    ids = torch.randint(4, 300, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model.hf(input_ids=ids, output_hidden_states=True)
        logits, acts, kv = runner.run_with_cache(ad, ids, [("resid_pre", 1)])
        # stop: the residual entering block 1 is HF's hidden state 1
        assert_close(runner.forward(ad, ids, stop=1), full.hidden_states[1])
        # start at block 1 from the cached residual, positions 5.. with the cached prefix
        rows = torch.arange(2)
        tail = runner.forward(
            ad,
            ids[:, 5:],
            start_layer=1,
            resid=acts[("resid_pre", 1)][:, 5:, 0],
            past=kv.cache(rows, 5, 1, model.hf.config),
            logits_to_keep=0,
        )
    assert_close(tail, full.logits[:, 5:])
