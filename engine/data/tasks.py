"""Task datasets people in the field know, built for any tokenizer.

Each generator returns pair records (the JSONL format of :mod:`causalscan.data.pairs`), keeping only
names and words that are one token with a leading space in the given tokenizer, so clean and
corrupt prompts have equal token length.

- :func:`ioi`: indirect object identification (Wang et al. 2022), "When Mary and John went to the
  store, John gave a drink to" -> " Mary" (not " John"); several templates of different lengths;
  corruptions ``flip_s2`` (the second subject becomes the indirect object: the answer flips) and
  ``abc`` (three other names).
- :func:`greater_than`: "The war lasted from the year 1732 to the year 17" (Hanna et al. 2023): the
  answer is a year above 32, the wrong one below; the corruption starts the war in 1701. Years a
  tokenizer splits into digits give multi-token answers.
- :func:`facts`: factual recall with ``noise_span`` on the subject (ROME's causal tracing).

>>> import causalscan as cs
>>> tok = cs.load("random:llama-tiny").tokenizer
>>> recs = ioi(tok, n=4, seed=0, templates=[0])
>>> recs[0]["clean"].startswith("When "), recs[0]["answer"] != recs[0]["wrong"]
(True, True)
"""

from __future__ import annotations

import random

from causalscan.errors import InputError, check_options

IOI_TEMPLATES = (
    "When {IO} and {S} went to the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {S} and {IO} went to the {PLACE}. {S} gave a {OBJECT} to",
    "After {IO} and {S} went to the {PLACE}, {S} gave a {OBJECT} to",
    "While {S} and {IO} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "Friends {IO} and {S} found a {OBJECT} at the {PLACE}. {S} gave it to",
)
NAMES = (
    "Mary John Alice Bob Carol Dave Eve Frank Grace Heidi Ivan Judy Tom Anna Paul Sarah Mark Lisa James "
    "Emma David Laura Peter Kate Michael Susan Daniel Rachel Andrew Julia Robert Linda"
).split()
PLACES = "store park school office house garden kitchen market station bank church library museum beach".split()
OBJECTS = "drink ball book key ring letter gift bag hat cup pen apple".split()
CORRUPTIONS = ("flip_s2", "abc")
GT_TEMPLATE = "The {NOUN} lasted from the year 17{YY} to the year 17"
GT_NOUNS = (
    "war expedition deal flight journey project siege trial voyage reign treaty campaign dispute study "
    "tour program plague dynasty marriage contract"
).split()

FACTS = (  # (prompt, subject, answer)
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris"),
    ("The Colosseum is located in the city of", "The Colosseum", " Rome"),
    ("The Brandenburg Gate is located in the city of", "The Brandenburg Gate", " Berlin"),
    ("Big Ben is located in the city of", "Big Ben", " London"),
    ("The Kremlin is located in the city of", "The Kremlin", " Moscow"),
    ("The Sydney Opera House is located in the city of", "The Sydney Opera House", " Sydney"),
    ("The Space Needle is located in the city of", "The Space Needle", " Seattle"),
    ("The Acropolis is located in the city of", "The Acropolis", " Athens"),
    ("The Forbidden City is located in the city of", "The Forbidden City", " Beijing"),
    ("The Louvre is located in the city of", "The Louvre", " Paris"),
    ("The Prado Museum is located in the city of", "The Prado Museum", " Madrid"),
    ("The Tower of London is located in the city of", "The Tower of London", " London"),
    ("The capital city of France is", "France", " Paris"),
    ("The capital city of Japan is", "Japan", " Tokyo"),
    ("The capital city of Italy is", "Italy", " Rome"),
    ("The capital city of Germany is", "Germany", " Berlin"),
    ("The capital city of Spain is", "Spain", " Madrid"),
    ("The capital city of Egypt is", "Egypt", " Cairo"),
    ("The capital city of Russia is", "Russia", " Moscow"),
    ("The capital city of Greece is", "Greece", " Athens"),
    ("The capital city of China is", "China", " Beijing"),
    ("The capital city of England is", "England", " London"),
)


def one_token(tokenizer, words) -> list[str]:
    """The ``words`` that are one token with a leading space (a known one: it decodes back to the word)."""
    out = []
    for w in words:
        ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] != tokenizer.unk_token_id and tokenizer.decode(ids).strip() == w:
            out.append(w)
    return out


