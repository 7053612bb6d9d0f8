import json

import pytest
import torch

from causalscan.data import metrics
from causalscan.data.pairs import Dataset
from causalscan.errors import InputError

from conftest import IOI


def _write(tmp_path, lines):
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


@pytest.mark.parametrize(
    "bad, line, field",
    [
        ("{not json", 2, None),
        ({"corrupt": "Mary went to", "answer": "the"}, 2, "clean"),
        ({"clean": "Mary went to", "corrupt": "Mary went to the", "answer": "the"}, 2, "corrupt"),
        ({"clean": "Mary went to", "corrupt": "John went to", "answer": " "}, 2, "answer"),  # tokenises to nothing
        ({"clean": "Mary went to", "corrupt": "John went to", "answer": ""}, 2, "answer"),
        ({"clean": "Mary went to", "corrupt": "John went to", "answer": "the", "wrong": [3, "x"]}, 2, "wrong"),
        ({"clean": "Mary went to", "corrupt": "John went to", "answer": [3, 99999]}, 2, "answer"),
        ({"clean": "Mary went to", "corrupt": "John went to"}, 2, "answer"),
        ({"clean_ids": [1, 2], "corrupt_ids": "x", "answer": 3}, 2, "corrupt_ids"),
        ('{"clean": "Mary \\ud800 went", "corrupt": "John went to", "answer": "the"}', 2, "clean"),  # lone surrogate
        ({"clean_ids": [1, True], "corrupt_ids": [1, 2], "answer": 3}, 2, "clean_ids"),  # true is not token 1
        ({"clean": "Mary went to", "clean_ids": None, "corrupt": "John went to", "answer": "the"}, 2, "clean_ids"),
        ({"clean": "Mary went to", "noise_span": [True, 2], "answer": "the"}, 2, "noise_span"),  # found by hypothesis
        ({"clean": "Mary went to", "corrupt": "John went to", "answer": "the", "positions": {"X": 1}}, 2, "positions"),
        ({"clean": "Mary went to", "corrupt": "John went to", "answer": True}, 2, "answer"),
        ({"clean": "Mary went to", "corrupt": "John went to", "answer": "the", "wrong": "the"}, 2, "wrong"),
        ({"clean_ids": [1, 2], "corrupt_ids": [1, 99999], "answer": 3}, 2, "corrupt"),
        ({"clean": "Mary went to", "noise_span": "Mary", "answer": "the"}, 2, "noise_span"),
        ({"clean": "Mary went to", "corrupt": "John went to", "answer": "the", "chat": "yes"}, 2, "chat"),
        ({"clean": "Mary went to", "corrupt": "John went to", "answer": "the", "chat": True}, 2, "chat"),  # no template
    ],
)
def test_bad_records_name_file_line_field(tiny, tmp_path, bad, line, field):
    p = _write(tmp_path, [IOI[0], bad])
    with pytest.raises(InputError) as e:
        Dataset.from_jsonl(p).tokenize(tiny("llama").tokenizer, vocab_size=512)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}:")
    if field:
        assert f"field {field!r}" in msg


def test_ids_replace_strings_and_blank_lines(tiny, tmp_path):
    p = _write(tmp_path, [{"clean_ids": [1, 5, 6], "corrupt_ids": [1, 7, 6], "answer": 9, "wrong": 10}, "", IOI[1]])
    pairs = Dataset.from_jsonl(p).tokenize(tiny("llama").tokenizer)
    assert pairs[0].clean == (1, 5, 6) and pairs[0].answer == (9,)
    assert pairs[1].line == 3
    assert len(pairs[1].clean) == len(pairs[1].corrupt) == 15


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        Dataset.from_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no pairs"):
        Dataset.from_jsonl(tmp_path / "empty.jsonl")


def test_metrics_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    ans, wrong = torch.tensor([1, 2]), torch.tensor([0, 1])
    torch.testing.assert_close(metrics.logit_diff(logits, ans, wrong), torch.tensor([1.0, 4.0]))
    z = torch.log(torch.exp(logits).sum(-1))
    torch.testing.assert_close(metrics.logprob(logits, ans), torch.tensor([2.0, 3.0]) - z)
    torch.testing.assert_close(metrics.prob(logits, ans), torch.exp(torch.tensor([2.0, 3.0]) - z))
    ref = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0], [0.0, -1.0, 3.0]]), -1)
    p, q = ref.exp(), torch.softmax(logits, -1)
    torch.testing.assert_close(metrics.kl(logits, clean_logprobs=ref), (p * (p.log() - q.log())).sum(-1))
    assert metrics.kl(logits[1:], clean_logprobs=ref[1:]).abs().item() < 1e-6
    torch.testing.assert_close(
        metrics.normalise(torch.tensor([3.0, 1.0, 2.0]), 3.0, 1.0), torch.tensor([1.0, 0.0, 0.5])
    )
    with pytest.raises(InputError, match="unknown metric"):
        metrics.get("accuracy")


def test_non_utf8_file_names_its_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(json.dumps(IOI[0]).encode() + b"\n" + '{"clean": "caf\u00e9"}'.encode("latin-1") + b"\n")
    with pytest.raises(InputError, match=r"latin1.jsonl:2: not UTF-8 text \(byte \d+ is 0xe9\)"):
        Dataset.from_jsonl(p)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompts_past_the_position_table_are_an_error(tiny, family):
    from causalscan.patching.patch import patch

    long = " ".join(["a"] * 600)
    recs = [IOI[0], {"clean": long + " b", "corrupt": long + " c", "answer": "d", "wrong": "e"}]
    with pytest.raises(InputError, match=r"<memory>:2: field 'clean': 602 tokens run past the model's 512"):
        patch(tiny(family), recs, sites="head")
