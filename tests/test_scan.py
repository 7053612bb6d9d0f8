"""The scan end to end: ground truth of the zoo's induction model, confirmation, outputs, CLI."""

import json
import logging
import math
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

import causalscan
from causalscan import zoo
from causalscan.cli import main

from tolerance import assert_close

estimated = partial(causalscan.scan, exact_budget=0)  # scans that estimate every sweep


@pytest.fixture(scope="module")
def induction():
    return causalscan.load("induction")


def test_atp_star_finds_the_induction_circuit(induction):
    """On pairs that move the answer's predecessor, both the previous-token and the induction heads
    matter. Over all 4 heads and 256 neurons, AtP*'s top 3 hold both induction heads and a
    previous-token head, all four card heads rank above every neuron, and exact patching agrees."""
    card = induction.card["components"]
    heads = {tuple(h) for h in card["induction"] + card["previous_token"]}
    res = estimated(
        induction,
        zoo.dataset_path("induction", "previous"),
        sites=["head", "neuron"],
        method="atp*",
        confirm=4,
        confirm_random=12,
    )
    top = [(r["layer"], r["index"]) for r in res.top(4)]
    assert all(r["site"] == "head" for r in res.top(4))
    assert set(top) == heads
    assert {tuple(h) for h in card["induction"]} <= set(top[:3])
    assert set(top[:3]) & {tuple(h) for h in card["previous_token"]}
    a = res.agreement
    assert a["recall_at_k"] == 1.0  # the exact top 4 of the confirmed nodes are the estimated top 4
    assert a["top_min_exact_abs"] > 10 * a["random_max_exact_abs"]
    assert a["spearman"] > 0.5


def test_confirmation_matches_patch(induction):
    """Confirmed exact effects are those of an independent exact patch of the same components."""
    ds = zoo.dataset_path("induction")
    res = estimated(induction, ds, sites=["head"], method="atp", confirm=2, confirm_random=1)
    comps = [res.components[j] for j in res.confirmed.tolist()]
    ref = causalscan.patch(induction, ds, components=comps)
    assert_close(res.exact, ref.effect, scale=ref.clean.abs().max())
    assert {(c.layer, c.index) for c in comps[:2]} == {tuple(h) for h in induction.card["components"]["induction"]}


def test_denoising_is_the_mirror(induction):
    """Denoising: the base run is the corrupt prompt; baselines swap roles, not values."""
    ds = zoo.dataset_path("induction")
    noise = estimated(induction, ds, sites=["head"], method="atp", confirm=0)
    deno = estimated(induction, ds, sites=["head"], method="atp", confirm=2, direction="denoising")
    assert_close(noise.clean, deno.clean)
    assert_close(noise.corrupt, deno.corrupt)
    assert deno.top(1)[0]["layer"] == 1 and deno.top(1)[0]["exact"] > 0  # restoring an induction head helps


def test_false_negative_bound_covers_a_hidden_head(induction):
    """Confirm only the top 2 (the induction heads): the previous-token heads stay unconfirmed; the
    bound must not claim that every missed node is smaller than the smaller of their effects."""
    ds = zoo.dataset_path("induction", "previous")
    res = estimated(
        induction, ds, sites=["head", "neuron"], method="atp", confirm=2, confirm_random=0, fn_subsets=48, fn_p=0.2
    )
    fn = res.false_negatives
    hidden = causalscan.patch(induction, ds, sites="head").summary()["exact_abs"][:2]  # layer-0 heads
    confirmed = {(res.components[j].site, res.components[j].layer) for j in res.confirmed.tolist()}
    assert ("head", 0) not in confirmed  # the stratified sample adds each sweep's top 2: induction heads, 2 neurons
    assert fn["nodes"] == 260 - len(res.confirmed) == 256 and fn["subsets"] == 48
    assert math.isfinite(fn["bound"]) and fn["bound"] >= hidden.min().item()


