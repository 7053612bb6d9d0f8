"""``facts``: a 4-layer Llama that recalls synthetic subject -> attribute facts.

Subjects are made-up two-word names (``"Zorin Ashdown"``), each with a city, a job and a food drawn
at random; prompts are ``"<bos> Zorin Ashdown lives in"`` -> ``"Oslo"``. Nothing but memorisation
predicts the attribute, so recall must combine both subject words. The card gives the recall
accuracy and where recall is carried, by ROME-style causal tracing (Gaussian noise on the subject
embeddings, clean state / MLP / attention output restored at one token and layer at a time).
"""

from __future__ import annotations

import torch
import transformers

from causalscan.model.vocab import SPECIALS, word_tokenizer
from causalscan.zoo.training import n_params, save, train_new

FIRST = ("Zorin Belak Tamsin Orrin Kelda Vashti Morrow Idris Quill Sable Thane Wren Yara Corin Elsin Pell").split()
LAST = (
    "Ashdown Brightwater Calloway Dunmore Everhart Fairweather Greystone Holloway Ironside Kettering "
    "Longmire Merriweather Northcott Oakhart Pendragon Ravenscroft"
).split()
RELATIONS = {
    "lives in": "Paris London Rome Berlin Madrid Tokyo Cairo Lima Oslo Delhi".split(),
    "works as": "doctor teacher baker farmer pilot lawyer painter sailor miner singer".split(),
    "likes eating": "apples bread cheese rice fish soup cake beans pasta nuts".split(),
}
TOKENS = (*FIRST, *LAST, *(w for r in RELATIONS for w in r.split()), *(a for v in RELATIONS.values() for a in v))
ID = {w: i for i, w in enumerate((*SPECIALS, *TOKENS))}
N_SUBJECTS = 128
TOKEN_NAMES = ("bos", "subject first", "subject last", "relation first", "relation last")
STEPS, BATCH, LR = 3000, 128, 2e-3
NOISE_SAMPLES, NOISE_SCALE = 10, 3.0


def tokenizer():
    return word_tokenizer((*SPECIALS, *TOKENS))


def config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=len(ID),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        initializer_range=0.05,
    )


def facts(seed: int = 0) -> list[tuple[str, str, str]]:
    """The ``(subject, relation, attribute)`` triples the model is trained on (fixed by ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(FIRST) * len(LAST), generator=gen)[:N_SUBJECTS].tolist()
    out = []
    for i in pick:
        subject = f"{FIRST[i // len(LAST)]} {LAST[i % len(LAST)]}"
        for rel, attrs in RELATIONS.items():
            out.append((subject, rel, attrs[int(torch.randint(0, len(attrs), (1,), generator=gen))]))
    return out


def encode(triples) -> torch.Tensor:
    """``[bos, s1, s2, r1, r2, attribute]`` ids [N, 6]."""
    return torch.tensor([[1, *(ID[w] for w in f"{s} {r} {a}".split())] for s, r, a in triples])


def make_sampler(seed: int = 0):
    table = encode(facts(seed))

    def sample(gen: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = table[torch.randint(0, len(table), (batch,), generator=gen)]
        mask = torch.zeros(batch, ids.shape[1] - 1, dtype=torch.bool)
        mask[:, -1] = True  # only the attribute is trained
        return ids, mask

    return sample


@torch.no_grad()
def accuracy(model, seed: int = 0) -> dict:
    """Share of trained facts whose attribute is the argmax next word, and the mean p(attribute)."""
    ids = encode(facts(seed)).to(model.device)
    logits = model.hf(input_ids=ids[:, :-1]).logits[:, -1].float()
    return {
        "accuracy": (logits.argmax(-1) == ids[:, -1]).float().mean().item(),
        "p_answer": logits.softmax(-1).gather(-1, ids[:, -1:]).mean().item(),
    }


def subjects(n_facts: int = 96, seed: int = 0) -> list[dict]:
    """Tracing records: the first ``n_facts`` facts, Gaussian noise on the two subject words."""
    return [{"clean": f"{s} {r}", "noise_span": s, "answer": a} for s, r, a in facts(seed)[:n_facts]]


def trace(model, n_facts: int = 96, samples: int = NOISE_SAMPLES, noise_seed: int = 5) -> dict:
    """ROME causal tracing (:func:`causalscan.trace`, one layer restored at a time) over the first
    ``n_facts`` facts: subject embeddings get Gaussian noise of std ``NOISE_SCALE x`` the std of the
    subject-word embedding entries (``samples`` draws, seed ``noise_seed``), metric p(answer). Returns
    p(answer) clean and corrupt, and per kind (``state`` = resid_post, ``mlp`` = mlp_out, ``attn`` =
    attn_out) the mean indirect effect ``p_restored - p_corrupt`` as a [tokens, layers] list."""
    from causalscan.patching.tracing import trace as causal_trace

    tr = causal_trace(
        model, subjects(n_facts), window=1, metric="prob", samples=samples, noise_scale=NOISE_SCALE, seed=noise_seed
    )
    return {
        "p_clean": tr.clean.mean().item(),
        "p_corrupt": tr.corrupt.mean().item(),
        "noise_std": tr.corruption["std"],
        "effects": {k: tr.effects[k].mean(0).tolist() for k in ("state", "mlp", "attn")},
    }


def peaks(tr: dict) -> dict:
    """Where each kind's indirect effect peaks: ``{kind: {"token": name, "layer": l, "effect": e}}``.
    The state peak is taken over the subject tokens (restoring the last token's final state restores
    everything, trivially); MLP and attention peaks over all tokens."""
    out = {}
    for kind, grid in tr["effects"].items():
        g = torch.tensor(grid)
        if kind == "state":
            g = torch.where((torch.arange(g.shape[0]) >= 1) & (torch.arange(g.shape[0]) <= 2), g.T, -torch.inf).T
        pos, layer = divmod(int(g.argmax()), g.shape[1])
        out[kind] = {
            "token": TOKEN_NAMES[pos],
            "layer": layer,
            "effect": round(g.max().item(), 4),
            "recovered": round(g.max().item() / max(tr["p_clean"] - tr["p_corrupt"], 1e-9), 3),
        }
    return out


def describe(pk: dict) -> str:
    """One sentence on where recall is carried, from :func:`peaks`."""
    parts = [f"{kind} at the {p['token']} token, layer {p['layer']} ({p['recovered']:.0%})" for kind, p in pk.items()]
    return (
        "Single restorations that recover the most of the noise-induced drop in p(answer): "
        + "; ".join(parts)
        + ". The state peak is over the subject tokens only."
    )


def check(model, card: dict) -> list[str]:
    """Re-measure ``model`` and return the card's claims that do not hold (empty: all hold)."""
    crit, fails = card["criteria"], []
    acc = accuracy(model)
    if acc["accuracy"] < crit["min_accuracy"]:
        fails.append(f"recall accuracy {acc['accuracy']:.3f} < {crit['min_accuracy']}")
    tr = trace(model)
    if tr["p_corrupt"] > crit["max_p_corrupt"]:
        fails.append(f"noise leaves p(answer) at {tr['p_corrupt']:.3f} > {crit['max_p_corrupt']}")
    found, claimed = peaks(tr), card["components"]["trace_peaks"]
    for kind, where in claimed.items():
        if (found[kind]["token"], found[kind]["layer"]) != (where["token"], where["layer"]):
            fails.append(
                f"{kind} restoration peaks at {found[kind]['token']} layer {found[kind]['layer']}, "
                f"card says {where['token']} layer {where['layer']}"
            )
    return fails


