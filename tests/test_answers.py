"""Multi-token answers against independent references: one full forward of the prompt followed by
each continuation per (pair, continuation, component), plain autograd for AtP, and the identity
``logit[a] - logit[w] = log p(a) - log p(w)`` between one-token and teacher-forced scoring."""

import pytest
import torch
from tokenizers import pre_tokenizers

from causalscan.data import corruption, metrics, tasks
from causalscan.data.pairs import Dataset
from causalscan.data.sweeps import Component
from causalscan.errors import InputError
from causalscan.model.vocab import default_vocab, word_tokenizer
from causalscan.patching.patch import patch
from causalscan.patching.scan import scan

from conftest import IOI
from naive import grad, naive_continuation_effects, read, teacher_forced
from tolerance import assert_close

# answers of 3, 1 and 1 tokens, wrong continuations of 1, 2 and 1: rows of one prompt length pad to 3
MULTI = [
    {**IOI[0], "answer": "Mary and John", "wrong": "John"},
    {**IOI[1], "answer": "Alice", "wrong": "Bob and"},
    {**IOI[2], "answer": [8], "wrong": [9]},
]
COMPS = [
    Component("head", 0, 1),
    Component("resid_pre", 1, 0, 3),
    Component("neuron", 0, 5),
    Component("mlp_out", 1, 0, 14),
    Component("v", 0, 0, 2),
    Component("resid_post", 0, 0, None),
]


@pytest.mark.parametrize(
    "family, direction, metric",
    [
        ("llama", "noising", "logit_diff"),
        ("gpt2", "denoising", "logit_diff"),
        ("llama", "denoising", "logprob"),
        ("gpt_neox", "noising", "prob"),
        ("gpt2", "noising", "kl"),
    ],
)
def test_multi_token_patch_equals_naive(tiny, family, direction, metric):
    model = tiny(family)
    res = patch(model, MULTI, components=COMPS, direction=direction, metric=metric)
    want = naive_continuation_effects(model, MULTI, COMPS, direction, metric)
    assert_close(res.patched, want, 1e-4)


def test_multi_token_clean_and_corrupt_are_teacher_forced(tiny):
    model = tiny("llama")
    res = patch(model, MULTI, components=COMPS[:1])
    pairs = Dataset(MULTI).tokenize(model.tokenizer)
    for i, p in enumerate(pairs):
        for prompt, got in ((p.clean, res.clean[i]), (p.corrupt, res.corrupt[i])):

            def s(cont, prompt=prompt):
                return teacher_forced(
                    model.hf(input_ids=torch.tensor([prompt + cont[:-1]])).logits[0], len(prompt), cont
                )

            assert_close(got, s(p.answer) - s(p.wrong), 1e-5)


def test_one_token_pairs_score_the_same_in_both_modes(tiny):
    """logit[a] - logit[w] (one-token mode) equals log p(a) - log p(w) (teacher forcing): the one-token
    pairs of a multi-token dataset keep their values."""
    model = tiny("gpt2")
    one = patch(model, IOI, components=COMPS)
    mixed = patch(model, [*IOI, MULTI[0]], components=COMPS)
    assert_close(mixed.patched[:3], one.patched, 1e-5)
    assert_close(mixed.clean[:3], one.clean, 1e-5)


@pytest.mark.parametrize("family, direction", [("llama", "noising"), ("gpt2", "denoising")])
def test_multi_token_atp_equals_autograd(tiny, family, direction):
    model = tiny(family)
    res = scan(
        model,
        MULTI,
        sites=["resid_pre", "head", "head:pos"],
        method="atp",
        confirm=0,
        direction=direction,
        exact_budget=0,
    )
    pairs = Dataset(MULTI).tokenize(model.tokenizer)
    t = len(pairs[0].clean)
    for name, by_pos in (("resid_pre", True), ("head", False), ("head_pos", True)):
        sw = next(s for s in res.sweeps if s.name == name)
        got = res.signed[:, sw.start : sw.stop].reshape(len(pairs), *sw.shape)
        site = name.split("_")[0] if name != "resid_pre" else name
        for i, p in enumerate(pairs):
            base, other = (p.clean, p.corrupt) if direction == "noising" else (p.corrupt, p.clean)
            for layer in range(model.adapter.n_layers):
                ref = 0
                for cont, sign in ((p.answer, 1.0), (p.wrong, -1.0)):

                    def metric(logits, cont=cont, sign=sign):
                        return sign * teacher_forced(logits[0], 1, cont)[None]

                    x, g = grad(model, torch.tensor([base + cont[:-1]]), site, layer, metric, keep=len(cont))
                    delta = read(model, torch.tensor([other + cont[:-1]]), site, layer) - x
                    score = (delta * g).sum(-1)[0]  # [T', C]
                    ref = ref + (score[:t] if by_pos else score.sum(0))
                assert_close(got[i, layer].reshape(ref.shape), ref, 1e-4, msg=str((name, i, layer)))


