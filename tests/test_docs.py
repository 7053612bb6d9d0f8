"""The documentation runs: every ``>>>`` example in the package's docstrings (doctest), every README
Python snippet is in an ``examples/`` file (line by line, in order), and every example runs."""

import doctest
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMOLLM2, smollm2_file

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"engine": "causalscan", "bindings": "causalscan.bindings", "kernels": "causalscan.kernels"}
SLOW = {
    "causalscan",
    "causalscan.patching.tracing",
    "causalscan.steering.elicit",
    "causalscan.patching.scan",
}  # > 5 s of doctests each


def _modules() -> list[str]:
    out = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if ">>>" in path.read_text():
                parts = path.relative_to(ROOT / folder).with_suffix("").parts
                out.append(".".join([package, *parts]).removesuffix(".__init__"))
    return out


@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m for m in _modules()])
def test_docstring_examples_run(name):
    res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0, f"{res.failed} of {res.attempted} examples failed in {name}"


def _readme_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def _in_order(needle: list[str], hay: list[str]) -> bool:
    it = iter(hay)
    return all(any(line == h for h in it) for line in needle)


@pytest.mark.parametrize("k", range(len(_readme_snippets())))
def test_readme_snippet_is_an_example(k):
    snippet = _lines(_readme_snippets()[k])
    files = sorted((ROOT / "examples").glob("*.py"))
    assert any(_in_order(snippet, _lines(f.read_text())) for f in files), (
        "README snippet not found (line by line, in order) in any examples/*.py:\n" + "\n".join(snippet)
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "example",
    [
        pytest.param(p.name, marks=pytest.mark.real) if p.name.startswith("real_") else p.name
        for p in sorted((ROOT / "examples").glob("*.py"))
    ],
)
def test_example_runs(example, tmp_path):
    if example.startswith("real_") and smollm2_file() is None:
        pytest.skip(f"needs the real model: {SMOLLM2}")
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the examples read examples/ioi.jsonl, write out/
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip(), "an example prints what it found"