def ioi(tokenizer, n: int = 64, seed: int = 0, templates=None, corruption: str = "flip_s2") -> list[dict]:
    """``n`` IOI pairs over ``templates`` (indices into :data:`IOI_TEMPLATES`, default all), in turn.

    Clean: "... {IO} and {S} ..., {S} gave a {OBJECT} to" with answer " IO", wrong " S".
    ``flip_s2``: the corrupt prompt names IO where S2 stood (the answer flips to S); ``abc``: the
    three name slots hold three other names. Each record names its positions IO, S1, S2 and END
    (so templates of different lengths sweep by role) and keeps its ``template`` index.
    """
    check_options(n=n, seed=seed)
    if corruption not in CORRUPTIONS:
        raise InputError(
            f"unknown IOI corruption {corruption!r}; corruptions: {', '.join(CORRUPTIONS)}", field="corruption"
        )
    chosen = list(range(len(IOI_TEMPLATES))) if templates is None else list(templates)
    if not chosen or any(not isinstance(t, int) or not 0 <= t < len(IOI_TEMPLATES) for t in chosen):
        raise InputError(f"templates must be indices in [0, {len(IOI_TEMPLATES)})", field="templates")
    names, places, objects = (one_token(tokenizer, ws) for ws in (NAMES, PLACES, OBJECTS))
    if len(names) < 5 or not places or not objects:
        raise InputError(
            f"the tokenizer has too few one-token names ({len(names)}), places or objects for IOI", field="model"
        )
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = chosen[i % len(chosen)]
        io, s, a, b, c = rng.sample(names, 5)
        fill = dict(PLACE=rng.choice(places), OBJECT=rng.choice(objects))
        clean = _ioi_prompt(t, io, s, s, fill)
        corrupt = _ioi_prompt(t, io, s, io, fill) if corruption == "flip_s2" else _ioi_prompt(t, a, b, c, fill)
        roles = {"IO": " " + io, "S1": " " + s, "S2": [" " + s, 2], "END": -1}
        out.append(
            {
                "clean": clean,
                "corrupt": corrupt,
                "answer": " " + io,
                "wrong": " " + s,
                "positions": roles,
                "template": t,
            }
        )
    return out


def _ioi_prompt(t: int, io: str, s1: str, s2: str, fill: dict) -> str:
    """Template ``t`` with its first S slot ``s1`` and its second ``s2``."""
    text = IOI_TEMPLATES[t].replace("{S}", s1, 1).replace("{S}", s2, 1)
    return text.format(IO=io, **fill)


def greater_than(tokenizer, n: int = 64, seed: int = 0) -> list[dict]:
    """``n`` greater-than pairs (Hanna et al. 2023): clean "The {noun} lasted from the year 17YY to the
    year 17", answer a two-digit year above YY, wrong one below; the corrupt prompt has YY = 01.

    Only start years whose clean and corrupt prompts have equal token length are used, and only
    answers whose tokens follow the prompt's as they would in the whole text (a tokenizer that
    merges "1745" differently from "17" + "45" would score another string). Records name the
    positions NOUN, YY (the start year's last token) and END.
    """
    check_options(n=n, seed=seed)
    nouns = one_token(tokenizer, GT_NOUNS)
    if not nouns:
        raise InputError("no greater-than noun is one token in this tokenizer", field="model")
    rng = random.Random(seed)
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise InputError(
                f"found {len(out)} of {n} greater-than pairs whose years tokenise consistently in this tokenizer",
                field="model",
            )
        noun, yy = rng.choice(nouns), rng.randrange(2, 99)
        clean = GT_TEMPLATE.format(NOUN=noun, YY=f"{yy:02d}")
        corrupt = GT_TEMPLATE.format(NOUN=noun, YY="01")
        answer, wrong = f"{rng.randrange(yy + 1, 100):02d}", f"{rng.randrange(0, yy):02d}"
        if len(tokenizer(clean)["input_ids"]) != len(tokenizer(corrupt)["input_ids"]) or not all(
            _continues(tokenizer, p, a) for p in (clean, corrupt) for a in (answer, wrong)
        ):
            continue
        out.append(
            {
                "clean": clean,
                "corrupt": corrupt,
                "answer": answer,
                "wrong": wrong,
                "positions": {"NOUN": " " + noun, "YY": f"17{yy:02d}", "END": -1},
            }
        )
    return out


def _continues(tokenizer, prompt: str, cont: str) -> bool:
    """Do the tokens of ``prompt + cont`` equal the prompt's followed by the continuation's?"""
    ids = tokenizer(prompt)["input_ids"]
    more = tokenizer(cont, add_special_tokens=False)["input_ids"]
    return bool(more) and tokenizer(prompt + cont)["input_ids"] == ids + more


def facts(tokenizer, n: int | None = None) -> list[dict]:
    """Factual-recall records with Gaussian noise on the subject (``noise_span``), answers one token;
    the first ``n`` (default all) of :data:`FACTS` whose answer is one token."""
    check_options(n=n)
    out = [{"clean": p, "noise_span": subj, "answer": ans} for p, subj, ans in FACTS if one_token(tokenizer, [ans[1:]])]
    if not out:
        raise InputError("no fact's answer is one token in this tokenizer", field="model")
    return out[:n]


TASKS = {"ioi": ioi, "greater_than": greater_than, "facts": facts}


__all__ = [
    "CORRUPTIONS",
    "FACTS",
    "GT_NOUNS",
    "GT_TEMPLATE",
    "IOI_TEMPLATES",
    "TASKS",
    "facts",
    "greater_than",
    "ioi",
    "one_token",
]
