"""Scale-out on a real local Ray cluster (``ray start --head`` on 127.0.0.1, stopped at the end):
scan, patch, trace and circuit through Ray's actors equal the single-process results bit for bit
(both with one torch thread per process); an actor killed with SIGKILL halfway through a scan
gives the same result; a driver killed with SIGKILL resumes from its checkpoint."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import causalscan as cs

from tolerance import assert_close, assert_identical

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'causalscan[ray]'")
from causalscan.errors import InputError  # noqa: E402
from causalscan.executor import Ray  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU Ray head on 127.0.0.1, its address; stopped at the end."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    address = f"127.0.0.1:{_free_port()}"
    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a private cluster on this machine (its drivers inherit this)
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={address.split(':')[1]}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    try:
        ray.init(address=address, log_to_driver=False)
        yield address
    finally:
        ray.shutdown()
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)
        if before is None:
            os.environ.pop("RAY_AUTH_MODE")
        else:
            os.environ["RAY_AUTH_MODE"] = before


@pytest.fixture(scope="module")
def pool(cluster):
    """Two actors of one CPU and one torch thread each, shared by the module's tests."""
    with Ray(cluster, actors=2) as ex:
        yield ex


def release(pool: Ray) -> None:
    """Stop the pool's actors and wait until Ray has their CPUs back."""
    pool.close()
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture
def one_thread():
    """The single-process reference runs with the actors' thread count: one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


INDUCTION = cs.zoo.dataset_path("induction", "previous")


def test_scan_through_ray_is_the_single_process_scan(pool, one_thread):
    model = cs.load("induction")
    kw = dict(sites=["head", "neuron", "resid_pre", "q"], confirm=8, exact_budget=0, batch_size=4, fn_subsets=6)
    here, there = cs.scan(model, INDUCTION, **kw), cs.scan(model, INDUCTION, executor=pool, **kw)
    assert_identical(here.tensors(), there.tensors())
    assert str(here.agreement) == str(there.agreement) and str(here.false_negatives) == str(there.false_negatives)


def test_patch_and_trace_through_ray(pool, one_thread):
    model = cs.load("induction")
    assert_identical(
        cs.patch(model, INDUCTION, sites=["head", "head:pos", "mlp_out"]).tensors(),
        cs.patch(model, INDUCTION, sites=["head", "head:pos", "mlp_out"], executor=pool).tensors(),
    )
    facts = cs.load("facts")
    with open(cs.zoo.dataset_path("facts", "subjects")) as f:
        data = [json.loads(line) for line in f][:8]  # Gaussian-noise rows
    kw = dict(window=2, samples=3)
    here, there = cs.trace(facts, data, **kw), cs.trace(facts, data, executor=pool, **kw)
    assert_identical(here.tensors(), there.tensors())


def test_circuit_estimate_through_ray(pool, one_thread):
    model = cs.load("induction")
    kw = dict(method="eap-ig", ig_steps=2, batch_size=3, confirm=4, curve=False)
    here, there = cs.circuit(model, INDUCTION, **kw), cs.circuit(model, INDUCTION, executor=pool, **kw)
    assert_identical(here.tensors(), there.tensors())


def test_an_actor_killed_halfway_is_restarted_and_the_result_is_the_same(pool, one_thread):
    model = cs.load("induction")
    kw = dict(sites=["head", "neuron"], confirm=4, exact_budget=0, batch_size=1)  # 16 attribution units
    pids = pool.pids()
    killed = []

    def progress(stage, done, total):
        if stage == "attribution" and done == total // 2 and not killed:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(done)

    there = cs.scan(model, INDUCTION, executor=pool, progress=progress, **kw)
    assert killed
    new = pool.pids()
    assert new[0] != pids[0] and new[1] == pids[1]  # restarted by Ray
    assert_identical(cs.scan(model, INDUCTION, **kw).tensors(), there.tensors())


def test_audit_through_ray_is_the_single_process_audit(pool, one_thread):
    """Units on two actors (the radius rule cached per actor, sampling seeded per unit): the same
    vectors, completions, modes and ranking as one process."""
    kw = dict(n=4, layers=[0, 1], radii=(0.5, 1.0), max_new_tokens=4)
    here, there = cs.audit("backdoor", **kw), cs.audit("backdoor", executor=pool, **kw)
    assert_identical(
        {"v": here.vectors, "t": here.tokens, "r": here.radius},
        {"v": there.vectors, "t": there.tokens, "r": there.radius},
    )
    assert here.modes == there.modes and here.ranking == there.ranking


def test_a_model_split_across_devices_is_refused(pool):
    split = cs.load("induction", device_map={"model": "cpu", "lm_head": "cpu"})
    with pytest.raises(InputError, match="split across devices"):
        cs.patch(split, INDUCTION, sites=["head"], executor=pool)


DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    import causalscan as cs
    from causalscan.executor import Ray

    torch.set_num_threads(1)

    def progress(stage, done, total):
        if stage == "attribution" and done == 5:
            os.kill(os.getpid(), signal.SIGKILL)  # the driver dies mid-run, its checkpoint on disk

    with Ray(sys.argv[1], actors=2) as ex:
        cs.scan("induction", cs.zoo.dataset_path("induction", "previous"), sites="head,neuron", confirm=4,
                exact_budget=0, batch_size=2, checkpoint=sys.argv[2], checkpoint_every_s=0, progress=progress,
                executor=ex)
""")


