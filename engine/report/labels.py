"""How the report writes user strings and numbers: labels HTML-escaped with whitespace made visible,
values to 4 significant digits."""

from __future__ import annotations

import html
import math


def label(text: str) -> str:
    """A user string as a plotly label: HTML-escaped, whitespace made visible."""
    return html.escape(str(text)).replace(" ", "\u2423").replace("\n", "\u21b5") or "\u2205"


def number_text(v) -> str:
    """A value as the report writes it: 4 significant digits, n/a for None or NaN, other values escaped."""
    return (
        "n/a"
        if v is None or (isinstance(v, float) and math.isnan(v))
        else f"{v:.4g}"
        if isinstance(v, float)
        else html.escape(str(v))
    )


__all__ = ["label", "number_text"]
