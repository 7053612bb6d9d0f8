"""A small word-level tokenizer for models that ship none (random models, toy training).

A ``tokenizers`` WordLevel model split on whitespace and punctuation; special tokens are
bracketed (``<bos>``) so none is a substring of a vocabulary word.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<unk>", "<bos>", "<eos>", "<pad>")

NAMES = (
    "Mary John Alice Bob Carol Dave Eve Frank Grace Heidi Ivan Judy Mallory Niaj Olivia Peggy "
    "Rupert Sybil Trent Victor Walter Xena Yusuf Zara"
).split()
WORDS = (
    "the a an and or but to of in on at for with from by as is was are were be been it this that "
    "he she they we you I him her them his their our your went gave took said saw met had has have "
    "store park school office house garden kitchen market station bank church library museum beach "
    "drink ball book key letter ring apple cake gift note pen cup hat coin map "
    "when then after before while because so if not no yes one two three four five six seven eight "
    "nine ten red blue green black white big small old new good bad happy sad day night time "
    "Paris London Rome Berlin Madrid Tokyo capital city country river king queen man woman"
).split()
PUNCT = list(".,;:!?'\"()-+=*/")


def default_vocab() -> list[str]:
    """Specials, then names, words, digits 0-99, letters and punctuation."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    seen, out = set(), []
    for w in (*SPECIALS, *NAMES, *WORDS, *map(str, range(100)), *letters, *PUNCT):
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def word_tokenizer(words: Iterable[str] | None = None, bos: bool = True) -> PreTrainedTokenizerFast:
    """A fast HF tokenizer over ``words`` (default: :func:`default_vocab`), prepending ``<bos>``."""
    vocab = {w: i for i, w in enumerate(words or default_vocab())}
    for s in SPECIALS:
        vocab.setdefault(s, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
