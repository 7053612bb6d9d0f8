"""Model directories built by the test, each damaged one way: every one a clear error naming the
file, never a model with random weights, never an unpickled file, never remote code."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import causalscan as cs
from causalscan.cli import main
from causalscan.errors import InputError

from tolerance import assert_close


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A random llama-tiny saved as a Hugging Face directory (safetensors, config, tokenizer)."""
    model = cs.load("random:llama-tiny")
    path = tmp_path_factory.mktemp("good")
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path


def _copy(good, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(good, path)
    return path


def _config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


def _weights(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_the_good_directory_loads_the_same_model(good):
    ids = torch.tensor([[1, 5, 9, 13]])
    assert_close(cs.load(good).hf(input_ids=ids).logits, cs.load("random:llama-tiny").hf(input_ids=ids).logits)


def _nan(t):
    name = next(k for k in t if k.endswith("mlp.up_proj.weight"))
    t[name][0, 0] = float("nan")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _config(p, num_hidden_layers=3), "missing keys"),  # more layers than weights
        (lambda p: _weights(p, lambda t: t.__setitem__("model.extra.weight", torch.zeros(2))), "unexpected keys"),
        (lambda p: _weights(p, _nan), "NaN or infinite"),
        (lambda p: _config(p, hidden_size=32), "cannot load this model"),  # shapes do not fit
        (lambda p: _config(p, model_type="t5"), "cannot load this model"),  # not a causal LM
        (lambda p: _config(p, auto_map={"AutoModelForCausalLM": "modeling_x.X"}), "trust_remote_code"),
        (lambda p: (p / "config.json").write_text("{"), "invalid config.json"),
        (lambda p: (p / "config.json").write_text("[]"), "model_type"),
        (
            lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:1000]),
            "cannot load this model",
        ),  # truncated
        (
            lambda p: (p / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!"),
            "cannot load this model",
        ),
    ],
)
def test_a_damaged_directory_is_a_clear_error(good, tmp_path, damage, message):
    path = _copy(good, tmp_path)
    damage(path)
    with pytest.raises(InputError, match=message) as e:
        cs.load(path)
    assert str(path) in str(e.value)


def test_pickled_weights_are_never_unpickled(good, tmp_path, capsys):
    path = _copy(good, tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"a pickle would run code when loaded")
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"clean": "a b", "corrupt": "a c", "answer": "d", "wrong": "e"}) + "\n")
    assert main(["patch", "--model", str(path), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "never unpickles" in err and "pytorch_model.bin" in err and "safetensors" in err