def test_multi_token_scan_confirms_exactly(tiny):
    model = tiny("llama")
    res = scan(model, MULTI, sites=["head"], confirm=3, confirm_random=1, exact_budget=0)
    comps = [res.components[j] for j in res.confirmed.tolist()]
    want = naive_continuation_effects(model, MULTI, comps)
    assert_close(res.exact, want - res.clean[:, None], 1e-4)


def test_noise_samples_share_their_draw_across_continuations(tiny):
    model = tiny("llama")
    recs = [{"clean": IOI[0]["clean"], "noise_span": "Mary and John", "answer": "Mary and John", "wrong": "John"}]
    pairs = Dataset(recs).tokenize(model.tokenizer)
    rows = corruption.rows(model, pairs, samples=2, metric="logit_diff")
    assert rows.owner.tolist() == [0, 0, 0, 0] and rows.sign.tolist() == [1, -1, 1, -1]
    assert rows.targets.tolist()[1] == [*pairs[0].wrong, -1, -1]
    assert torch.equal(rows.draws[0], rows.draws[1]) and torch.equal(rows.draws[2], rows.draws[3])
    assert not torch.equal(rows.draws[0], rows.draws[2])
    assert len(corruption.rows(model, pairs, samples=2, metric="prob").pairs) == 2  # prob scores the answer only


def test_multi_token_bad_input(tiny, tmp_path):
    model = tiny("llama")
    p = tmp_path / "multi.jsonl"
    p.write_text('{"clean": "Mary went to", "corrupt": "John went to", "answer": "the store"}\n')
    with pytest.raises(InputError, match=r"multi.jsonl:1: field 'wrong'"):
        patch(model, str(p), components=COMPS[:1])
    with pytest.raises(InputError, match=r"multi.jsonl:1: field 'answer': a custom metric"):
        patch(model, str(p), components=COMPS[:1], metric=lambda lg, a, w, c: lg[:, 0])
    assert patch(model, str(p), components=COMPS[:1], metric="logprob").patched.shape == (1, 1)


def test_metric_continuation_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    targets = torch.tensor([[0, 1, -1]])
    s = torch.log(torch.tensor(0.5 * 0.8))
    assert_close(metrics.continuation("logprob", logits, targets, torch.tensor([1.0]), logits), s[None])
    assert_close(metrics.continuation("logit_diff", logits, targets, torch.tensor([-1.0]), logits), -s[None])
    assert_close(metrics.continuation("prob", logits, targets, torch.tensor([1.0]), logits), torch.tensor([0.4]))
    assert metrics.continuation("kl", logits, targets, torch.tensor([1.0]), logits).abs().item() < 1e-6


def digit_tokenizer(split_digits: bool):
    """The word-level tokenizer with the greater-than nouns, splitting numbers into digits (as
    Llama-3, SmolLM2 or Qwen do) or reading "1732" as one unknown word."""
    tok = word_tokenizer([*default_vocab(), *tasks.GT_NOUNS])
    if split_digits:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(True)]
        )
    return tok


def test_greater_than_dataset_scans_with_multi_token_years():
    tok = digit_tokenizer(split_digits=True)
    recs = tasks.greater_than(tok, n=8, seed=1)
    assert len(recs) == 8
    for r in recs:
        yy = int(r["clean"].split("the year 17")[1][:2])
        assert int(r["answer"]) > yy > int(r["wrong"]) and r["corrupt"].endswith("to the year 17")
        assert "the year 1701 " in r["corrupt"] and r["clean"].replace(f"17{yy:02d}", "1701") == r["corrupt"]
    pairs = Dataset(recs).tokenize(tok)
    assert {len(p.answer) for p in pairs} == {2} and all(p.roles["END"] == len(p.clean) - 1 for p in pairs)
    assert tok.decode([pairs[0].clean[pairs[0].roles["YY"]]]) == recs[0]["clean"].split(" to ")[0][-1]


def test_greater_than_needs_consistent_year_tokens():
    with pytest.raises(InputError, match="tokenise consistently"):
        tasks.greater_than(digit_tokenizer(split_digits=False), n=2)
