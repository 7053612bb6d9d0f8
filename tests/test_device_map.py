"""Models split across devices (``device_map``): accelerate's hooks on every module, the runner's
skipped blocks, KV prefix and taps through them. On the CPU both halves of a split sit on the
CPU, with the hooks installed all the same: results equal the unsplit model's bit for bit, and a
patched run leaves the hooks in place. On a GPU (``gpu`` mark): ``cuda:0`` and ``cpu``."""

import json
import subprocess
import sys

import pytest
import torch

import causalscan as cs
from causalscan.errors import InputError

from tolerance import assert_close, assert_identical

INDUCTION = cs.zoo.dataset_path("induction", "previous")
HALVES = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def split_map(second: str) -> dict:
    """The induction model's layer 1, final norm and unembedding on ``second``."""
    return {**HALVES, "model.layers.1": second, "model.norm": second, "lm_head": second}


def test_a_split_model_scans_and_patches_as_the_whole_one(tmp_path):
    whole = cs.load("induction")
    path = tmp_path / "map.json"
    path.write_text(json.dumps(split_map("cpu")))
    parts = cs.load("induction", device_map=path)
    blocks = parts.adapter.blocks
    assert all(hasattr(b, "_hf_hook") for b in blocks)  # accelerate's device hooks, on every block
    hooked = [b.__dict__["forward"] for b in blocks]
    ids = torch.tensor([[1, 5, 9, 2, 5]])
    assert torch.equal(parts.hf(input_ids=ids).logits, whole.hf(input_ids=ids).logits)
    kw = dict(sites=["head", "neuron", "resid_pre", "q"], confirm=6, exact_budget=0, batch_size=4, fn_subsets=4)
    here, there = cs.scan(whole, INDUCTION, **kw), cs.scan(parts, INDUCTION, **kw)
    assert_identical(here.tensors(), there.tensors())
    # exact patching skips the blocks before a group's start layer and reuses a KV prefix
    assert_identical(
        cs.patch(whole, INDUCTION, sites=["head:pos", "mlp_out"]).tensors(),
        cs.patch(parts, INDUCTION, sites=["head:pos", "mlp_out"]).tensors(),
    )
    assert [b.__dict__.get("forward") for b in blocks] == hooked  # every skipped block got its hook back


def test_a_split_model_traces_as_the_whole_one():
    facts = cs.load("facts")
    halves = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
        **{f"model.layers.{i}": "cpu" for i in range(facts.adapter.n_layers)},
    }
    parts = cs.load("facts", device_map=halves)
    with open(cs.zoo.dataset_path("facts", "subjects")) as f:
        data = [json.loads(line) for line in f][:4]  # Gaussian noise on the subject
    kw = dict(window=2, samples=2)
    assert_identical(cs.trace(facts, data, **kw).tensors(), cs.trace(parts, data, **kw).tensors())


def test_auto_on_a_machine_without_gpus_keeps_everything_on_the_cpu():
    model = cs.load("random:llama-tiny", device_map="auto")
    assert {p.device.type for p in model.hf.parameters()} == {"cpu"}
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(model.hf(input_ids=ids).logits, cs.load("random:llama-tiny").hf(input_ids=ids).logits)


def test_bad_device_maps_are_refused_by_file_and_field(tmp_path):
    def refused(content, needle):
        path = tmp_path / "map.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(InputError, match=needle) as e:
            cs.load("induction", device_map=path)
        assert e.value.file == str(path) and e.value.field == "device_map"

    refused("{not json", "invalid JSON")
    refused({**HALVES, "model.layers.7": "cpu"}, r"device_map\['model.layers.7'\]: the model has no module")
    refused(split_map("disk"), "keeps every weight in memory")
    refused({k: v for k, v in HALVES.items() if k != "lm_head"}, "lm_head")  # a weight the map misses
    refused(["cpu"], "JSON object")
    with (
        pytest.raises(InputError, match="no CUDA device")
        if not torch.cuda.is_available()
        else pytest.raises(InputError, match="CUDA device")
    ):
        cs.load("induction", device_map=split_map("cuda:99"))
    with pytest.raises(InputError, match="device or device_map"):
        cs.load("induction", device="cpu", device_map="auto")


def test_cli_device_map(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(split_map("cpu")))
    run = [sys.executable, "-m", "causalscan", "patch", "--model", "induction", "--sites", "head", "--json"]
    ok = subprocess.run(run + ["--device-map", str(path)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    plain = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert json.loads(ok.stdout)["components"] == json.loads(plain.stdout)["components"]
    path.write_text(json.dumps({**HALVES, "model.layers.7": "cpu"}))
    bad = subprocess.run(run + ["--device-map", str(path)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and str(path) in bad.stderr and "model.layers.7" in bad.stderr
    both = subprocess.run(run + ["--device-map", "auto", "--ray"], capture_output=True, text=True, timeout=300)
    assert both.returncode == 2 and "--device-map" in both.stderr


@pytest.mark.gpu
def test_a_model_split_across_cuda_and_cpu_gives_the_single_device_results():
    """Layer 0 and the embeddings on cuda:0, layer 1 and the unembedding on the CPU."""
    whole = cs.load("induction", device="cuda")
    parts = cs.load(
        "induction",
        device_map={
            **split_map("cpu"),
            "model.embed_tokens": "cuda:0",
            "model.layers.0": "cuda:0",
            "model.rotary_emb": "cuda:0",
        },
    )
    assert parts.device.type == "cuda" and parts.hf.lm_head.weight.device.type == "cpu"
    ids = torch.tensor([[1, 5, 9, 2, 5]], device="cuda")
    assert_close(parts.hf(input_ids=ids).logits, whole.hf(input_ids=ids).logits, 1e-3)  # TF32 on the GPU half
    kw = dict(sites=["head", "neuron", "resid_pre"], confirm=6, exact_budget=0, batch_size=4)
    a, b = cs.scan(whole, INDUCTION, **kw).tensors(), cs.scan(parts, INDUCTION, **kw).tensors()
    for k in a:
        if a[k].is_floating_point():
            assert_close(b[k], a[k], 1e-3, msg=k)
