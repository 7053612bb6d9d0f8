import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest  # noqa: E402
import torch  # noqa: E402

FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi", "phi3",
            "opt")

IOI = [
    {"clean": "When Mary and John went to the store , John gave a drink to",
     "corrupt": "When Mary and John went to the store , Mary gave a drink to", "answer": "Mary", "wrong": "John"},
    {"clean": "When Alice and Bob went to the park , Bob gave a ball to",
     "corrupt": "When Alice and Bob went to the park , Alice gave a ball to", "answer": "Alice", "wrong": "Bob"},
    {"clean": "When Carol and Dave went to the bank , Dave gave a key to",
     "corrupt": "When Carol and Dave went to the bank , Carol gave a key to", "answer": "Carol", "wrong": "Dave"},
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
