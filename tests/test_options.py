"""Bad option values through the CLI, in process: exit 2 with one line naming the field, before any
work (no traceback, no result computed from a NaN or a wrapped-around index); ``--json`` is strict
JSON."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from causalscan.cli import main
from causalscan.errors import InputError, check_number

ROOT = Path(__file__).resolve().parents[1]
PATCH = ["patch", "--model", "random:llama-tiny", "--data", str(ROOT / "examples/ioi.jsonl"), "--sites", "head"]
ELICIT = ["elicit", "--model", "random:llama-tiny", "--prompt", "a b c", "--n", "1", "--steps", "1"]


@pytest.mark.parametrize(
    "extra, field",
    [
        (["--noise-scale", "nan"], "noise_scale"),
        (["--noise-scale", "-1"], "noise_scale"),
        (["--noise-scale", "inf"], "noise_scale"),
        (["--samples", "0"], "samples"),
        (["--top", "-1"], "top"),
        (["--device", "foo"], "device"),
        (["--sites", ","], "sites"),
        (["--seed", "-3"], "seed"),
    ],
)
def test_bad_patch_options_exit_2(capsys, extra, field):
    assert main(PATCH + extra) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("causalscan: error:")]
    assert len(errors) == 1 and f"field {field!r}" in errors[0] and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_exits_2(capsys):
    assert main(PATCH + ["--device", "cuda"]) == 2
    assert "has no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, field",
    [
        (["--confirm-random", "-5"], "confirm_random"),
        (["--confirm", "-1"], "confirm"),
        (["--batch-size", "0"], "batch_size"),
    ],
)
def test_bad_scan_options_exit_2(capsys, extra, field):
    assert main(["scan", *PATCH[1:], *extra]) == 2
    assert f"field {field!r}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, field",
    [
        (["--positions", "99"], "positions"),
        (["--positions", "abc"], "positions"),
        (["--radius", "inf"], "radius"),
        (["--p", "0"], "p"),
        (["--q", "nan"], "q"),
        (["--max-new-tokens", "-1"], "max_new_tokens"),
        (["--top", "-2"], "top"),
    ],
)
def test_bad_elicit_options_exit_2(capsys, extra, field):
    assert main([*ELICIT[:-2], *extra] if "--steps" in extra else [*ELICIT, *extra]) == 2
    assert f"field {field!r}" in capsys.readouterr().err


def test_scan_api_refuses_a_zero_fn_p(tiny):
    from causalscan.patching.scan import scan

    from conftest import IOI

    with pytest.raises(InputError, match="field 'fn_p'"):
        scan(tiny("llama"), IOI, sites="head", fn_subsets=4, fn_p=0.0)


def test_elicit_steps_zero_exits_2(capsys):
    assert main([*ELICIT[:-2], "--steps", "0", "--method", "melbo"]) == 2
    assert "field 'steps'" in capsys.readouterr().err


def test_steer_refuses_non_finite_vectors_and_alpha(tmp_path, capsys):
    vecs = torch.zeros(2, 64)
    vecs[0, 3] = float("nan")
    path = tmp_path / "vectors.safetensors"
    meta = {"model": "random:llama-tiny", "source": "0"}
    save_file({"vectors": vecs, "random": vecs.clone()}, str(path), metadata=meta)
    steer = ["steer", "--vectors", str(path), "--prompt", "a b"]
    assert main([*steer, "--index", "0"]) == 2
    assert "NaN or infinite" in capsys.readouterr().err
    assert main([*steer, "--index", "1", "--alpha", "inf"]) == 2
    assert "field 'alpha'" in capsys.readouterr().err


def test_json_is_strict_without_nan(capsys):
    """clean == corrupt: the normalised effects are 0/0; --json prints null, never a bare NaN."""
    rec = {"clean": "a b c", "corrupt": "a b c", "answer": "d", "wrong": "e"}
    assert main(["patch", "--model", "random:llama-tiny", "--data", _jsonl(rec), "--json"]) == 0
    out = capsys.readouterr().out

    def refuse(name):
        raise ValueError(f"bare {name} in --json output")

    doc = json.loads(out, parse_constant=refuse)
    assert doc["components"] and all(r["exact_norm"] is None for r in doc["components"])


def _jsonl(rec) -> str:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "same.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "value, kw",
    [
        (math.nan, {}),
        (math.inf, {}),
        (True, {"integer": True}),
        (1.5, {"integer": True}),
        ("3", {}),
        (0, {"lo": 0, "open_lo": True}),
        (-1, {"lo": 0}),
        (11, {"lo": 0, "hi": 10}),
    ],
)
def test_check_number_refuses(value, kw):
    with pytest.raises(InputError, match="field 'x'"):
        check_number(value, "x", **kw)


def test_check_number_accepts_bounds():
    check_number(0, "x", 0, integer=True)
    check_number(1.0, "x", 0, 1, open_lo=True)
    check_number(-2.5, "x")


def test_out_that_is_a_file_or_unwritable_exits_2_before_work(tmp_path, capsys):
    a_file = tmp_path / "scan.json"
    a_file.write_text("{}")
    assert main([*PATCH, "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "loading" not in err  # before the model loads
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: nothing to refuse
            pytest.skip("running as a user that can write to a read-only directory")
        assert main([*PATCH, "--out", str(locked / "out")]) == 2
        assert "cannot write here" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_outputs_replace_atomically_and_a_failed_write_keeps_the_last(tmp_path):
    from causalscan import files

    target = tmp_path / "scan.json"
    files.write(target, "first")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(InputError, match="No space left on device"):
        files.write(target, fail)
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["scan.json"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--noise-scale", "nan"],
        ["--samples", "100000"],
        ["--batch-size", "0"],
        ["--fn-subsets", "1000000000"],
        ["--seed", str(2**64)],
        ["--confirm", "-1"],
    ],
)
def test_numeric_options_are_refused_before_the_model_loads(capsys, extra):
    """A model path that does not exist: the option's error must come first, the model never read."""
    assert main(["scan", "--model", "/nonexistent/model", "--data", "/nonexistent.jsonl", *extra]) == 2
    err = capsys.readouterr().err
    assert "loading" not in err and "nonexistent" not in err and "field" in err


