"""The layout's rules hold and the check that enforces them fails where it should: an import back
up a layer, an import a folder's ``May import:`` line does not allow, a cycle, and triton in engine/."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tools" / "check_imports.py"


def check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), "--root", str(root)], capture_output=True, text=True)


@pytest.fixture
def tree(tmp_path):
    """A copy of the package's sources."""
    for folder in ("engine", "triton_src", "bindings"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("models", "__pycache__"))
    return tmp_path


def test_the_tree_keeps_its_rules():
    res = check(ROOT)
    assert res.returncode == 0, res.stdout


def test_no_engine_module_is_longer_than_350_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "engine").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 350
    }
    assert not long, long


@pytest.mark.parametrize(
    "module,line,says",
    [
        ("model/runner.py", "from causalscan.patching import scan", "model imports patching"),  # back up a layer
        ("data/sweeps.py", "from causalscan import memplan", "data imports memplan"),  # not on the folder's line
        ("errors.py", "import causalscan.files", "errors imports files"),  # a top-level module's rule
        ("patching/exact.py", "import triton", "reaches kernels through causalscan.bindings"),
    ],
)
def test_the_check_names_an_import_its_rules_refuse(tree, module, line, says):
    path = tree / "engine" / module
    path.write_text(path.read_text() + f"\n\ndef _late():\n    {line}\n")  # inside a function: still an arrow
    res = check(tree)
    assert res.returncode == 1 and says in res.stdout and f"engine/{module}:" in res.stdout, res.stdout


def test_the_check_finds_a_cycle(tree):
    """Two folders whose rules allow each other, importing each other: each arrow allowed, the loop not."""
    for folder, other, module in (("report", "data", "page.py"), ("data", "report", "prompts.py")):
        init = tree / "engine" / folder / "__init__.py"
        init.write_text(init.read_text().replace("May import: base", f"May import: base, {other}"))
        path = tree / "engine" / folder / module
        path.write_text(path.read_text() + f"\n\ndef _late():\n    from causalscan import {other}\n")
    res = check(tree)
    assert res.returncode == 1 and "a cycle between rooms" in res.stdout, res.stdout
    assert "imports" not in res.stdout.replace("a cycle", ""), res.stdout  # no rule broken: the cycle alone


def test_a_folder_without_its_rule_is_refused(tree):
    init = tree / "engine" / "steering" / "__init__.py"
    init.write_text('"""Directions and steering."""\n')
    res = check(tree)
    assert res.returncode != 0 and "May import:" in (res.stdout + res.stderr)


def test_a_top_level_module_without_its_rule_is_refused(tree):
    (tree / "engine" / "helpers.py").write_text('"""A module the check has no rule for."""\n')
    res = check(tree)
    assert res.returncode != 0 and "engine/helpers.py: a top-level module with no rule" in (res.stdout + res.stderr)
