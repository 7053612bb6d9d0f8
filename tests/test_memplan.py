"""The memory plan: its fake-tensor simulation against the same unit run for real, its prediction
against the measured resident peak (three shapes, bench/bench_memplan.py), and the refusal."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from causalscan import memplan
from causalscan.data.inputs import prepare
from causalscan.data.sweeps import build_sweeps
from causalscan.errors import InputError
from causalscan.patching.estimate import attribution_units
from causalscan.patching.exact import patch_units
from causalscan.patching.planner import planned
from causalscan.patching.scan import scan

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [
    {
        "clean": "When Mary and John went to the store , John gave a drink to",
        "corrupt": "When Mary and John went to the store , Mary gave a drink to",
        "answer": "Mary",
        "wrong": "John",
    }
] * 3


@pytest.mark.parametrize(
    "family,sites,method,metric",
    [
        ("llama", ["head", "neuron", "resid_pre", "q", "k"], "atp*", "logit_diff"),
        ("gpt2", ["head", "mlp_out", "v"], "atp", "kl"),
        ("gpt_neox", ["head", "attn_out"], "atp-ig", "prob"),
        ("qwen3", ["neuron", "head:pos"], "atp*", "logprob"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "default"])
def test_the_simulation_is_the_real_runs_tensor_peak(tiny, monkeypatch, family, sites, method, metric, backend):
    """Fake weights, the engine's own code: the storages alive at the peak are those of the real run,
    exactly on the reference backend; the Triton interpreter's launches copy their arguments, scratch
    the ops' fake rules do not allocate (a fixed 90-230 KiB here, within 3% + 256 KiB)."""
    if backend == "torch":
        monkeypatch.setenv("CAUSALSCAN_BACKEND", "torch")

    def same(sim, real):
        if backend == "torch":
            assert sim == real
        else:
            assert abs(sim["cpu"] - real["cpu"]) <= 0.03 * real["cpu"] + (256 << 10)

    inp = prepare(tiny(family), PAIRS, metric, "noising")
    sweeps, comps = build_sweeps(inp.model, sites, inp.lengths, inp.dataset.name, None)
    args = (
        replace(inp, model=None),
        sweeps,
        "noising",
        method == "atp*",
        False,
        3,
        2 if method == "atp-ig" else 0,
        "inputs",
    )
    real = memplan._Live([*inp.model.hf.parameters(), *inp.model.hf.buffers()])
    compute = attribution_units(inp.model, *args)
    with real:
        compute(0)
    same(memplan.simulate(inp.model, attribution_units, args, 0), dict(real.peak))
    groups = [[c] for c in comps[:5]]
    work = planned(inp.model, inp.rows, groups)
    stage = (inp.rows, groups, "noising", inp.metric_fn, work)
    real = memplan._Live([*inp.model.hf.parameters(), *inp.model.hf.buffers()])
    compute = patch_units(inp.model, *stage)
    with real:
        compute((0, 0))
    same(memplan.simulate(inp.model, patch_units, stage, (0, 0)), dict(real.peak))


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["A", "B", "C"])
def test_the_prediction_is_within_20_percent_of_the_resident_peak(shape):
    """Each stage's predicted peak above the weights against the process's high-water RSS (own process)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the high-water mark")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    env.pop("TRITON_INTERPRET", None)  # the engines' CPU path, as a user runs it
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_memplan.py"), "--one", shape],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for stage, ratio in r["ratio"].items():
        assert 0.8 <= ratio <= 1.2, (stage, r["predicted_bytes"], r["measured_bytes"])


def test_the_plan_refuses_what_cannot_fit(tiny):
    inp = prepare(tiny("llama"), PAIRS, "logit_diff", "noising")
    plan = scan(inp.model, inp, ["head"], batch_size=3, confirm=2, exact_budget=0, dry_run=True)
    assert set(plan.stages) == {"attribution", "confirmation"}
    need = plan.peak()["cpu"]
    assert need == plan.weights["cpu"] + max(s["cpu"] for s in plan.stages.values())
    plan.check({"cpu": need})
    with pytest.raises(InputError, match=f"needs {need / 2**30:.2f} GiB on cpu"):
        plan.check({"cpu": need - 1})


def test_cli_dry_run_and_refusal(capsys):
    from causalscan.cli import main

    assert main(["scan", "--dry-run", "--json", "--sites", "head,resid_pre"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["plan"]["stages_bytes"]) == {"attribution", "exact patching"}
    assert doc["plan"]["peak_bytes"]["cpu"] > doc["plan"]["weights_bytes"]["cpu"]
    assert main(["trace", "--dry-run", "--window", "1"]) == 0
    assert "patching: +" in capsys.readouterr().err
    assert main(["patch", "--model", "induction", "--memory-gb", "0.0001"]) == 2
    assert "the run needs" in capsys.readouterr().err


def test_every_method_checks_its_own_plan(tiny):
    """The API checks memory before any work, as the CLI does: each method's dry run is its plan, whose
    stages are the method's, and a limit below its peak is refused with the number it needed."""
    import causalscan as cs

    model, data = cs.load("induction"), cs.zoo.dataset_path("induction", "previous")
    runs = {
        "patch": (cs.patch, {"sites": "head"}, {"patching"}),
        "trace": (cs.trace, {"window": 1}, {"patching"}),
        "scan": (cs.scan, {"sites": "head,neuron", "confirm": 4}, {"attribution", "exact patching", "confirmation"}),
        "circuit": (cs.circuit, {"confirm": 4, "edges": 6}, {"attribution", "confirmation", "faithfulness"}),
    }
    for name, (fn, kw, stages) in runs.items():
        plan = fn(model, data, dry_run=True, **kw)
        assert isinstance(plan, memplan.Plan) and set(plan.stages) == stages, (name, plan.stages)
        need = plan.peak()["cpu"]
        assert need > plan.weights["cpu"] and all(s["cpu"] > 0 for s in plan.stages.values()), name
        with pytest.raises(InputError, match="the run needs"):
            fn(model, data, memory_gb=0.5 * need / 2**30, **kw)


def test_the_audit_plan_covers_a_real_unit_and_refuses():
    """The audit's plan (the search's largest VJP batch, the largest ``generate``) against the tensor
    peak of a real (layer, radius) unit on the real weights: covered, within 40%; the modes' bound; a
    limit below the plan's peak is refused before any work."""
    import causalscan as cs
    from causalscan.data.prompts import encode
    from causalscan.steering import audit as audit_mod

    model = cs.load("backdoor")
    train, held = audit_mod.split(audit_mod.zoo_prompts(model), 0.5, 0)
    train, held = ([encode(model.tokenizer, s, False) for s in x] for x in (train, held))
    plan = audit_mod.plan_memory(model, train, held, 0, 3, "dct", 16, 8, 1000)
    assert set(plan.stages) == {"search", "generation", "modes"}
    assert plan.stages["modes"]["cpu"] == 3 * 1000 * 4096 * 4  # the TF-IDF bound
    real = memplan._Live([*model.hf.parameters(), *model.hf.buffers()])
    compute = audit_mod.sweep_unit(model, train, held, 3, "dct", 16, None, 1, 1.0, 8, 0)
    with real:
        compute((0, 0, 1.0))
    assert 0.6 <= real.peak["cpu"] / max(plan.stages[s]["cpu"] for s in ("search", "generation")) <= 1.0
    need = cs.audit(model, n=16, dry_run=True).peak()["cpu"]
    with pytest.raises(InputError, match="the run needs"):
        cs.audit(model, n=16, memory_gb=0.5 * need / 2**30)
