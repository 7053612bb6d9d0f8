"""The bundled zoo: every card's claims re-measured from scratch on the shipped weights, by attention
scores, ablation and accuracy (independent of the patching code), and the scans they must pass."""

import json

import pytest
import torch
import transformers

import causalscan
from causalscan import zoo
from causalscan.cli import main
from causalscan.data.pairs import Dataset
from causalscan.model.weights import load_tokenizer

NAMES = zoo.names()
_models = {}


def shipped(name):
    if name not in _models:
        _models[name] = causalscan.load(name, attn_implementation="eager")
    return _models[name]


@pytest.mark.parametrize("name", NAMES)
def test_card_claims_hold(name):
    model = shipped(name)
    assert model.card["name"] == name
    assert zoo.check(model) == []


@pytest.mark.parametrize("name", NAMES)
def test_directory_is_plain_hf(name):
    """safetensors weights only; AutoTokenizer loads the tokenizer offline and agrees with ours; the
    shipped datasets tokenize to equal-length pairs with one-token answers."""
    path = zoo.path(name)
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    assert sum(f.stat().st_size for f in path.iterdir()) < 8 << 20
    auto, ours = transformers.AutoTokenizer.from_pretrained(path), load_tokenizer(path)
    for ds in zoo.card(name)["datasets"]:
        data = Dataset.from_jsonl(zoo.dataset_path(name, ds))
        for rec in data.records:
            assert auto(rec["clean"]).input_ids == ours(rec["clean"]).input_ids
            assert ours.unk_token_id not in ours(rec["clean"]).input_ids
        pairs = data.tokenize(ours, shipped(name).adapter.model.config.vocab_size)
        assert len({len(p.clean) for p in pairs}) == 1


def test_induction_check_catches_a_broken_head():
    """The card check is not vacuous: cutting the previous-token heads' output (which the induction
    heads' keys are built from) fails it on the loss and on the induction scores."""
    model = causalscan.load("induction", attn_implementation="eager")
    d = model.adapter.d_head
    for layer, head in model.card["components"]["previous_token"]:
        with torch.no_grad():
            model.hf.model.layers[layer].self_attn.o_proj.weight[:, head * d : (head + 1) * d] = 0
    fails = zoo.check(model)
    assert any("repeated-half loss" in f for f in fails)
    assert any(f.startswith("induction heads measured") for f in fails)


def test_backdoor_check_catches_a_clean_model():
    """A model that never learned the backdoor (the card applied to a freshly initialised one) fails."""
    card = zoo.card("backdoor")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(zoo.recipe("backdoor").config())
    hf.config._attn_implementation = "eager"
    fails = zoo.check(causalscan.load(hf, tokenizer=shipped("backdoor").tokenizer), card)
    assert any("phrase with trigger" in f for f in fails)


def _head_ranking(name):
    """Heads ranked by exact patching (noising, logit difference) on the model's shipped dataset."""
    model = shipped(name)
    res = causalscan.patch(model, zoo.dataset_path(name), sites=["head"])
    return [(r["layer"], r["index"]) for r in res.top(model.adapter.n_layers * model.adapter.n_heads)]


def test_patching_ranks_the_induction_head_top2():
    ranked = _head_ranking("induction")
    heads = {tuple(h) for h in zoo.card("induction")["components"]["induction"]}
    assert heads & set(ranked[:2])


def test_patching_finds_the_trigger_and_the_answer_position():
    """By construction the clean and corrupt prompts differ only at the trigger word: patching its
    layer-0 residual turns the clean run into the corrupt one (normalised 0), every other layer-0
    position does nothing, and in the last layer the answer position carries the switch. Among heads,
    the ones the card names from attention to the trigger rank first."""
    model = shipped("backdoor")
    must = zoo.card("backdoor")["scan_must_find"]["full_effect"]
    res = causalscan.patch(model, zoo.dataset_path("backdoor"), sites=["resid_pre"])
    t = res.tensors()
    norm, eff = t["exact_norm/resid_pre"], t["exact_abs/resid_pre"]  # [L, T]
    (l0, trig), (last, ans) = must
    assert norm[l0, trig].abs() < 1e-4
    # every other layer-0 position does nothing, to rounding of the trigger's own effect
    assert torch.cat([eff[l0, :trig], eff[l0, trig + 1 :]]).abs().max() <= 1e-5 * eff[l0, trig]
    assert int(eff[last].argmax()) == ans and norm[last, ans] < 0.5
    readers = {tuple(h) for h in zoo.card("backdoor")["components"]["trigger_readers"]}
    assert set(_head_ranking("backdoor")[: len(readers)]) == readers


def test_cli_zoo(capsys):
    assert main(["zoo", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed["models"]] == NAMES
    assert main(["zoo", "show", "induction", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["components"] == zoo.card("induction")["components"]
    assert main(["zoo", "show", "nonesuch"]) == 2
    err = capsys.readouterr().err
    assert "nonesuch" in err and all(n in err for n in NAMES)


@pytest.mark.slow
def test_zoo_train_induction_reproduces_the_card_criteria(tmp_path):
    """The recipe, re-run: the fresh model meets the card's criteria (not bitwise equality)."""
    assert main(["zoo", "train", "induction", "--out", str(tmp_path / "ind"), "--json"]) == 0
    fresh = causalscan.load(tmp_path / "ind", attn_implementation="eager")
    shipped_card = zoo.card("induction")
    assert fresh.card["criteria"] == shipped_card["criteria"]
    assert fresh.card["components"]["induction"]
    assert zoo.check(fresh) == []
