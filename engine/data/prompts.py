"""Prompts: JSONL files read with their line numbers (pairs, or ``{"prompt": ...}`` lines), prompts
encoded as token ids (in the chat template on request), and token-id prompts grouped by length (one
forward per group, no padding).

>>> by_length([[1, 2], [3], [4, 5]])
[[0, 2], [1]]
"""

from __future__ import annotations

import json
from pathlib import Path

from causalscan.errors import InputError, check_type


def read_jsonl(path: str | Path) -> tuple[list[dict], list[int]]:
    """The JSON objects of a JSONL file and their line numbers (blank lines skipped); errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", file=str(path))
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"not UTF-8 text (byte {e.start} is {raw[e.start]:#04x})",
            file=str(path),
            line=raw[: e.start].count(b"\n") + 1,
        ) from None
    records, lines = [], []
    for i, text in enumerate(content.splitlines(), start=1):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON ({e.msg})", file=str(path), line=i) from None
        if not isinstance(rec, dict):
            raise InputError("each line must be a JSON object", file=str(path), line=i)
        records.append(rec)
        lines.append(i)
    return records, lines


def by_length(prompts: list[list[int]]) -> list[list[int]]:
    """Indices of token-id ``prompts`` grouped by length (one forward per group needs no padding), in
    order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    return list(groups.values())


def chat_text(tokenizer, text: str, file: str | None = None, line: int | None = None) -> str:
    """``text`` as one user turn in the tokenizer's chat template, with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the tokenizer has no chat template", file=file, line=line, field="chat")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def encode(tokenizer, text: str, chat: bool = False, file: str | None = None, line: int | None = None) -> list[int]:
    """Token ids of a prompt; with ``chat`` wrapped in the chat template (whose own special tokens
    replace the tokenizer's)."""
    if chat:
        return tokenizer(chat_text(tokenizer, text, file, line), add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def check_prompts(prompts) -> list[str] | None:
    """Prompts given in Python: None (the caller's default), one string, or a list of non-empty
    strings -> the list (:class:`InputError` naming the first bad one)."""
    if prompts is None:
        return None
    prompts = [prompts] if isinstance(prompts, str) else prompts
    check_type(prompts, list | tuple, "prompts", "a list of strings")
    for i, s in enumerate(prompts):
        if not isinstance(s, str) or not s:
            raise InputError(f"prompt {i} must be a non-empty string, not {s!r:.60}", field="prompts")
    return list(prompts)


def read_prompts(path: str | Path) -> list[str]:
    """JSONL, one ``{"prompt": "..."}`` per line; errors name the file, line and field."""
    records, lines = read_jsonl(path)
    for rec, i in zip(records, lines, strict=True):
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise InputError("must be a non-empty string", file=str(path), line=i, field="prompt")
    if not records:
        raise InputError("no prompts", file=str(path))
    return [rec["prompt"] for rec in records]
