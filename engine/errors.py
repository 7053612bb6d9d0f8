"""The one exception type for errors a user can cause (bad file, field, spec, architecture)."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message names the file, line and field where it can. The CLI exits 2."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None):
        where = ":".join(str(p) for p in (file, line) if p is not None)
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{message}" if where else f"{what}{message}")
        self.file, self.line, self.field = file, line, field
