"""The HTML report of saved results: ``render(doc, tensors)`` draws the page (:mod:`.page`) from a
command's JSON document and tensors; ``figures(doc, tensors)`` gives its plotly figures by name
(:mod:`.figures`); ``write(DIR)`` reads what a command saved in DIR and writes ``DIR/report.html``.
May import: base.
"""

from causalscan.report.figures import MAX_COLUMNS, figures, heatmap
from causalscan.report.page import load, render, repr_html, write

__all__ = ["MAX_COLUMNS", "figures", "heatmap", "load", "render", "repr_html", "write"]