def test_scan_outputs(induction, tmp_path):
    res = estimated(
        induction,
        zoo.dataset_path("induction"),
        sites=["head", "resid_pre", "q"],
        method="atp*",
        graddrop=True,
        confirm=3,
    )
    res.save(tmp_path)
    doc = json.loads((tmp_path / "scan.json").read_text())  # strict JSON: NaN written as null
    assert doc["kind"] == "scan" and doc["settings"]["method"] == "atp*"
    assert doc["agreement"]["n"] == 6
    by = doc["agreement_by_sweep"]  # each sweep's own top min(3, size // 2) and 3 random others
    assert list(by) == ["head", "resid_pre", "q"] and all(s["n"] >= 4 for s in by.values())
    t = load_file(str(tmp_path / "scores.safetensors"))
    assert t["atp*/head"].shape == (2, 2) and t["atp*/resid_pre"].shape == (2, 19) and t["graddrop/q"].shape == (2, 2)
    assert t["exact_abs/head"].isnan().sum() + t["exact_abs/resid_pre"].isnan().sum() + t[
        "exact_abs/q"
    ].isnan().sum() == 4 + 38 + 4 - len(res.confirmed)
    df = res.to_pandas()
    # ranked by the exact effect where confirmed, the estimated score elsewhere
    assert len(df) == 4 + 38 + 4 and df["exact_abs"].fillna(df["score"]).is_monotonic_decreasing


