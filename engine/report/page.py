"""The report's page: one self-contained HTML file of saved results, plotly's bundle inline, no network.

``render(doc, tensors)`` draws a page from what a command saved: its JSON document (``scan.json``,
``trace.json`` or elicit's ``summary.json`` with ``completions.jsonl``) and ``scores.safetensors``.
``causalscan report DIR``, ``--report`` and ``result.report(path)`` all go through it, so the
three draw the same page. ``figures(doc, tensors)`` gives the plotly figures by name
(``"auto/head"``, ``"exact/resid_pre"``, ``"agreement/head"``, ``"trace/mlp"``, ``"objective"``)
for people to restyle.

Every string that comes from a user (prompts, tokens, completions, names, paths) is escaped:
HTML text by ``html.escape``; figure data as JSON with ``<``, ``>`` and ``&`` written as unicode
escapes (a token ``</script>`` cannot end the script it sits in), and token labels HTML-escaped
before plotly draws them (plotly reads a few tags in labels).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from causalscan import files
from causalscan.errors import InputError
from causalscan.report.figures import figures
from causalscan.report.labels import number_text

DOCS = ("scan.json", "trace.json", "circuit.json", "summary.json", "graph.json", "audit.json")


def load(out_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON document and tensors a command saved in ``out_dir`` (elicit: its completion rows
    under ``doc["rows"]``)."""
    from safetensors.torch import load_file

    d = Path(out_dir)
    found = [d / f for f in DOCS if (d / f).is_file()]
    if not found:
        raise InputError(f"{d}: no saved result here (looked for {', '.join(DOCS)})", field="dir")
    path = found[0]
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a JSON document ({e})", field="dir") from None
    if doc.get("kind") == "elicit":
        rows = d / "completions.jsonl"
        doc["rows"] = (
            [json.loads(line) for line in rows.read_text(encoding="utf-8").splitlines() if line]
            if rows.is_file()
            else []
        )
        return doc, {}
    if doc.get("kind") == "audit":  # everything the page draws is in the document
        return doc, {}
    scores = d / "scores.safetensors"
    if not scores.is_file():
        raise InputError(f"{scores}: missing (saved with {path.name})", field="dir")
    return doc, load_file(str(scores))


def write(out_dir: str | Path, path: str | Path | None = None) -> Path:
    """``report.html`` (or ``path``) from what was saved in ``out_dir``."""
    doc, tensors = load(out_dir)
    path = Path(path) if path else Path(out_dir) / "report.html"
    files.write(path, render(doc, tensors))
    return path


def _kv(d: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_value(v)}</td></tr>" for k, v in d.items())
    return f"<table class='kv'>{rows}</table>"


def _value(v) -> str:
    if isinstance(v, dict):
        return _kv(v) if v else "{}"
    if isinstance(v, list):
        return html.escape(", ".join(str(x) for x in v))
    return number_text(v)