def _api_cases():
    import causalscan as cs
    from causalscan.model import interventions as iv
    from causalscan.steering.generation import generate

    data = [{"clean": "a b c d", "corrupt": "a b e d", "answer": "c", "wrong": "e"}]
    ids = torch.tensor([[5, 6, 7, 8]])
    return {  # name: (call(model), field named in the error)
        "dataset int": (lambda m: cs.scan(m, 123), "dataset"),
        "dataset dict": (lambda m: cs.scan(m, {"clean": "a"}), "dataset"),
        "dataset of strings": (lambda m: cs.patch(m, ["a b"]), "record 1"),
        "sites int": (lambda m: cs.scan(m, data, sites=5), "sites"),
        "model int": (lambda m: cs.scan(123, data), "model"),
        "dtype int": (lambda m: cs.load("random:llama-tiny", dtype=3), "dtype"),
        "components str": (lambda m: cs.patch(m, data, components="head"), "components"),
        "kinds int": (lambda m: cs.trace(m, data, kinds=5), "kinds"),
        "prompts ints": (lambda m: cs.elicit(m, [1, 2], n=1, steps=1), "prompts"),
        "progress int": (lambda m: cs.patch(m, data, progress=5), "progress"),
        "checkpoint int": (lambda m: cs.scan(m, data, checkpoint=5), "checkpoint"),
        "vector list": (lambda m: iv.add("resid_post", vector=[1.0] * 64), "vector"),
        "vector nan": (lambda m: iv.add("resid_post", vector=torch.full((64,), math.nan)), "vector"),
        "alpha str": (lambda m: iv.add("resid_post", vector=torch.ones(64), alpha="2"), "alpha"),
        "layers str": (lambda m: iv.zero("head", layers="1"), "layers"),
        "index float": (lambda m: iv.zero("head", layers=1, index=[0.5]), "index"),
        "not an intervention": (lambda m: iv.perturb(m, "zero", input_ids=ids), "interventions"),
        "input_ids list": (lambda m: iv.perturb(m, iv.zero("head", layers=1), input_ids=[[5, 6]]), "input_ids"),
        "source shape": (
            lambda m: iv.perturb(m, iv.patch_from("resid_post", torch.ones(2, 9, 64), layers=1), input_ids=ids),
            "source",
        ),
        "generate prompts str": (lambda m: generate(m, "ab", torch.ones(1, 64), 0), "prompts"),
        "ioi n": (lambda m: cs.tasks.ioi(m.tokenizer, n=-1), "n"),
    }


@pytest.mark.parametrize("case", list(_api_cases()))
def test_wrong_api_argument_types_raise_input_error_naming_the_field(tiny, case):
    call, field = _api_cases()[case]
    with pytest.raises(InputError, match=field):
        call(tiny("llama"))


def test_one_prompt_string_is_one_prompt(tiny):
    import causalscan as cs

    one = cs.elicit(tiny("llama"), "a b c", n=1, steps=1, method="melbo", source=0, target=1, radius=1.0)
    assert one.prompts == ["a b c"]


def test_out_on_a_full_disk_exits_2_before_work(tmp_path, capsys, monkeypatch):
    import shutil

    from causalscan import files

    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    assert main([*PATCH, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "only 4 KiB free" in err and "loading" not in err