def test_cli_scan_default_is_the_induction_main_job(tmp_path, capsys):
    assert main(["scan", "--confirm", "4", "--out", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "induction" and doc["dataset"]["pairs"] == 16
    assert set(doc["settings"]["sweeps"]) == {"head", "neuron", "resid_pre"}
    assert (tmp_path / "scores.safetensors").is_file()


@pytest.mark.parametrize(
    "argv",
    [
        ["scan", "--data", "missing.jsonl"],
        ["scan", "--model", "induction", "--data", "missing.jsonl"],
        ["scan", "--model", "induction", "--sites", "heads"],
        ["scan", "--model", "induction", "--batch-size", "0"],
    ],
)
def test_cli_scan_bad_input_exits_2(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("causalscan: error:")


class _Stop(Exception):
    pass


def test_interrupted_scan_resumes(induction, tmp_path, caplog):
    """A scan killed after two batches resumes from its checkpoint: it runs only the missing batches and
    ends with the numbers of an uninterrupted scan; other settings start afresh."""
    data = causalscan.zoo.dataset_path("induction", "previous")
    kw = dict(sites="head", method="atp*", graddrop=True, confirm=2, batch_size=4, checkpoint_every_s=0.0)
    full = estimated(induction, data, **kw)
    seen = []

    def record(stage, done, total):
        seen.append((stage, done, total))

    def die_after_two(stage, done, total):
        if (stage, done) == ("attribution", 2):
            raise _Stop

    caplog.set_level(logging.INFO, logger="causalscan")
    with pytest.raises(_Stop):
        estimated(induction, data, checkpoint=tmp_path, progress=die_after_two, **kw)
    assert (tmp_path / "scan.partial.safetensors").is_file()
    caplog.clear()
    res = estimated(induction, data, checkpoint=tmp_path, progress=record, **kw)
    assert any(m.startswith("resuming") and "2/4 batches done" in m for m in caplog.messages)
    assert [s for s in seen if s[0] == "attribution"] == [("attribution", 3, 4), ("attribution", 4, 4)]
    for name in ("signed", "score", "graddrop", "clean", "corrupt", "exact"):
        assert torch.equal(getattr(res, name), getattr(full, name)), name
    assert not (tmp_path / "scan.partial.safetensors").exists()

    with pytest.raises(_Stop):
        estimated(induction, data, checkpoint=tmp_path, progress=die_after_two, **kw)
    seen.clear()
    caplog.clear()
    estimated(induction, data, checkpoint=tmp_path, progress=record, **{**kw, "method": "atp", "graddrop": False})
    assert not any(m.startswith("resuming") for m in caplog.messages)  # other settings: no resume
    assert sum(s[0] == "attribution" for s in seen) == 4


@pytest.mark.parametrize("damage", ["flip", "done", "truncate", "empty", "garbage"])
def test_a_damaged_checkpoint_is_set_aside(induction, tmp_path, caplog, damage):
    """Flipped data bytes, a tampered list of finished batches, a truncated, empty or garbage file: the
    scan warns, renames the file aside and starts afresh, ending with the uninterrupted numbers."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    data = causalscan.zoo.dataset_path("induction", "previous")
    kw = dict(sites="head", method="atp", confirm=0, batch_size=4, checkpoint_every_s=0.0)
    full = estimated(induction, data, **kw)

    def die_after_two(stage, done, total):
        if (stage, done) == ("attribution", 2):
            raise _Stop

    with pytest.raises(_Stop):
        estimated(induction, data, checkpoint=tmp_path, progress=die_after_two, **kw)
    path = tmp_path / "scan.partial.safetensors"
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-3] ^= 0x40
        path.write_bytes(bytes(raw))
    elif damage == "done":  # the digest of the honest file, with more batches claimed done
        with safe_open(str(path), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(path), metadata={**meta, "done": json.dumps(list(range(200)))})
    else:
        path.write_bytes(
            {"truncate": bytes(raw[: len(raw) // 2]), "empty": b"", "garbage": b"not a checkpoint"}[damage]
        )
    caplog.set_level(logging.INFO, logger="causalscan")
    res = estimated(induction, data, checkpoint=tmp_path, **kw)
    assert any("set aside" in m for m in caplog.messages) and not any("resuming" in m for m in caplog.messages)
    assert len(list(tmp_path.glob("scan.partial.safetensors.bad-*"))) == 1
    assert torch.equal(res.signed, full.signed) and torch.equal(res.clean, full.clean)


def test_ctrl_c_saves_the_partial_sums_prints_one_line_and_a_rerun_resumes(tmp_path, capsys, monkeypatch, caplog):
    """A real SIGINT during the third attribution batch (the default handler raises KeyboardInterrupt):
    exit 130 with one line naming --out; the two finished batches are on disk although the periodic
    write (every 30 s) never came; the rerun runs only the other two and writes what an uninterrupted
    scan writes."""
    import signal

    from safetensors.torch import load_file
    from torch._subclasses.fake_tensor import FakeTensor

    from causalscan.cli import main
    from causalscan.patching import attribution

    data = str(causalscan.zoo.dataset_path("induction", "previous"))
    argv = ["scan", "--model", "induction", "--data", data, "--sites", "head", "--batch-size", "4", "--confirm", "4"]
    assert main([*argv, "--out", str(tmp_path / "full")]) == 0
    real, calls = attribution.attribute, []

    def interrupted(ad, *args, **kw):
        if not isinstance(next(ad.model.parameters()), FakeTensor):  # not the memory plan's trial batch
            calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real(ad, *args, **kw)

    monkeypatch.setattr(attribution, "attribute", interrupted)
    capsys.readouterr()
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("causalscan:")]
    assert err == [f"causalscan: interrupted; partial results are in {out}; the same command resumes from them"]
    assert (out / "scan.partial.safetensors").is_file() and not (out / "scan.json").exists()
    monkeypatch.setattr(attribution, "attribute", real)
    caplog.set_level(logging.INFO, logger="causalscan")
    assert main([*argv, "--out", str(out)]) == 0
    assert any("2/4 batches done" in m for m in caplog.messages)
    full, resumed = load_file(tmp_path / "full" / "scores.safetensors"), load_file(out / "scores.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_a_second_writer_on_one_out_directory_is_refused(tmp_path, capsys):
    """Another process holds --out (a real second process, as a second terminal would be): exit 2 with
    one line naming it; once that process is gone (even SIGKILLed: the kernel drops its flock) the
    directory is free."""
    import os
    import signal
    import subprocess
    import sys

    from causalscan.cli import main

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom causalscan import files\n"
            f"with files.lock({str(tmp_path)!r}):\n print('held', flush=True)\n time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["scan", "--sites", "head", "--confirm", "0", "--out", str(tmp_path)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"another causalscan run (pid {holder.pid}) is writing here" in err and "loading" not in err
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert main(argv) == 0 and (tmp_path / "scan.json").is_file()


def test_agreement_per_sweep_is_measured_on_its_own_stratum(induction):
    """Each sweep's statistics come from its own top nodes and random sample, measured exactly, and
    equal ``agreement`` recomputed by hand from those nodes' exact effects."""
    from causalscan.patching.agreement import agreement

    res = estimated(
        induction, zoo.dataset_path("induction"), sites="head,neuron,resid_pre", confirm=4, confirm_random=6
    )
    score, signed = res.score.mean(0), res.signed.mean(0)
    col = {j: c for c, j in enumerate(res.confirmed.tolist())}
    assert len(col) == len(res.confirmed)  # no node measured twice
    checked = 0
    for sw in res.sweeps:
        own = [j for j in res.confirmed.tolist() if sw.start <= j < sw.stop]
        k = min(4, (sw.stop - sw.start) // 2)
        top = score[sw.start : sw.stop].argsort(descending=True)[:k] + sw.start
        a = res.agreement_by_sweep[sw.name]
        assert set(top.tolist()) <= set(own) and a["n"] == k + min(6, sw.stop - sw.start - k) <= len(own)
        assert a["k"] == k
        if len(own) == a["n"]:  # no node of this sweep came from the pooled random sample: the stratum is `own`
            rest = [j for j in own if j not in set(top.tolist())]
            ids = [*top.tolist(), *rest]
            ref = agreement(score[ids], signed[ids], res.exact[:, [col[j] for j in ids]], k)
            assert {k: v for k, v in a.items() if k != "frontier"} == pytest.approx(ref, nan_ok=True)
            checked += 1
    assert checked >= 1


def test_untrusted_sweeps():
    from causalscan.patching.agreement import untrusted

    good = {"n": 64, "sign_agreement": 0.97, "sign_nodes": 20, "spearman": 0.8}
    assert not untrusted(good)
    assert untrusted({**good, "sign_agreement": 0.6}) and untrusted({**good, "spearman": 0.2})
    assert not untrusted({**good, "sign_agreement": 0.5, "sign_nodes": 2})  # one tiny effect of two
    assert not untrusted({**good, "n": 3, "spearman": 0.0}) and not untrusted({**good, "spearman": math.nan})


def test_exact_cost_by_hand(tiny):
    """llama-tiny (2 layers, 4 heads), rows of T tokens; the output layer counts 4 block x positions
    per row. A head patch at layer l recomputes (2 - l) blocks x T positions, the floor is 4 full
    forwards, 4 (2 T + 4): (4 (2 T + 4) + 4 (T + 4)) / (4 (2 T + 4)). resid_pre by position: the
    few rows here merge every position of a layer into one forward from position 0, so each node
    costs (2 - l) T + 4."""
    from causalscan.data.inputs import prepare
    from causalscan.data.sweeps import build_sweeps
    from causalscan.patching.confirm import exact_cost

    from conftest import IOI

    inp = prepare(tiny("llama"), IOI, "logit_diff", "noising")
    t = inp.lengths[0]
    sweeps, comps = build_sweeps(inp.model, "head,resid_pre", inp.lengths)
    head, resid = sweeps
    floor = 4 * (2 * t + 4)
    assert exact_cost(inp, comps[head.start : head.stop]) == pytest.approx((4 * (2 * t + 4) + 4 * (t + 4)) / floor)
    assert exact_cost(inp, comps[resid.start : resid.stop]) == pytest.approx(t * (3 * t + 8) / floor)


def test_sweeps_under_the_exact_budget_are_patched_exactly(tiny):
    """Budget 2: heads (cost 1.5) are patched, resid_pre (cost ~ 0.19 T) is estimated and confirmed;
    the exact sweep's scores are patch()'s effects, and only the estimated sweep is confirmed."""
    from causalscan.patching.patch import patch

    from conftest import IOI

    model = tiny("llama")
    res = estimated(model, IOI, sites="head,resid_pre", method="atp", exact_budget=2.0, confirm=4)
    assert res.scored_by == {"head": "exact", "resid_pre": "atp"}
    head = next(sw for sw in res.sweeps if sw.name == "head")
    ref = patch(model, IOI, sites="head")
    assert torch.equal(res.signed[:, head.start : head.stop], ref.effect)
    assert all(not head.start <= j < head.stop for j in res.confirmed.tolist())
    assert list(res.agreement_by_sweep) == ["resid_pre"]
    doc = res.to_json()
    assert doc["settings"]["scored_by"] == res.scored_by
    row = next(r for r in doc["components"] if r["site"] == "head")
    assert row["exact"] == pytest.approx(row["estimate"])


def test_default_scan_patches_cheap_sweeps_exactly(induction, capsys):
    """The default: auto (AtP on neurons, RelP elsewhere), and a sweep no larger than its confirmation sample (4 + 4) is
    patched exactly (its scores are patch()'s effects), a larger one estimated; the CLI says which,
    and its help states the same default."""
    from causalscan.cli import main, parser
    from causalscan.patching.patch import patch

    data = zoo.dataset_path("induction")
    res = causalscan.scan(induction, data, sites="head,neuron", confirm=4)
    assert res.scored_by == {"head": "exact", "neuron": "atp"} and res.graddrop is None
    head = next(sw for sw in res.sweeps if sw.name == "head")
    assert torch.equal(res.signed[:, head.start : head.stop], patch(induction, data, sites="head").effect)
    more = causalscan.scan(induction, data, sites="head", confirm=1, confirm_random=2)  # 4 heads > 1 + 2
    assert more.scored_by == {"head": "relp"}
    assert main(["scan", "--sites", "head,neuron", "--confirm", "4"]) == 0
    assert "patched exactly: head; estimated: neuron" in capsys.readouterr().err
    scan_help = parser()._subparsers._group_actions[0].choices["scan"].format_help()
    assert "only the sweeps no larger than their confirmation sample" in " ".join(scan_help.split())


def test_frontier_by_hand():
    """A sweep's confirmed top of 4 (estimate order) and 2 random others of its 10 unconfirmed nodes."""
    from causalscan.patching.agreement import frontier, shallow, upper_95

    f = frontier(torch.tensor([1.0, 5.0, 3.0, 0.1, 0.2, 4.0]), k=4, n_rest=10, top=2)
    # exact top 2 of the confirmed top: #2 (5) and #3 (3); the estimate's top 2 holds one of them
    assert f == {
        "top": 2,
        "recall_at_top": 0.5,
        "deepest": 3,
        "random": 2,
        "random_above": 1,  # 4.0 >= 3, the exact 2nd
        "missed_95": pytest.approx(10 * upper_95(1, 2)),
    }
    assert "1 of 2 random nodes belong in its exact top 2" in shallow({"k": 4, "frontier": f})
    deep = frontier(torch.tensor([1.0, 2.0, 3.0, 9.0, 0.0]), k=4, n_rest=1, top=2)
    assert deep["deepest"] == 4 and "the estimate's #4 of 4" in shallow({"k": 4, "frontier": deep})
    assert shallow({"k": 4, "frontier": frontier(torch.tensor([9.0, 8.0, 1.0, 0.5, 0.1]), 4, 1, 2)}) is None


@pytest.mark.parametrize("hits,n", [(0, 32), (0, 5), (3, 40), (7, 10)])
def test_upper_95_is_the_clopper_pearson_bound(hits, n):
    """At the bound the binomial probability of seeing at most ``hits`` is 5% (zero hits: 1 - 0.05^(1/n))."""
    from causalscan.patching.agreement import upper_95

    p = upper_95(hits, n)
    cdf = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(hits + 1))
    assert cdf == pytest.approx(0.05, abs=1e-9)
    if hits == 0:
        assert p == pytest.approx(1 - 0.05 ** (1 / n), abs=1e-12)


def test_a_misranked_top_is_caught_and_ranked_by_its_exact_effects(induction):
    """A planted failure: the neuron sweep's estimated top 32 in reverse, so the real top sits at the
    bottom of the confirmed top. Confirmation says so (the estimate's top-16 recall among the
    confirmed), and the scan's ranking of that top follows the exact effects, not the estimate."""
    from causalscan.data.inputs import prepare
    from causalscan.patching import confirm

    data = zoo.dataset_path("induction")
    res = estimated(induction, data, sites="neuron", method="atp", confirm=0)
    top = res.score.mean(0).argsort(descending=True)[:32]
    res.score[:, top] = res.score[:, top.flip(0)]
    confirm.confirm(res, prepare(induction, data, "logit_diff", "noising"), 32, 32, 0, None)
    f = res.agreement_by_sweep["neuron"]["frontier"]
    assert f["top"] == 16 and f["recall_at_top"] < 0.5 and f["deepest"] > 24
    exact_abs = res.summary()["exact_abs"]
    by_exact = exact_abs.nan_to_num(-1).argsort(descending=True)[:16]
    assert [r["component"] for r in res.top(16)] == [str(res.components[j]) for j in by_exact.tolist()]
    notes = res.notes(res.to_json())
    assert any(n.startswith("sweep neuron: estimated by atp, its confirmed top 32 ranked by exact") for n in notes)
    assert any(n.startswith("warning: sweep neuron: an exact top-16 node was the estimate's #") for n in notes)