def test_a_killed_driver_resumes_from_its_checkpoint(cluster, pool, one_thread, tmp_path):
    release(pool)  # the cluster's 2 CPUs go to the driver's actors (the pool starts its own again after)
    out = tmp_path / "out"
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    log = tmp_path / "driver.log"  # a file, not a pipe: processes Ray forked from the driver may outlive it
    with open(log, "w") as f:
        rc = subprocess.run(
            [sys.executable, "-c", DRIVER, cluster, str(out)], env=env, stdout=f, stderr=f, timeout=300
        ).returncode
    assert rc == -signal.SIGKILL, log.read_text()[-2000:]
    from safetensors import safe_open

    with safe_open(str(out / "scan.partial.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["done"]) == [0, 1, 2, 3, 4]
    seen = []
    kw = dict(sites="head,neuron", confirm=4, exact_budget=0, batch_size=2)
    resumed = cs.scan(
        "induction",
        INDUCTION,
        checkpoint=out,
        executor=pool,
        progress=lambda s, d, t: seen.append(d) if s == "attribution" else None,
        **kw,
    )
    assert seen[0] == 6  # units 0-4 came from the file
    assert_identical(cs.scan("induction", INDUCTION, **kw).tensors(), resumed.tensors())
    assert not (out / "scan.partial.safetensors").exists()


def test_cli_scan_with_ray(cluster, pool, tmp_path):
    release(pool)
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    args = [
        "-m",
        "causalscan",
        "scan",
        "--model",
        "induction",
        "--sites",
        "head",
        "--exact-budget",
        "0",
        "--confirm",
        "4",
        "--json",
    ]
    with_ray = subprocess.run(
        [sys.executable, *args, "--ray", cluster, "--actors", "2"], env=env, capture_output=True, text=True, timeout=300
    )
    assert with_ray.returncode == 0, with_ray.stderr[-2000:]
    assert "ray: 2 actors" in with_ray.stderr
    doc = json.loads(with_ray.stdout)
    assert doc["agreement"]["recall_at_k"] == 1.0 and len(doc["components"]) == 4
    bad = subprocess.run([sys.executable, *args, "--actors", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--actors needs --ray" in bad.stderr
    too_many = subprocess.run(
        [sys.executable, *args, "--ray", cluster, "--actors", "3"], env=env, capture_output=True, text=True, timeout=300
    )
    assert too_many.returncode == 2 and "3 actors need 3 CPUs; the Ray cluster has 2 free" in too_many.stderr


@pytest.mark.gpu
def test_two_actors_sharing_one_gpu_equal_one_actor(cluster, pool):
    """Half a GPU each (the driver's model on the CPU; each actor moves its copy to cuda)."""
    release(pool)
    model = cs.load("induction")
    kw = dict(sites=["head", "neuron", "resid_pre"], confirm=8, exact_budget=0, batch_size=4)
    with Ray(cluster, actors=1, gpus_per_actor=1) as one:
        a = cs.scan(model, INDUCTION, executor=one, **kw).tensors()
    with Ray(cluster, actors=2, gpus_per_actor=0.5) as two:
        b = cs.scan(model, INDUCTION, executor=two, **kw).tensors()
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert_close(b[k].cpu(), a[k].cpu(), msg=k)  # same kernels; the parts added in the same order
