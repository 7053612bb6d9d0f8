"""Property-based hardening through the CLI, in process: generated records (wrong types, odd unicode,
lengths, ids, raw bytes), generated option values (NaN, inf, negatives, zero, huge, not numbers) and
byte-level corruptions of a scan checkpoint. Every run must exit 0 with the reference result or exit 2
with one error line; never a traceback, never a wrong result.

The references are independent of the engine: a naive hook loop (one full forward per pair,
continuation and head) for records, the Python API for options (itself checked against naive loops
elsewhere), and an uninterrupted scan for checkpoints. The profiles (tests/conftest.py): "ci" bounds
and derandomises the examples, "deep" hunts with many more.
"""

import contextlib
import io
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import causalscan
from causalscan.cli import main
from causalscan.data.sweeps import Component
from causalscan.errors import RANGES

from naive import naive_continuation_effects, teacher_forced
from tolerance import assert_close

BASE = {"clean": "a b c d", "corrupt": "a b e d", "answer": "c", "wrong": "e"}
MODEL = "random:llama-tiny"


def run(argv: list[str]) -> tuple[int, str, str]:
    """``causalscan argv`` in process: (exit status, stdout, stderr); argparse's exits count too."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: usage and one error line, exit 2
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def assert_clean_failure(rc: int, err: str) -> None:
    """Exit 2 with one error line (ours, or argparse's last line), no traceback."""
    assert rc == 2, f"exit {rc}:\n{err}"
    assert "Traceback" not in err, err
    ours = [line for line in err.splitlines() if line.startswith("causalscan: error:")]
    argparse_line = err.strip().splitlines()[-1] if err.strip() else ""
    assert len(ours) == 1 or ours == [] and ": error: argument" in argparse_line, err


# ---------------------------------------------------------------- records

ODD = ["\ud800", "\udfff", "\x00", "\u202e", "\ufeff", "🙂", "\n", "", " ", "<bos>", "a\u0301", "ｃ"]
text = st.one_of(st.sampled_from(ODD), st.text(max_size=8), st.sampled_from(["a", "b", "c", "e", "d", " c"]))
plausible = st.sampled_from(
    [
        "a b c d",
        "a b e d",
        "e b c d",
        "a b",
        "a b c d e",
        "c",
        " c",
        "e",
        "d e",
        "c d",
        [5],
        [5, 6],
        [1, 5, 6, 7],
        [1, 9, 6, 7],
        3,
        7,
        True,
        False,
        "b",
        {"X": 1},
    ]
)
hostile = st.one_of(
    text,
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 5, 511, 512, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(st.one_of(st.integers(-3, 600), st.booleans()), max_size=6),
    st.lists(text, max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-2, 6), max_size=2),
)
value = st.one_of(plausible, hostile)  # half the values could be right, so both outcomes come up
FIELDS = ["clean", "corrupt", "answer", "wrong", "clean_ids", "corrupt_ids", "noise_span", "positions", "chat", "extra"]


@st.composite
def record_line(draw) -> bytes:
    """One JSONL line: the base record with one to three fields set, deleted or retyped; or raw bytes."""
    if draw(st.integers(0, 9)) == 9:  # (hypothesis leans to small integers: the rare case is the large one)
        return draw(st.binary(max_size=40)).replace(b"\n", b" ")
    rec = dict(BASE)
    for field in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=2, unique=True)):
        if field in rec and draw(st.booleans()):
            del rec[field]
        else:
            rec[field] = draw(value)
    if draw(st.integers(0, 9)) == 9:
        return json.dumps(list(rec.values())).encode()  # a line that is JSON but not an object
    return json.dumps(rec).encode()  # ensure_ascii: lone surrogates travel as \ud800 escapes


def naive_metric(model, pair, metric="logit_diff") -> float:
    """The clean run's metric of one pair, teacher-forced over its continuations, plain forwards."""
    conts = [(pair.answer, 1.0)] + ([(pair.wrong, -1.0)] if metric == "logit_diff" else [])
    total = 0.0
    for cont, sign in conts:
        logits = model.hf(input_ids=torch.tensor([pair.clean + cont[:-1]])).logits[0]
        total += sign * teacher_forced(logits, len(pair.clean), cont).item()
    return total


@settings(max_examples=4 * settings().max_examples)  # about 40 ms each, and most are refused
@given(lines=st.lists(record_line(), min_size=1, max_size=2), keep_base=st.booleans())
def test_generated_records_exit_0_with_the_naive_result_or_exit_2(lines, keep_base):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.jsonl"
        path.write_bytes(b"\n".join(([json.dumps(BASE).encode()] if keep_base else []) + lines) + b"\n")
        rc, out, err = run(["patch", "--model", MODEL, "--data", str(path), "--sites", "head", "--json"])
        event(f"exit {rc}")  # --hypothesis-show-statistics: how often each outcome came up
        if rc != 0:
            assert_clean_failure(rc, err)
            return
        doc = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in --json"))
        ds = causalscan.Dataset.from_jsonl(path)
    if any("noise_span" in r for r in ds.records):  # Gaussian noise: the naive loop has no twin of the draws
        assert all(row["exact"] is not None for row in doc["components"])
        return
    model = causalscan.load(MODEL)
    pairs = ds.tokenize(model.tokenizer, model.vocab_size)
    comps = [Component("head", row["layer"], row["index"]) for row in doc["components"]]
    with torch.no_grad():
        patched = naive_continuation_effects(model, ds.records, comps)  # [P, n]
        clean = torch.tensor([naive_metric(model, p) for p in pairs])
    ref = (patched - clean[:, None]).mean(0)  # ~0 by cancellation when clean == corrupt: scale by the terms
    scale = max(patched.abs().max().item(), clean.abs().max().item())
    assert_close(torch.tensor([row["exact"] for row in doc["components"]]), ref, scale=scale)


