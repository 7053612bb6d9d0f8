"""The documentation runs: every ``>>>`` example in the package's docstrings (doctest); every Python
snippet of the README and docs/ is in an ``examples/`` file (line by line, in order), and every
example runs; every ``causalscan`` line of their shell blocks parses, and runs in order per page
(a block after ``<!-- parsed, not run: REASON -->`` only parses)."""

import doctest
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMOLLM2, smollm2_file

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"engine": "causalscan", "bindings": "causalscan.bindings", "triton_src": "causalscan.kernels"}
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


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!-- parsed, not run: [^>]+ -->\s*$")


def _blocks(lang: str) -> list[tuple[str, int, str, bool]]:
    """``(page, k, text, run)`` of every ````lang`` block of the README and docs/; ``run`` is False after
    a ``<!-- parsed, not run: REASON -->`` line."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for k, m in enumerate(re.finditer(rf"```{lang}\n(.*?)```", text, flags=re.S)):
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            out.append((str(page.relative_to(ROOT)), k, m.group(1), not NOT_RUN.search(before)))
    return out


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def _in_order(needle: list[str], hay: list[str]) -> bool:
    it = iter(hay)
    return all(any(line == h for h in it) for line in needle)


@pytest.mark.parametrize("page,k,snippet", [pytest.param(*b[:3], id=f"{b[0]}-{b[1]}") for b in _blocks("python")])
def test_python_snippet_is_an_example(page, k, snippet):
    """Every Python snippet of the README and docs/ is lines of an examples/ file (in order), which
    test_example_runs runs."""
    lines = _lines(snippet)
    files = sorted((ROOT / "examples").glob("*.py"))
    assert any(_in_order(lines, _lines(f.read_text())) for f in files), (
        f"{page} snippet {k} not found (line by line, in order) in any examples/*.py:\n" + "\n".join(lines)
    )


@pytest.mark.parametrize(
    "page", [*PAGES, ROOT / "CONTRIBUTING.md", ROOT / "bench" / "README.md"], ids=lambda p: str(p.relative_to(ROOT))
)
def test_relative_links_resolve(page):
    """Every relative link of the README, docs/, CONTRIBUTING and bench/README names a file that exists."""
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text())
    missing = [link for link in links if not link.startswith("http") and not (page.parent / link).exists()]
    assert not missing, missing


def _commands(block: str, gguf: str = "GGUF") -> list[list[str]]:
    """The ``causalscan`` command lines of a shell block, split as the shell would (``$GGUF`` replaced)."""
    return [
        shlex.split(line.replace("$GGUF", gguf), comments=True)[1:]
        for line in block.splitlines()
        if line.startswith("causalscan ")
    ]


@pytest.mark.parametrize("page,k,block", [pytest.param(*b[:3], id=f"{b[0]}-{b[1]}") for b in _blocks("bash")])
def test_shell_commands_parse(page, k, block):
    """Every ``causalscan`` line of the README and docs/ is a command line the CLI accepts."""
    from causalscan.cli import parser

    for argv in _commands(block):
        try:
            parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page} block {k}: the CLI refuses `causalscan {' '.join(argv)}`")


def _runnable() -> list:
    pages: dict[str, list[str]] = {}
    for page, _, block, run in _blocks("bash"):
        if run and _commands(block):
            pages.setdefault(page, []).append(block)
    return [
        pytest.param(page, blocks, marks=[pytest.mark.real] if any("$GGUF" in b for b in blocks) else [], id=page)
        for page, blocks in pages.items()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("page,blocks", _runnable())
def test_shell_commands_run(page, blocks, tmp_path):
    """The ``causalscan`` lines of each page run in order, as a user would type them, in a fresh
    directory holding examples/ (exit 0 each; a page's later lines read what its earlier ones wrote)."""
    gguf = smollm2_file()
    if any("$GGUF" in b for b in blocks) and gguf is None:
        pytest.skip(f"needs the real model: {SMOLLM2}")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    for block in blocks:
        for argv in _commands(block, str(gguf)):
            if "--ray" in argv and importlib.util.find_spec("ray") is None:
                continue  # the ray extra is not installed here
            res = subprocess.run(
                [sys.executable, "-m", "causalscan", *argv],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert res.returncode == 0, f"{page}: causalscan {' '.join(argv)}\n{res.stderr[-3000:]}"


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
