"""``induction``: a 2-layer Llama trained on repeated random word sequences.

The only way to predict the second copy of a random sequence is in-context: a previous-token head
in layer 0 writes "my previous token was x" into each position, and an induction head in layer 1
attends from the current token to the position after its earlier occurrence and copies that token.
The card names these heads from attention-pattern scores and confirms them by mean-ablation.
"""

from __future__ import annotations

import torch
import transformers

from causalscan.model.vocab import NAMES, SPECIALS, WORDS, word_tokenizer
from causalscan.zoo.training import masked_loss, n_params, save, train_new, without_replacement

TOKENS = tuple(dict.fromkeys(w for w in (*NAMES, *WORDS) if w.isalpha()))
FIRST = len(SPECIALS)  # id of the first ordinary token
SEQ = 48  # training length, bos included
N_EVAL = 12  # length of the repeated sequence in measurements and the dataset
THRESHOLD = 0.4  # attention score that names a head
STEPS, BATCH, LR = 1500, 64, 3e-3
SHORT_STEPS = 300


def tokenizer():
    return word_tokenizer((*SPECIALS, *TOKENS))


def config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=len(SPECIALS) + len(TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        attn_implementation="eager",
        tie_word_embeddings=False,
        initializer_range=0.05,
    )


def sample(gen: torch.Generator, batch: int, max_n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """``bos, prefix, X, X, suffix`` with X of 2-``max_n`` distinct words at a random offset; the loss is
    on the second copy of X (all but its first word). ids [B, SEQ], mask [B, SEQ-1]."""
    vocab = FIRST + len(TOKENS)
    words = without_replacement(gen, batch, SEQ - 1, FIRST, vocab)
    ids = torch.full((batch, SEQ), 1)
    mask = torch.zeros(batch, SEQ - 1, dtype=torch.bool)
    ns = torch.randint(2, max_n + 1, (batch,), generator=gen)
    for b, n in enumerate(ns.tolist()):
        p = int(torch.randint(0, SEQ - 2 * n, (1,), generator=gen))
        x = words[b, p : p + n]
        ids[b, 1:] = torch.cat([words[b, :p], x, x, words[b, p + n : SEQ - 1 - n]])
        start = 1 + p + n  # position of the second copy's first word
        mask[b, start : start + n - 1] = True  # predictions made at start .. start+n-2
    return ids, mask


def curriculum(short_steps: int = SHORT_STEPS):
    """A sampler of sequences of 2-5 words for the first ``short_steps`` batches, then 2-20. Without the
    short phase some seeds settle on a shortcut: RoPE's fastest rotation (1 rad per token) makes
    offsets 1 and 7 look alike, and heads at offsets 6 and 7 give a "skip" induction that fails
    for short sequences."""
    step = 0

    def draw(gen: torch.Generator, batch: int):
        nonlocal step
        step += 1
        return sample(gen, batch, 5 if step <= short_steps else 20)

    return draw


def eval_batch(rows: int = 256, seed: int = 1234) -> torch.Tensor:
    """``bos, X, X`` with ``|X| = N_EVAL``: [rows, 1 + 2 N_EVAL]."""
    gen = torch.Generator().manual_seed(seed)
    x = without_replacement(gen, rows, N_EVAL, FIRST, FIRST + len(TOKENS))
    return torch.cat([torch.ones(rows, 1, dtype=torch.long), x, x], dim=1)


@torch.no_grad()
def measure(model, rows: int = 256) -> dict:
    """Attention scores, in-context loss and per-head mean-ablation losses on fresh repeated sequences.

    prev_token[l][h]: mean attention from t to t-1 (t >= 2).
    induction[l][h]:  mean attention from the second copy's i-th word to the first copy's (i+1)-th.
    loss_repeated:    next-word loss on the second copy (all but its first word); loss_first is the
                      first copy's, where nothing predicts the next word (chance: ln |vocab| = 5.0).
    ablated[l][h]:    loss_repeated with head (l, h) mean-ablated (batch mean per position);
                      ablated_mlp[l] the same for layer l's MLP output.
    """
    from causalscan.model import interventions as iv
    from causalscan.model import runner

    ad, n = model.adapter, N_EVAL
    ids = eval_batch(rows).to(model.device)
    out = model.hf(input_ids=ids, output_attentions=True)
    att = torch.stack(out.attentions)  # [L, B, H, T, T]
    t = torch.arange(2, 1 + 2 * n)
    prev = att[:, :, :, t, t - 1].mean(dim=(1, 3))
    q = torch.arange(n + 1, 2 * n)  # second copy, words 1 .. n-1
    induction = att[:, :, :, q, q - n + 1].mean(dim=(1, 3))

    def loss(logits):
        return _repeated_loss(logits, ids)

    base, first = loss(out.logits), masked_loss(out.logits, ids, _span(ids, 1, n)).item()
    sites = [(s, layer) for layer in range(ad.n_layers) for s in ("head", "mlp_out")]
    _, acts, _ = runner.run_with_cache(ad, ids, sites)
    ablated, ablated_mlp = torch.zeros(ad.n_layers, ad.n_heads), torch.zeros(ad.n_layers)
    for layer in range(ad.n_layers):
        means = acts[("head", layer)].mean(0, keepdim=True)
        for h in range(ad.n_heads):
            ablated[layer, h] = loss(iv.perturb(model, iv.mean("head", means, layers=layer, index=h), input_ids=ids))
        mean_mlp = acts[("mlp_out", layer)].mean(0, keepdim=True)
        ablated_mlp[layer] = loss(iv.perturb(model, iv.mean("mlp_out", mean_mlp, layers=layer), input_ids=ids))
    return {
        "prev_token": prev.tolist(),
        "induction": induction.tolist(),
        "loss_repeated": base,
        "loss_first": first,
        "ablated": ablated.tolist(),
        "ablated_mlp": ablated_mlp.tolist(),
    }


def joint_ablation(model, heads: list[tuple[int, int]], rows: int = 256) -> float:
    """Repeated-half loss with all ``heads`` mean-ablated at once."""
    from causalscan.model import interventions as iv
    from causalscan.model import runner

    ad = model.adapter
    ids = eval_batch(rows).to(model.device)
    _, acts, _ = runner.run_with_cache(ad, ids, [("head", layer) for layer in range(ad.n_layers)])
    ivs = [iv.mean("head", acts[("head", layer)].mean(0, keepdim=True), layers=layer, index=h) for layer, h in heads]
    with torch.no_grad():
        return _repeated_loss(iv.perturb(model, *ivs, input_ids=ids), ids)


def _span(ids: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Loss mask [B, T-1] selecting the predictions made at positions ``start .. stop-1``."""
    mask = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=ids.device)
    mask[:, start:stop] = True
    return mask


def _repeated_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Next-word loss on the second copy of an :func:`eval_batch` row, all but its first word."""
    return masked_loss(logits, ids, _span(ids, N_EVAL + 1, 2 * N_EVAL)).item()


def named_heads(m: dict) -> dict[str, list[list[int]]]:
    """Heads whose score passes ``THRESHOLD``: previous-token heads in layer 0, induction heads above it."""
    prev = [[0, h] for h, s in enumerate(m["prev_token"][0]) if s >= THRESHOLD]
    ind = [
        [layer, h]
        for layer in range(1, len(m["induction"]))
        for h, s in enumerate(m["induction"][layer])
        if s >= THRESHOLD
    ]
    return {"previous_token": prev, "induction": ind}


def check(model, card: dict) -> list[str]:
    """Re-measure ``model`` and return the card's claims that do not hold (empty: all hold)."""
    m = measure(model)
    heads, crit, fails = card["components"], card["criteria"], []
    found = named_heads(m)
    for role in ("previous_token", "induction"):
        if not heads[role]:
            fails.append(f"card names no {role} head")
        if sorted(found[role]) != sorted(heads[role]):
            fails.append(f"{role} heads measured {found[role]}, card says {heads[role]}")
    if m["loss_repeated"] > crit["max_loss_repeated"]:
        fails.append(f"repeated-half loss {m['loss_repeated']:.3f} > {crit['max_loss_repeated']}")
    base, rises = m["loss_repeated"], {}
    for role in ("previous_token", "induction"):
        rises[role] = joint_ablation(model, [tuple(x) for x in heads[role]]) - base
        if rises[role] < crit["min_ablation_rise"]:
            fails.append(
                f"ablating the {role} heads raises the loss by {rises[role]:.3f} < {crit['min_ablation_rise']}"
            )
    limit = crit["max_other_rise_fraction"] * min(rises.values())
    named = {tuple(x) for role in ("previous_token", "induction") for x in heads[role]}
    for layer, row in enumerate(m["ablated"]):
        for h, loss in enumerate(row):
            if (layer, h) not in named and loss - base > limit:
                fails.append(
                    f"ablating other head {layer}.{h} raises the loss by {loss - base:.3f} > {limit:.3f} "
                    f"({crit['max_other_rise_fraction']} of the named heads' rise)"
                )
    for layer, loss in enumerate(m["ablated_mlp"]):
        if loss - base > limit:
            fails.append(f"ablating MLP {layer} raises the loss by {loss - base:.3f} > {limit:.3f}")
    return fails


def dataset(tok, pairs: int = 16, seed: int = 7, replace: str = "answer") -> list[dict]:
    """Symmetric pairs ``bos X X[:k]`` -> ``X[k]``. All prompts have 1 + N_EVAL + 6 tokens.

    ``replace="answer"``: the corrupt prompt replaces ``X[k]`` in the first copy by a word outside X
    (the answer induction then gives is ``wrong``); the previous-token heads see the same
    predecessor in both prompts, so only the induction path differs.
    ``replace="previous"``: the corrupt prompt replaces ``X[k-1]`` in the first copy, so the last
    word has no earlier occurrence and the previous-token heads write a different predecessor at
    the answer's position; ``wrong`` is ``X[k+1]``. Both heads of the circuit matter here.
    """
    gen = torch.Generator().manual_seed(seed)
    k = 6
    words = without_replacement(gen, pairs, N_EVAL + 1, 0, len(TOKENS))
    out = []
    for row in words.tolist():
        x, other = [TOKENS[i] for i in row[:N_EVAL]], TOKENS[row[N_EVAL]]
        at, wrong = (k, other) if replace == "answer" else (k - 1, x[k + 1])
        bad = [*x[:at], other, *x[at + 1 :]]
        out.append({"clean": " ".join(x + x[:k]), "corrupt": " ".join(bad + x[:k]), "answer": x[k], "wrong": wrong})
    return out


def train(out, seed: int = 0, steps: int = STEPS, quiet: bool = False):
    """Train, measure and write the ``induction`` directory to ``out``."""
    from causalscan.versions import versions

    tok, cfg = tokenizer(), config()
    model, recipe = train_new(
        transformers.LlamaForCausalLM, cfg, curriculum(), tok, steps=steps, batch=BATCH, lr=LR, seed=seed, quiet=quiet
    )
    hf = model.hf
    m = measure(model)
    heads = named_heads(m)
    base = m["loss_repeated"]
    card = {
        "name": "induction",
        "summary": "2-layer Llama with previous-token and induction heads, trained on repeated random words",
        "architecture": {
            "family": "llama",
            "n_layers": 2,
            "n_heads": 2,
            "d_head": 32,
            "d_model": 64,
            "d_mlp": 128,
            "vocab": cfg.vocab_size,
            "params": n_params(hf),
        },
        "training": {
            "recipe": "causalscan zoo train induction",
            **recipe,
            "data": f"bos + prefix + X + X + suffix, {SEQ} tokens, X = 2-5 (first {SHORT_STEPS} steps) then "
            "2-20 distinct random words at a random offset; loss on the second copy of X only",
        },
        "mechanism": "Layer-0 previous-token head(s) copy each word's predecessor into its position; layer-1 "
        "induction head(s) attend from a word to the position after its earlier occurrence (keys "
        "built from the previous-token head) and copy that word to the output.",
        "components": heads,
        "criteria": {
            "score_threshold": THRESHOLD,
            "max_loss_repeated": 0.3,
            "min_ablation_rise": 2.0,
            "max_other_rise_fraction": 0.25,
        },
        "metrics": {
            "loss_repeated": round(base, 4),
            "loss_first": round(m["loss_first"], 4),
            "prev_token_score": [[round(s, 3) for s in r] for r in m["prev_token"]],
            "induction_score": [[round(s, 3) for s in r] for r in m["induction"]],
            "ablated_loss": [[round(s, 3) for s in r] for r in m["ablated"]],
            "ablated_mlp_loss": [round(s, 4) for s in m["ablated_mlp"]],
            "joint_ablation_loss": {r: round(joint_ablation(model, [tuple(x) for x in heads[r]]), 3) for r in heads},
        },
        "verification": f"{N_EVAL}-word sequences repeated once, 256 rows, seed 1234; heads named where the score "
        f">= {THRESHOLD}; mean-ablation (batch mean per position) of each role's heads jointly must "
        "raise the repeated-half loss by min_ablation_rise; ablating any other single head, or "
        "either MLP, must raise it by at most max_other_rise_fraction of the smaller joint rise. "
        "With 2 heads per layer all four heads usually take part (both layer-0 heads attend to "
        "the previous token, both layer-1 heads do induction), so the MLPs are the control.",
        "scan_must_find": {"sweep": "head", "dataset": "induction", "top2": heads["induction"]},
        "datasets": {
            "induction": "symmetric pairs: the word after the first occurrence of the last word is "
            "replaced in the corrupt prompt; answer = clean continuation, wrong = corrupt one",
            "previous": "symmetric pairs: the word before the first occurrence of the answer is replaced in "
            "the corrupt prompt, so both the previous-token and the induction heads matter; "
            "wrong = the word after the answer",
        },
        "versions": versions(),
    }
    return save(out, hf, tok, card, {"induction": dataset(tok), "previous": dataset(tok, seed=8, replace="previous")})
