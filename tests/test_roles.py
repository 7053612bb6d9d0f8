"""Named positions: pairs of different lengths swept by role. Each role-swept value equals the same
method run on that pair alone with the role's resolved token position (an independent per-pair
reference), for exact patching, AtP* (QK fix and GradDrop included) and causal tracing."""

from functools import partial

import pytest
import torch

import causalscan as cs
from causalscan.data import tasks
from causalscan.data.pairs import Dataset
from causalscan.data.sweeps import Component
from causalscan.errors import InputError

from naive import naive_effects
from tolerance import assert_close

estimated = partial(cs.scan, exact_budget=0)  # scans that estimate every sweep


@pytest.fixture
def ioi_mixed(tiny):
    """ABC IOI pairs (every name differs, so every role's residual differs) over templates of 15 and
    16 tokens, with roles IO, S1, S2, END; one more pair of the first template with the names in the
    other order, so one length bucket holds several IO positions."""
    recs = tasks.ioi(tiny("llama").tokenizer, n=4, seed=1, templates=[0, 1], corruption="abc")
    io, s = recs[0]["answer"][1:], recs[0]["wrong"][1:]
    swap = {k: recs[0][k].replace(f"When {io} and {s}", f"When {s} and {io}") for k in ("clean", "corrupt")}
    recs.append({**recs[0], **swap})
    pairs = Dataset(recs).tokenize(tiny("llama").tokenizer)
    assert len({len(p.clean) for p in pairs}) == 2 and pairs[0].roles["IO"] != pairs[-1].roles["IO"]
    assert len(pairs[0].clean) == len(pairs[-1].clean)
    return recs


def _alone(rec):
    return {k: v for k, v in rec.items() if k != "positions"}


def _per_sweep(res, name: str, i: int) -> dict:
    """Pair ``i``'s ``res.<name>`` values cut into the result's sweeps."""
    v = getattr(res, name)[i]
    return {s.name: v[s.start : s.stop].reshape(s.shape) for s in res.sweeps}


def test_roles_resolve_to_tokens(tiny):
    tok = tiny("llama").tokenizer
    rec = {
        "clean": "When Mary and John went to the store , John gave a drink to",
        "corrupt": "When Mary and John went to the store , Mary gave a drink to",
        "answer": "Mary",
        "wrong": "John",
        "positions": {"IO": " Mary", "S1": "John", "S2": [" John", 2], "END": -1, "and": 3},
    }
    (pair,) = Dataset([rec]).tokenize(tok)
    words = [tok.decode([t]) for t in pair.clean]
    assert {r: words[i] for r, i in pair.roles.items()} == {
        "IO": "Mary",
        "S1": "John",
        "S2": "John",
        "END": "to",
        "and": "and",
    }  # index 3: after <bos> When Mary
    assert pair.roles["S2"] > pair.roles["S1"] and pair.roles["END"] == len(pair.clean) - 1


@pytest.mark.parametrize(
    "positions, match",
    [
        ({"IO": " Zed"}, "does not occur"),
        ({"IO": [" Mary", 3]}, "does not occur 3 time"),
        ({"IO": 99}, "outside the prompt"),
        ({"IO": [" Mary"]}, "give a substring"),
        ({"IO": True}, "give a substring"),
    ],
)
def test_bad_roles_name_line_and_field(tiny, positions, match):
    rec = {"clean": "Mary went to", "corrupt": "John went to", "answer": "the", "positions": positions}
    with pytest.raises(InputError, match=f"<memory>:1: field 'positions': .*{match}"):
        Dataset([rec]).tokenize(tiny("llama").tokenizer)


def test_roles_must_be_the_same_on_every_line(ioi_mixed):
    bad = [ioi_mixed[0], {**ioi_mixed[1], "positions": {"IO": " x"}}]
    with pytest.raises(InputError, match=r"<memory>:2: field 'positions': roles \['IO'\] differ"):
        Dataset(bad)
    with pytest.raises(InputError, match="<memory>:2: field 'positions'"):
        Dataset([ioi_mixed[0], _alone(ioi_mixed[1])])


def test_mixed_lengths_without_roles_say_how_to_name_them(tiny, ioi_mixed):
    with pytest.raises(InputError, match='name positions on every pair, e.g. "positions"'):
        cs.patch(tiny("llama"), [_alone(r) for r in ioi_mixed], sites="resid_pre")


@torch.no_grad()
def test_patching_by_role_equals_each_pair_alone(tiny, ioi_mixed):
    model = tiny("llama")
    res = cs.patch(model, ioi_mixed, sites=["resid_pre", "head:pos"])
    assert res.tensors()["exact/resid_pre"].shape == (2, 4) and res.tensors()["exact/head_pos"].shape == (2, 4, 4)
    pairs = Dataset(ioi_mixed).tokenize(model.tokenizer)
    for i, (rec, pair) in enumerate(zip(ioi_mixed, pairs, strict=True)):
        comps = [Component(c.site, c.layer, c.index, pair.roles[c.position]) for c in res.components]
        assert_close(res.patched[i], naive_effects(model, [_alone(rec)], comps)[0])


def test_scan_by_role_equals_each_pair_alone(tiny, ioi_mixed):
    """AtP* by role (q:pos through the QK fix, resid_pre through GradDrop's gathered passes) on a
    mixed-length batch, against by-position AtP* of each pair alone, read at its role positions."""
    model = tiny("llama")
    sites = ["resid_pre", "q:pos", "head"]
    res = estimated(model, ioi_mixed, sites=sites, method="atp*", graddrop=True, confirm=0)
    pairs = Dataset(ioi_mixed).tokenize(model.tokenizer)
    for i, (rec, pair) in enumerate(zip(ioi_mixed, pairs, strict=True)):
        alone = estimated(model, [_alone(rec)], sites=sites, method="atp*", graddrop=True, confirm=0)
        pos = torch.tensor([pair.roles[r] for r in res.sweeps[0].roles])
        for name in ("signed", "graddrop"):
            got, want = _per_sweep(res, name, i), _per_sweep(alone, name, 0)
            assert_close(got["resid_pre"], want["resid_pre"][:, pos], msg=name)
            assert_close(got["q_pos"], want["q_pos"][:, pos], msg=name)
            assert_close(got["head"], want["head"], msg=name)


@torch.no_grad()
def test_trace_by_role_equals_each_pair_alone(tiny, ioi_mixed):
    model = tiny("llama")
    tr = cs.trace(model, ioi_mixed, kinds=["state", "mlp"], window=1, metric="logit_diff")
    assert tr.tokens == ["IO", "S1", "S2", "END"] and tr.effects["state"].shape == (5, 4, 2)
    pairs = Dataset(ioi_mixed).tokenize(model.tokenizer)
    for i, (rec, pair) in enumerate(zip(ioi_mixed, pairs, strict=True)):
        alone = cs.trace(model, [_alone(rec)], kinds=["state", "mlp"], window=1, metric="logit_diff")
        pos = torch.tensor([pair.roles[r] for r in tr.tokens])
        for grid in ("state", "mlp"):
            assert_close(tr.effects[grid][i], alone.effects[grid][0][pos], msg=grid)
