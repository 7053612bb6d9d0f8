"""Sentiment steering on the real tier: SmolLM2-135M-Instruct, chat prompts asking for a positive or a
negative review of 12 items; the difference of means at every layer (last token), then, on neutral
review prompts, the dose-response over alpha of the next word's sentiment, and the KL of the
next-token distribution on the neutral prompts.

Every prompt is the chat turn followed by the start of the answer, "The <item> is", so the next
word is the verdict. Sentiment score = logsumexp of log p over a fixed positive word list minus the
same over a negative list (first token of each word). The layer is chosen on the first 6 items
(largest score change at alpha 1 under KL 1.0); the curve is measured on the other 6.

    python bench/bench_directions.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
ITEMS = ["phone", "movie", "restaurant", "book", "laptop", "hotel", "game", "camera", "album", "car", "chair", "coffee"]
POSITIVE = [" great", " excellent", " amazing", " wonderful", " fantastic", " perfect"]
NEGATIVE = [" terrible", " awful", " horrible", " disappointing", " poor", " bad"]
ALPHAS = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


def cross_check() -> dict:
    """The zoo backdoor: cosine of the trigger's difference of means (16 trigger/decoy pairs) with the
    vectors `elicit` (DCT, 64 vectors, no labels) finds, at the same residual (DCT's source block
    output = resid_pre of the next layer): the vectors that surface the phrase against the random ones."""
    import causalscan as cs

    model = cs.load("backdoor")
    pairs = cs.Dataset.from_jsonl(cs.zoo.dataset_path("backdoor")).records
    res = cs.directions(model, [r["clean"] for r in pairs], [r["corrupt"] for r in pairs])
    el = cs.elicit(model, method="dct", n=64)
    d = res.diff_means[el.source + 1]
    cos = torch.cosine_similarity(el.vectors, d[None], dim=-1)
    rand = torch.cosine_similarity(el.random, d[None], dim=-1)
    hits = el.hits("learned")
    out = {
        "source": el.source,
        "hit_vectors": hits,
        "cosine_of_hits": cos[hits].tolist(),
        "max_abs_cosine_learned": cos.abs().max().item(),
        "max_abs_cosine_random": rand.abs().max().item(),
    }
    print(
        f"backdoor: DCT hit vectors {hits}, cosine with the trigger direction {out['cosine_of_hits']}; "
        f"random vectors at most {out['max_abs_cosine_random']:.3f}",
        flush=True,
    )
    return out


def main() -> None:
    from bench_smollm2 import checkpoint

    import causalscan as cs
    from causalscan.data.prompts import chat_text
    from causalscan.steering.selection import kl_divergence, steered_logprobs

    model = cs.load(checkpoint())
    tok = model.tokenizer

    def prompt(ask: str, item: str) -> list[int]:
        text = chat_text(tok, ask.format(item=item)) + f"The {item} is"
        return tok(text, add_special_tokens=False).input_ids

    pos_ids = [tok(w, add_special_tokens=False).input_ids[0] for w in POSITIVE]
    neg_ids = [tok(w, add_special_tokens=False).input_ids[0] for w in NEGATIVE]

    def sentiment(lp: torch.Tensor) -> torch.Tensor:  # [K, N, V] -> [K]
        return (lp[..., pos_ids].logsumexp(-1) - lp[..., neg_ids].logsumexp(-1)).mean(-1)

    t0 = time.perf_counter()
    pos = [prompt("Write a glowing, positive review of a {item}.", i) for i in ITEMS]
    neg = [prompt("Write a scathing, negative review of a {item}.", i) for i in ITEMS]
    res = cs.directions(model, pos, neg)
    t_dir = time.perf_counter() - t0
    neutral = [prompt("Write a review of a {item}.", i) for i in ITEMS]
    dev, test = neutral[:6], neutral[6:]
    n_layers = model.adapter.n_layers
    units, norms = res.unit(), res.diff_means.norm(dim=-1)
    layers = torch.arange(n_layers)
    base_dev = steered_logprobs(model, dev, units, "none")
    add_dev = steered_logprobs(model, dev, units, "add", layers, norms)
    gain, kl = sentiment(add_dev) - sentiment(base_dev), kl_divergence(base_dev, add_dev)
    ok = kl <= 1.0
    layer = int(torch.where(ok, gain, torch.tensor(-1e9)).argmax())
    base = steered_logprobs(model, test, units, "none")
    curve = []
    for a in ALPHAS:
        lp = steered_logprobs(
            model, test, units[layer : layer + 1], "add", torch.tensor([layer]), torch.tensor([a * norms[layer].item()])
        )
        curve.append({"alpha": a, "sentiment": sentiment(lp).item(), "kl": kl_divergence(base, lp).item()})
        print(f"alpha {a:+.1f}  sentiment {curve[-1]['sentiment']:+.3f}  KL {curve[-1]['kl']:.3f}", flush=True)
    doc = {
        "model": "SmolLM2-135M-Instruct",
        "items": len(ITEMS),
        "layer": layer,
        "per_layer": {"gain_at_alpha_1": gain.tolist(), "kl_at_alpha_1": kl.tolist()},
        "baseline_sentiment": sentiment(base).item(),
        "curve": curve,
        "directions_s": t_dir,
        "total_s": time.perf_counter() - t0,
        "machine": {
            "device": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    doc["backdoor_cross_check"] = cross_check()
    out = ROOT / "bench" / "results" / f"directions-smollm2-cpu-{platform.machine()}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"layer {layer}; wrote {out}")


if __name__ == "__main__":
    main()