# ---------------------------------------------------------------- options

NUMBERS = [
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1",
    "2",
    "3",
    "1e400",
    "-0",
    "0.5",
    "1e-30",
    "abc",
    "",
    "0x10",
    str(2**64),
    str(2**63 - 1),
    "100001",
    "1e5",
    "7",
]
option = st.one_of(
    st.sampled_from(NUMBERS),
    st.integers(-3, 12).map(str),
    st.integers(1, 4).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
PATCH_OPTIONS = ["--samples", "--noise-scale", "--top", "--seed", "--memory-budget-mb"]
SCAN_OPTIONS = ["--batch-size", "--confirm", "--confirm-random", "--fn-subsets", "--samples", "--noise-scale"]
RECORDS = [
    {"clean": "a b c d", "noise_span": "b", "answer": "d", "wrong": "c"},
    {"clean": "e b c a", "noise_span": "e b", "answer": "c", "wrong": "a"},
]


def _parsed(flag: str, text: str):
    """What the option means if argparse takes it (None if not): int for integer options."""
    integer = RANGES[flag[2:].replace("-", "_")][2] or flag == "--top"
    try:
        return int(text) if integer else float(text)
    except ValueError:
        return None


@given(command=st.sampled_from(["patch", "scan"]), data=st.data())
def test_generated_option_values_exit_0_with_the_api_result_or_exit_2(command, data):
    flags = data.draw(
        st.lists(
            st.sampled_from(PATCH_OPTIONS if command == "patch" else SCAN_OPTIONS), min_size=1, max_size=3, unique=True
        )
    )
    values = {f: data.draw(option) for f in flags}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
        argv = [command, "--model", MODEL, "--data", str(path), "--sites", "head", "--json"]
        if command == "scan":
            argv += ["--fn-subsets", "0"] if "--fn-subsets" not in values else []
        rc, out, err = run(argv + [x for f, v in values.items() for x in (f, v)])
        event(f"exit {rc}")
    kw = {f[2:].replace("-", "_"): _parsed(f, v) for f, v in values.items()}
    in_range = all(x is not None and _in_range(k, x) for k, x in kw.items())
    if rc != 0:
        assert_clean_failure(rc, err)
        assert not in_range, f"refused in-range options {values}: {err}"
        return
    assert in_range, f"accepted out-of-range options {values}"
    doc = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in --json"))
    api = {k: v for k, v in kw.items() if k != "top"}
    if "memory_budget_mb" in api:
        api["memory_budget"] = api.pop("memory_budget_mb") << 20
    fn = causalscan.patch if command == "patch" else causalscan.scan
    ref = fn(causalscan.load(MODEL), RECORDS, sites="head", **({"fn_subsets": 0} | api if command == "scan" else api))
    got = {row["component"]: row for row in doc["components"]}
    want = {row["component"]: row for row in ref.to_json(top=kw.get("top", 50))["components"]}
    assert got.keys() == want.keys()
    for name in want:
        for key in ("exact", "score", "estimate"):
            if key in want[name] and want[name][key] is not None:
                assert torch.isfinite(torch.tensor(got[name][key])), (name, key, values)
                assert_close(torch.tensor(got[name][key]), torch.tensor(want[name][key]))


def _in_range(name: str, x) -> bool:
    lo, hi, integer, open_lo = RANGES[name]
    if isinstance(x, float) and not math.isfinite(x):
        return False
    return (lo is None or (x > lo if open_lo else x >= lo)) and (hi is None or x <= hi)


# ---------------------------------------------------------------- checkpoints

SCAN = ["scan", "--model", "induction", "--sites", "head", "--batch-size", "4", "--confirm", "2", "--json"]


@pytest.fixture(scope="module")
def partial_checkpoint(tmp_path_factory):
    """The checkpoint of a scan interrupted (Ctrl-C) after two of four batches, and the scores of the
    uninterrupted scan."""
    from causalscan.patching import attribution

    root = tmp_path_factory.mktemp("ck")
    data = str(causalscan.zoo.dataset_path("induction", "previous"))
    rc, _, err = run([*SCAN, "--data", data, "--out", str(root / "full")])
    assert rc == 0, err
    real, calls = attribution.attribute, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attribution, "attribute", interrupted)
        assert run([*SCAN, "--data", data, "--out", str(root / "cut")])[0] == 130
    raw = (root / "cut" / "scan.partial.safetensors").read_bytes()
    return data, raw, (root / "full" / "scores.safetensors").read_bytes()


damage = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9), st.just(0)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**9), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("append"), st.just(0), st.binary(min_size=1, max_size=16)),
)


@given(how=damage)
def test_corrupted_checkpoint_bytes_never_change_the_result(partial_checkpoint, how):
    """Any byte-level damage: the rerun exits 0 with the uninterrupted scan's scores, bit for bit
    (resumed when the damage left the file's meaning intact, set aside and started afresh otherwise)."""
    from safetensors.torch import load

    data, raw, full = partial_checkpoint
    kind, at, what = how
    b = bytearray(raw)
    at %= len(b)
    if kind == "flip":
        b[at] ^= what
    elif kind == "truncate":
        del b[at:]
    elif kind == "overwrite":
        b[at : at + len(what)] = what
    else:
        b += what
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "scan.partial.safetensors").write_bytes(bytes(b))
        rc, _, err = run([*SCAN, "--data", data, "--out", d])
        assert rc == 0 and "Traceback" not in err, err
        event("set aside" if "set aside" in err else "resumed" if "resuming" in err else "ignored (not this job's)")
        got, want = load((Path(d) / "scores.safetensors").read_bytes()), load(full)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), how
        shutil.rmtree(d, ignore_errors=True)
