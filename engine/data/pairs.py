"""Prompt-pair datasets: JSONL, one pair per line.

``{"clean": "...", "corrupt": "...", "answer": " Mary", "wrong": " John"}``; ``clean_ids`` /
``corrupt_ids`` (token id lists) may replace the strings. Clean and corrupt must have equal token
length. ``answer`` and ``wrong`` are strings, token ids or lists of token ids; an answer of several
tokens is scored by its teacher-forced log-probability (:mod:`causalscan.data.metrics`).

``"positions"`` names token roles, ``{"IO": " Mary", "S2": [" John", 2], "END": -1}``: a substring's
last token (its n-th occurrence), or a token index (negative from the end); every pair names the
same roles, and by-position sweeps then run over roles, so pairs may differ in length.

``"chat": true`` wraps clean and corrupt in the tokenizer's chat template as one user turn with
the generation prompt (for instruct models); answers then follow the assistant's turn.

Instead of ``corrupt``, ``noise_span`` selects Gaussian-noise corruption (ROME) of the tokens of a
substring of ``clean`` (its first occurrence), or of token positions ``[start, end)`` given as a
two-int list; :mod:`causalscan.data.corruption` draws the noise. A dataset uses one kind of corruption.
Every error names the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from causalscan.data.prompts import chat_text, encode, read_jsonl
from causalscan.errors import InputError, check_type, is_int


@dataclass(frozen=True)
class Pair:
    """One tokenized pair. ``answer``/``wrong``: the continuations' tokens (``wrong`` empty when the
    record has none). ``span``: token positions ``[start, end)`` that Gaussian noise corrupts (then
    ``corrupt == clean``), else None."""

    clean: tuple[int, ...]
    corrupt: tuple[int, ...]
    answer: tuple[int, ...]
    wrong: tuple[int, ...]
    line: int
    span: tuple[int, int] | None = None
    roles: dict[str, int] | None = None  # named positions: role -> token index

    @property
    def multi_token(self) -> bool:
        """Is the answer or the wrong continuation several tokens (scored by teacher forcing)?"""
        return len(self.answer) > 1 or len(self.wrong) > 1


class Dataset:
    """Records of prompt pairs, from a JSONL file or a list of dicts.

    >>> ds = Dataset([{"clean": "When Mary and John went to the store, John gave a drink to",
    ...                "corrupt": "When Mary and John went to the store, Mary gave a drink to",
    ...                "answer": " Mary", "wrong": " John"}])
    >>> len(ds), ds.name
    (1, '<memory>')
    """

    def __init__(self, records: Iterable[dict], name: str = "<memory>", lines: list[int] | None = None):
        self.records = list(records)
        self.name = name
        self.lines = lines or list(range(1, len(self.records) + 1))
        if not self.records:
            raise InputError("dataset has no pairs", file=name)
        for rec, line in zip(self.records, self.lines, strict=True):
            self._check(rec, line)
        self.roles = self._check_roles()
        noisy = ["noise_span" in r for r in self.records]
        if any(noisy) and not all(noisy):
            line = self.lines[noisy.index(not noisy[0])]
            raise self._err(
                "the dataset mixes noise_span and corrupt pairs; use one kind of corruption per dataset",
                line,
                "noise_span" if not noisy[0] else "corrupt",
            )

    @classmethod
    def from_jsonl(cls, path: str | Path) -> Dataset:
        records, lines = read_jsonl(path)
        return cls(records, name=str(path), lines=lines)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def sha256(self) -> str:
        canon = "\n".join(json.dumps(r, sort_keys=True) for r in self.records)
        return hashlib.sha256(canon.encode()).hexdigest()

    def _err(self, msg: str, line: int, field: str) -> InputError:
        return InputError(msg, file=self.name, line=line, field=field)

    def _check_roles(self) -> tuple[str, ...] | None:
        """The role names every pair gives in ``positions`` (the same set on every line), or None."""
        first = self.records[0].get("positions")
        names = tuple(first) if isinstance(first, dict) else None
        for rec, line in zip(self.records, self.lines, strict=True):
            got = rec.get("positions")
            if got is None and names is None:
                continue
            if not isinstance(got, dict) or not got or not names:
                raise self._err(
                    "must name the same roles as line 1 (a non-empty object)"
                    if names
                    else "line 1 names no positions: name them on every line or on none",
                    line,
                    "positions",
                )
            if set(got) != set(names):
                raise self._err(f"roles {sorted(got)} differ from line 1's {sorted(names)}", line, "positions")
            for role, spec in got.items():
                if not (
                    isinstance(spec, str)
                    and spec
                    or isinstance(spec, int)
                    and not isinstance(spec, bool)
                    or isinstance(spec, list)
                    and len(spec) == 2
                    and isinstance(spec[0], str)
                    and spec[0]
                    and isinstance(spec[1], int)
                    and spec[1] >= 1
                ):
                    raise self._err(
                        f"role {role!r}: give a substring, [substring, occurrence >= 1] or a token index",
                        line,
                        "positions",
                    )
        return names

    def _check(self, rec: dict, line: int) -> None:
        for f, v in rec.items():
            if _unencodable(v):
                raise self._err("holds a lone surrogate (\\ud800-\\udfff), which is not text", line, f)
        noise = "noise_span" in rec
        if noise and ("corrupt" in rec or "corrupt_ids" in rec):
            raise self._err("give corrupt or noise_span, not both", line, "noise_span")
        for side in ("clean",) if noise else ("clean", "corrupt"):
            if side not in rec and f"{side}_ids" not in rec:
                raise self._err(
                    f"missing (give {side!r}, {side + '_ids'!r}" + (" or 'noise_span')" if side == "corrupt" else ")"),
                    line,
                    side,
                )
            if side in rec and not isinstance(rec[side], str):
                raise self._err("must be a string", line, side)
            ids = rec.get(f"{side}_ids")
            if f"{side}_ids" in rec and not (isinstance(ids, list) and ids and all(is_int(i) for i in ids)):
                raise self._err("must be a non-empty list of token ids", line, f"{side}_ids")
        if noise:
            span = rec["noise_span"]
            ints = isinstance(span, list) and len(span) == 2 and all(is_int(i) for i in span)
            if not (ints and 0 <= span[0] < span[1]) and not (isinstance(span, str) and span.strip()):
                raise self._err(
                    "must be a non-empty substring of clean or token positions [start, end)", line, "noise_span"
                )
            if isinstance(span, str) and ("clean" not in rec or "clean_ids" in rec):
                raise self._err(
                    "a string span needs the clean string (not clean_ids); give token positions [start, end)",
                    line,
                    "noise_span",
                )
            if isinstance(span, str) and span not in rec["clean"]:
                raise self._err(f"{span!r} is not a substring of clean", line, "noise_span")
        if "chat" in rec and not isinstance(rec["chat"], bool):
            raise self._err("must be true or false", line, "chat")
        if "answer" not in rec:
            raise self._err("missing", line, "answer")
        for f in ("answer", "wrong"):
            v = rec.get(f)
            if f in rec and not (
                isinstance(v, str) and v or is_int(v) or isinstance(v, list) and v and all(is_int(i) for i in v)
            ):
                raise self._err("must be a non-empty string, a token id or a list of token ids", line, f)

    def tokenize(self, tokenizer, vocab_size: int | None = None) -> list[Pair]:
        """Token ids of every pair; raises :class:`InputError` naming file, line and field."""
        out = []
        for rec, line in zip(self.records, self.lines, strict=True):
            ids = {}
            noise = "noise_span" in rec
            for side in ("clean",) if noise else ("clean", "corrupt"):
                if f"{side}_ids" in rec:
                    ids[side] = tuple(rec[f"{side}_ids"])
                else:
                    if tokenizer is None:
                        raise self._err("model has no tokenizer; give token ids instead", line, side)
                    ids[side] = tuple(encode(tokenizer, rec[side], rec.get("chat", False), self.name, line))
            span = self._span(tokenizer, rec, ids["clean"], line) if noise else None
            if noise:
                ids["corrupt"] = ids["clean"]
            if len(ids["clean"]) != len(ids["corrupt"]):
                raise self._err(
                    f"clean has {len(ids['clean'])} tokens, corrupt has {len(ids['corrupt'])}: "
                    "pairs must have equal token length",
                    line,
                    "corrupt",
                )
            tok = {f: self._answer(tokenizer, rec[f], line, f) for f in ("answer", "wrong") if f in rec}
            for f, t in [*ids.items(), *tok.items()]:
                bad = [i for i in t if vocab_size and not 0 <= i < vocab_size]
                if bad:
                    raise self._err(f"token id {bad[0]} outside the vocabulary [0, {vocab_size})", line, f)
            if tok["answer"] == tok.get("wrong"):
                raise self._err("has the same tokens as answer: the metric would be 0 everywhere", line, "wrong")
            roles = {r: self._role(tokenizer, rec, r, ids["clean"], line) for r in self.roles} if self.roles else None
            out.append(Pair(ids["clean"], ids["corrupt"], tok["answer"], tok.get("wrong", ()), line, span, roles))
        return out

    def _span(self, tokenizer, rec: dict, clean: tuple[int, ...], line: int) -> tuple[int, int]:
        """Token positions ``[start, end)`` of ``noise_span`` in the clean prompt."""
        span = rec["noise_span"]
        if isinstance(span, list):
            if span[1] > len(clean):
                raise self._err(f"span {span} runs past the prompt's {len(clean)} tokens", line, "noise_span")
            return span[0], span[1]
        if tokenizer is None:
            raise self._err("model has no tokenizer; give token positions [start, end)", line, "noise_span")
        hit = self._tokens_of(tokenizer, rec, span, 1, line, "noise_span")
        return hit[0], hit[-1] + 1

    def _role(self, tokenizer, rec: dict, role: str, clean: tuple[int, ...], line: int) -> int:
        """The token index of a named position: a substring's last token (its n-th occurrence), or an
        index (negative from the end)."""
        spec = rec["positions"][role]
        if isinstance(spec, int):
            if not -len(clean) <= spec < len(clean):
                raise self._err(
                    f"role {role!r}: index {spec} outside the prompt's {len(clean)} tokens", line, "positions"
                )
            return spec % len(clean)
        text, n = (spec, 1) if isinstance(spec, str) else spec
        if tokenizer is None or "clean" not in rec:
            raise self._err(
                f"role {role!r}: a substring needs the clean string and a tokenizer; give a token index",
                line,
                "positions",
            )
        return self._tokens_of(tokenizer, rec, text, n, line, "positions")[-1]

    def _tokens_of(self, tokenizer, rec: dict, sub: str, n: int, line: int, field: str) -> list[int]:
        """Indices of the clean prompt's tokens that overlap the ``n``-th occurrence of ``sub``."""
        text = chat_text(tokenizer, rec["clean"], self.name, line) if rec.get("chat") else rec["clean"]
        kw = {"add_special_tokens": False} if rec.get("chat") else {}
        a = -1
        for _ in range(n):
            a = text.find(sub, a + 1)
            if a < 0:
                raise self._err(f"{sub!r} does not occur {n} time(s) in clean", line, field)
        b = a + len(sub)
        if getattr(tokenizer, "is_fast", False):
            offsets = tokenizer(text, return_offsets_mapping=True, **kw)["offset_mapping"]
            hit = [i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
        else:  # prefix lengths: the tokens added by the substring
            start = len(tokenizer(text[:a], **kw)["input_ids"])
            hit = list(range(start, len(tokenizer(text[:b], **kw)["input_ids"])))
        if not hit:
            raise self._err(f"{sub!r} covers no token of clean", line, field)
        return hit

    def _answer(self, tokenizer, value, line: int, field: str) -> tuple[int, ...]:
        """The tokens of an answer: a token id, a list of them, or a string tokenised without special tokens."""
        if isinstance(value, int):
            return (value,)
        if isinstance(value, list):
            return tuple(value)
        if tokenizer is None:
            raise self._err("model has no tokenizer; give token ids", line, field)
        ids = tokenizer(value, add_special_tokens=False)["input_ids"]
        if not ids:
            raise self._err(f"{value!r} tokenises to nothing", line, field)
        return tuple(ids)


def _unencodable(v) -> bool:
    """Does ``v`` (a JSON value) hold a string that is not valid Unicode text (a lone surrogate)?"""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(v, dict):
        return any(_unencodable(k) or _unencodable(x) for k, x in v.items())
    return isinstance(v, list) and any(_unencodable(x) for x in v)


def as_dataset(data) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, str | Path):
        return Dataset.from_jsonl(data)
    check_type(data, list | tuple, "dataset", "a Dataset, a JSONL path or a list of record dicts")
    for i, rec in enumerate(data, 1):
        if not isinstance(rec, dict):
            raise InputError(f"record {i} must be a dict, not {type(rec).__name__}", file="<memory>", line=i)
    return Dataset(list(data))


def stack(pairs: list[Pair], device=None) -> dict[str, torch.Tensor]:
    """Equal-length pairs -> ``clean``/``corrupt`` [P, T], ``answer``/``wrong`` [P] (first tokens; -1: none)."""
    return {
        "clean": torch.tensor([p.clean for p in pairs], device=device),
        "corrupt": torch.tensor([p.corrupt for p in pairs], device=device),
        "answer": torch.tensor([p.answer[0] for p in pairs], device=device),
        "wrong": torch.tensor([p.wrong[0] if p.wrong else -1 for p in pairs], device=device),
    }