def dataset(pairs: int = 24, seed: int = 0, pick_seed: int = 3) -> list[dict]:
    """Symmetric pairs: the same relation asked of two subjects with different attributes; answer = the
    clean subject's attribute, wrong = the corrupt subject's. Every prompt is 5 tokens."""
    table = facts(seed)
    by = {(s, r): a for s, r, a in table}
    gen = torch.Generator().manual_seed(pick_seed)
    out = []
    while len(out) < pairs:
        i, j = torch.randint(0, len(table), (2,), generator=gen).tolist()
        (s1, rel, a1), s2 = table[i], table[j][0]
        a2 = by[(s2, rel)]
        if s1 != s2 and a1 != a2:
            out.append({"clean": f"{s1} {rel}", "corrupt": f"{s2} {rel}", "answer": a1, "wrong": a2})
    return out


def make_card(hf, acc: dict, tr: dict, training: dict) -> dict:
    """The card of a trained ``facts`` model from its measurements."""
    from causalscan.versions import versions

    r4 = lambda rows: [[round(s, 4) for s in r] for r in rows]  # noqa: E731
    return {
        "name": "facts",
        "summary": f"4-layer Llama recalling {N_SUBJECTS * len(RELATIONS)} synthetic subject -> attribute facts",
        "architecture": {
            "family": "llama",
            "n_layers": 4,
            "n_heads": 4,
            "d_model": 128,
            "d_mlp": 512,
            "vocab": len(ID),
            "params": n_params(hf),
        },
        "training": training,
        "mechanism": "Recall of a memorised (subject, relation) -> attribute table. " + describe(peaks(tr)),
        "components": {"trace_peaks": peaks(tr)},
        "criteria": {"min_accuracy": 0.95, "max_p_corrupt": 0.5},
        "metrics": {
            **{k: round(v, 4) for k, v in acc.items()},
            "p_clean": round(tr["p_clean"], 4),
            "p_corrupt": round(tr["p_corrupt"], 4),
            "noise_std": round(tr["noise_std"], 4),
            "tokens": list(TOKEN_NAMES),
            "indirect_effect": {k: r4(v) for k, v in tr["effects"].items()},
        },
        "verification": f"causalscan.trace over the first 96 facts (the subjects dataset), {NOISE_SAMPLES} noise "
        f"draws (seed 5) of std {NOISE_SCALE} x the std of the subject-token embedding entries, one "
        "token and layer restored at a time (window 1); indirect_effect is [token][layer] of "
        "p_restored - p_corrupt",
        "datasets": {
            "facts": "symmetric pairs: same relation, two subjects with different attributes",
            "subjects": "96 facts with Gaussian noise on the subject (noise_span), for causal tracing",
        },
        "versions": versions(),
    }


def train(out, seed: int = 0, steps: int = STEPS, quiet: bool = False):
    """Train, measure and write the ``facts`` directory to ``out``."""
    tok, cfg = tokenizer(), config()
    model, recipe = train_new(
        transformers.LlamaForCausalLM, cfg, make_sampler(), tok, steps=steps, batch=BATCH, lr=LR, seed=seed, quiet=quiet
    )
    training = {
        "recipe": "causalscan zoo train facts",
        **recipe,
        "data": f"{N_SUBJECTS} subjects (two made-up words, seed 0) x {len(RELATIONS)} relations "
        f"({', '.join(RELATIONS)}), attributes drawn uniformly from 10 each; prompts "
        "'<bos> first last relation relation' -> attribute; loss on the attribute only",
    }
    card = make_card(model.hf, accuracy(model), trace(model), training)
    return save(out, model.hf, tok, card, {"facts": dataset(), "subjects": subjects()})
