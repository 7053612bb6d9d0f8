"""The GPU run's script (bench/gpu.sh) at tiny sizes on the CPU: every step runs, every bench it
calls still fits the engine, and the figures it gathers agree with their references, so that a
GPU lent for minutes is not spent finding a broken call."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_script_runs_every_step_at_tiny_sizes(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "GPU_SMOKE": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }  # python3: this venv's
    done = subprocess.run(["bash", str(ROOT / "bench/gpu.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().split("\n")
    steps = {line.split()[0]: line.split()[1] for line in summary if line}
    assert steps == dict.fromkeys(["setup", "tests", "kernels", "scan", "patching", "dct"], "rc=0"), summary
    log = (tmp_path / "log.txt").read_text()
    assert "all cases run" in log  # bench_kernels --check: every kernel case against its reference
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        assert {"gpu-tests-cpu-smoke.xml", "scan-cpu-smoke.json", "elicit-cpu-smoke.json"} <= names, names
        patching = next(n for n in tar.getnames() if Path(n).name.startswith("patching-"))
        rows = json.load(tar.extractfile(patching))["rows"]
        scan = json.load(tar.extractfile(next(n for n in tar.getnames() if n.endswith("scan-cpu-smoke.json"))))
    # batched exact patching against one full forward per patch, on the same weights
    assert {r["sweep"] for r in rows} == {"head", "resid_pre"}
    assert all(r["max_abs_diff_naive"] <= 1e-5 * r["max_abs_naive"] for r in rows), rows
    assert {r["variant"] for r in scan["rows"]} == {"plain", "atp*-qk"}
    assert all(r["seconds"] > 0 for r in scan["rows"])


def test_an_unknown_step_is_refused(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "bench/gpu.sh"), "kernel"],
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "unknown step kernel" in done.stderr