def _table(rows: list[dict], cols: list[str], caption: str, mark: str | None = None) -> str:
    """A sortable table (click a header) of ``rows``; ``mark``: a phrase highlighted in string cells."""

    def cell(v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"<td data-v='{v}'>{number_text(v)}</td>"
        text = html.escape("" if v is None else str(v))
        if mark:
            text = text.replace(html.escape(mark), f"<mark>{html.escape(mark)}</mark>")
        return f"<td>{text}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(cell(r.get(c)) for c in cols) + "</tr>" for r in rows)
    return (
        f"<table class='sortable'><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def _json_for_script(obj) -> str:
    """JSON safe inside a <script> element."""
    return obj.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _header(doc: dict) -> str:
    """What ran on what, in front; every other setting, the timings and versions folded below."""
    kind = doc.get("kind", "result")
    ds = doc.get("dataset")
    facts = {"model": doc.get("model")}
    if isinstance(ds, dict):
        facts.update(dataset=ds.get("path"), sha256=ds.get("sha256"), pairs=ds.get("pairs"))
    settings = doc.get("settings") or {}
    facts.update({k: settings[k] for k in ("method", "direction", "metric", "scored_by") if settings.get(k)})
    front = (
        "baselines",
        "agreement",
        "method",
        "source",
        "target",
        "radius",
        "phrase",
        "hits_learned",
        "hits_random",
        "objective",
        "prompt",
        "graph",
    )
    facts.update({k: doc[k] for k in front if doc.get(k) is not None})
    more = {
        k: doc[k]
        for k in ("settings", "false_negatives", "radius_rule", "timings", "versions")
        if doc.get(k) is not None
    }
    return (
        f"<h1>causalscan {html.escape(kind)} report</h1>{_kv(facts)}"
        f"<details><summary>settings, timings, versions</summary>{_kv(more)}</details>"
    )


def render(doc: dict, tensors: dict[str, torch.Tensor]) -> str:
    """The whole page (HTML, one file, no network) of one saved result."""
    from plotly.io import to_json
    from plotly.offline import get_plotlyjs

    figs = figures(doc, tensors)
    parts, specs = [_header(doc)], []
    for i, (name, fig) in enumerate(figs.items()):
        cls = (
            "cs-figure"
            if name.split("/")[0]
            in ("agreement", "objective", "radius", "pattern", "circuit", "faithfulness", "graph", "modes", "layer")
            else "cs-heatmap"
        )
        parts.append(f"<div id='fig{i}' class='{cls}' data-name='{html.escape(name, quote=True)}'></div>")
        specs.append((f"fig{i}", _json_for_script(to_json(fig, validate=False))))
    kind = doc.get("kind")
    if kind in ("scan", "patch"):
        cols = (
            ["component", "score", "estimate", "exact"]
            if kind == "scan"
            else ["component", "exact", "exact_abs", "exact_norm"]
        )
        parts.append(_table(doc.get("components", []), cols, "ranked nodes (click a column to sort)"))
    if kind == "circuit":
        parts.append(
            _table(doc.get("edges", []), ["rank", "edge", "score", "exact"], "ranked edges (click a column to sort)")
        )
    if kind == "graph":
        parts.append(_table(doc.get("logits", []), ["token", "id", "prob"], "logit targets"))
        parts.append(
            _table(
                doc.get("top", []),
                ["node", "kind", "layer", "position", "influence", "activation"],
                "most influential nodes (click a column to sort)",
            )
        )
        parts.append(
            _table(doc.get("edges", []), ["source", "target", "weight"], "strongest edges of the pruned graph")
        )
    if kind == "trace":
        parts.append(
            _table(
                doc.get("top", []),
                ["grid", "position", "token", "layer", "effect", "recovered"],
                "strongest restorations",
            )
        )
    if kind == "audit":
        parts += _audit_tables(doc)
    if kind == "elicit":
        parts.append(
            _table(
                doc.get("rows", []),
                ["vector", "kind", "score", "prompt", "completion", "hit"],
                "completions per vector" + (" (hits highlighted)" if doc.get("phrase") else ""),
                mark=doc.get("phrase"),
            )
        )
    calls = "".join(f"draw('{i}', {spec});\n" for i, spec in specs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>causalscan {html.escape(str(kind))} report</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }}
table.sortable th {{ cursor: pointer; background: #f4f4f4; }}
table.kv table.kv {{ margin: 0; }}
caption {{ text-align: left; font-weight: bold; padding: 4px 0; }}
.cs-heatmap, .cs-figure {{ max-width: 1100px; }}
mark {{ background: #ffe066; }}
</style>
<script>{get_plotlyjs()}</script>
</head><body>
{"".join(parts)}
<script>
function draw(id, fig) {{
  Plotly.newPlot(id, fig.data, fig.layout || {{}}, {{displaylogo: false, responsive: true}});
}}
{calls}
document.querySelectorAll("table.sortable th").forEach(function (th, col) {{
  th.addEventListener("click", function () {{
    var body = th.closest("table").tBodies[0], rows = Array.from(body.rows);
    var down = th.dataset.dir !== "down"; th.dataset.dir = down ? "down" : "up";
    rows.sort(function (a, b) {{
      var x = a.cells[col], y = b.cells[col];
      var u = x.dataset.v !== undefined ? parseFloat(x.dataset.v) : x.textContent;
      var v = y.dataset.v !== undefined ? parseFloat(y.dataset.v) : y.textContent;
      return (u < v ? -1 : u > v ? 1 : 0) * (down ? -1 : 1);
    }});
    rows.forEach(function (r) {{ body.appendChild(r); }});
  }});
}});
</script>
</body></html>
"""


def _audit_tables(doc: dict) -> list[str]:
    """The ranked modes with their examples, the detectors' counts, the top vectors, the unsteered completions."""
    modes = [
        {
            **m,
            "name": " | ".join(m["name"]),
            "examples": " // ".join(f"{e['completion']} (on: {e['prompt']})" for e in m["examples"]),
        }
        for m in doc.get("modes", [])
    ]
    cols = ["mode", "score", "novelty", "specificity", "generalisation", "learned_vectors", "random_vectors"]
    parts = [
        _table(
            modes,
            [*cols, "unsteered_share", "name", "examples"],
            "behaviour modes, ranked (examples: "
            "completions of the vectors that land in the mode most, on held-out prompts)",
        )
    ]
    dets = [{"detector": k, **{c: v[c] for c in v if c != "vectors"}} for k, v in (doc.get("detections") or {}).items()]
    if dets:
        cols = ["detector", "learned_vectors", "random_vectors", "best_learned_share", "unsteered_share"]
        parts.append(_table(dets, cols, "labelled detectors (counted beside the ranking, not in it)"))
    cols = ["name", "score", "mode", "share", "layer", "radius", "completion"]
    parts.append(
        _table(doc.get("ranking", [])[:50], cols, "vectors, ranked (completion: greedy, first held-out prompt)")
    )
    parts.append(_table(doc.get("unsteered", []), ["prompt", "completion"], "unsteered completions (greedy)"))
    return parts


def repr_html(doc: dict) -> str:
    """A compact notebook view: the header and the ranked table (figures: ``result.figure(name)``)."""
    cols = (
        ["component", "score", "estimate", "exact"]
        if doc.get("kind") == "scan"
        else ["component", "exact", "exact_abs"]
    )
    rows = doc.get("components") or doc.get("top") or []
    if doc.get("kind") == "circuit":
        return _header(doc) + _table(doc.get("edges", [])[:20], ["rank", "edge", "score", "exact"], "top edges")
    return _header(doc) + (_table(rows[:20], cols, "top nodes") if doc.get("kind") in ("scan", "patch") else "")
