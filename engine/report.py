"""A self-contained HTML report of saved results: one file, plotly's bundle inline, no network.

``render(doc, tensors)`` draws a page from what a command saved: its JSON document (``scan.json``,
``trace.json`` or elicit's ``summary.json`` with ``completions.jsonl``) and ``scores.safetensors``.
``causalscan report DIR``, ``--report`` and ``result.report(path)`` all go through it, so the
three draw the same page. ``figures(doc, tensors)`` gives the plotly figures by name
(``"atp*/head"``, ``"exact/resid_pre"``, ``"agreement/head"``, ``"trace/mlp"``, ``"objective"``)
for people to restyle.

Every string that comes from a user (prompts, tokens, completions, names, paths) is escaped:
HTML text by ``html.escape``; figure data as JSON with ``<``, ``>`` and ``&`` written as unicode
escapes (a token ``</script>`` cannot end the script it sits in), and token labels HTML-escaped
before plotly draws them (plotly reads a few tags in labels).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import torch

from causalscan import files
from causalscan.errors import InputError

MAX_COLUMNS = 64  # a sweep wider than this (neurons) shows each layer's top MAX_COLUMNS by |value|
DOCS = ("scan.json", "trace.json", "circuit.json", "summary.json")


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


# --- figures ---------------------------------------------------------------------------------


def _label(text: str) -> str:
    """A user string as a plotly label: HTML-escaped, whitespace made visible."""
    return html.escape(str(text)).replace(" ", "\u2423").replace("\n", "\u21b5") or "\u2205"


def _axis(doc: dict, sweep: str, n: int) -> list[str]:
    """Labels of a sweep's second axis: heads, roles, the first pair's tokens, or indices."""
    roles, tokens = doc["settings"].get("roles"), doc.get("tokens")
    site = sweep.split("_pos")[0]
    if site in ("head", "q", "k", "v") and not sweep.endswith("_pos"):
        return [f"H{i}" for i in range(n)]
    if roles and len(roles) == n:
        return [_label(r) for r in roles]
    if tokens and len(tokens) >= n and site not in ("neuron",):
        return [f"{i}:{_label(t)}" for i, t in enumerate(tokens[:n])]
    return [str(i) for i in range(n)]


def heatmap(
    z: torch.Tensor, x: list[str], y: list[str], title: str, gap: float | None, index: list[list[str]] | None = None
):
    """A signed heatmap ``z`` [rows, columns], centred at zero; hover shows the raw value, its share
    of ``gap`` (clean - corrupt) and, for aggregated sweeps, the component ``index``."""
    import plotly.graph_objects as go

    zl = z.float().tolist()
    norm = [[v / gap if gap and math.isfinite(v) else None for v in row] for row in zl]
    custom = [[[nv, index[i][j] if index else x[j]] for j, nv in enumerate(row)] for i, row in enumerate(norm)]
    hover = "%{y}, %{customdata[1]}<br>value %{z:.6g}<br>share of clean - corrupt %{customdata[0]:.3f}<extra></extra>"
    fig = go.Figure(
        go.Heatmap(
            z=zl,
            x=x,
            y=y,
            customdata=custom,
            hovertemplate=hover,
            colorscale="RdBu",
            reversescale=True,
            zmid=0,
            xgap=1,
            ygap=1,
        )
    )
    fig.update_layout(
        title=title,
        height=max(260, 22 * len(y) + 120),
        margin={"l": 60, "r": 20, "t": 50, "b": 60},
        xaxis={"type": "category"},
        yaxis={"type": "category", "autorange": "reversed"},
    )
    return fig


def _sweep_heatmap(doc: dict, key: str, t: torch.Tensor, gap: float | None):
    """One sweep ``t`` [layers, X] or [layers, positions, heads] as a heatmap (wide ones aggregated)."""
    sweep = key.split("/", 1)[1]
    y = [f"L{i}" for i in range(t.shape[0])]
    if t.dim() == 3:  # [L, T, H]: positions x heads side by side
        pos, heads = _axis(doc, sweep.replace("_pos", "") + "_pos", t.shape[1]), t.shape[2]
        x = [f"{p} H{h}" for p in pos for h in range(heads)]
        return heatmap(t.reshape(t.shape[0], -1), x, y, key, gap)
    if t.shape[1] <= MAX_COLUMNS:
        return heatmap(t, _axis(doc, sweep, t.shape[1]), y, key, gap)
    order = t.abs().nan_to_num(-1).argsort(1, descending=True)[:, :MAX_COLUMNS]  # top per layer
    index = [[f"{sweep} {int(j)}" for j in row] for row in order]
    x = [f"#{r + 1}" for r in range(MAX_COLUMNS)]
    return heatmap(
        t.gather(1, order), x, y, f"{key} (top {MAX_COLUMNS} of {t.shape[1]} per layer by |value|)", gap, index
    )


def _scatter(name: str, est: torch.Tensor, exact: torch.Tensor, stats: dict | None):
    """Estimate against exact effect of a sweep's confirmed nodes."""
    import plotly.graph_objects as go

    keep = exact.isfinite()
    e, x = est[keep].tolist(), exact[keep].tolist()
    lim = max([abs(v) for v in e + x] + [1e-12])
    fig = go.Figure(
        [
            go.Scatter(
                x=x,
                y=e,
                mode="markers",
                name="confirmed nodes",
                hovertemplate="exact %{x:.4g}<br>estimate %{y:.4g}<extra></extra>",
            ),
            go.Scatter(
                x=[-lim, lim],
                y=[-lim, lim],
                mode="lines",
                name="estimate = exact",
                line={"dash": "dot", "color": "grey"},
            ),
        ]
    )
    sub = (
        ""
        if not stats
        else (
            f" (n {stats['n']}: Spearman {_num(stats['spearman'])}, recall@{stats['k']} "
            f"{_num(stats['recall_at_k'])}, sign {_num(stats['sign_agreement'])})"
        )
    )
    fig.update_layout(
        title=f"{name}: estimate against exact{sub}",
        xaxis_title="exact effect",
        yaxis_title="estimate",
        height=360,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    return fig


def _position(node: str, n_layers: int) -> tuple[float, float]:
    """Where a circuit node sits: the embedding at the bottom, each layer's heads (and key-value
    heads) in a row and its MLP above them, the logits on top."""
    if node == "embed":
        return 0.0, -1.0
    if node == "logits":
        return 0.0, 2.0 * n_layers
    layer, rest = node[1:].split(".", 1)
    if rest == "MLP":
        return 0.0, 2 * int(layer) + 1.0
    return float(rest.lstrip("KVH")) + (0.5 if rest.startswith("KV") else 0.0) + 1.0, 2.0 * int(layer)


def _circuit_graph(doc: dict):
    """The circuit's edges as lines between nodes: blue positive, red negative, width by |score|."""
    import plotly.graph_objects as go

    edges = doc.get("edges", [])[: doc["settings"]["size"]]
    n_layers = 1 + max([int(n[1:].split(".")[0]) for n in doc.get("nodes", []) if n.startswith("L")] + [0])
    big = max([abs(e["score"]) for e in edges] + [1e-12])
    fig = go.Figure()
    ends = [(_position(e["upstream"], n_layers), _position(e["reader_node"], n_layers)) for e in edges]
    for e, ((x0, y0), (x1, y1)) in zip(edges, ends, strict=True):
        fig.add_scatter(
            x=[x0, x1],
            y=[y0, y1],
            mode="lines",
            showlegend=False,
            hoverinfo="skip",
            line={"color": "#2166ac" if e["score"] >= 0 else "#b2182b", "width": 0.5 + 6 * abs(e["score"]) / big},
            opacity=0.7,
        )
    fig.add_scatter(
        x=[(a[0] + b[0]) / 2 for a, b in ends],
        y=[(a[1] + b[1]) / 2 for a, b in ends],
        mode="markers",
        showlegend=False,
        marker={"size": 6, "color": "rgba(0,0,0,0.15)"},
        text=[f"{_label(e['edge'])}<br>score {_num(e['score'])}<br>exact {_num(e['exact'])}" for e in edges],
        hovertemplate="%{text}<extra></extra>",
    )
    nodes = doc.get("nodes", [])
    pos = [_position(n, n_layers) for n in nodes]
    fig.add_scatter(
        x=[p[0] for p in pos],
        y=[p[1] for p in pos],
        mode="markers+text",
        text=[_label(n) for n in nodes],
        textposition="middle right",
        showlegend=False,
        marker={"size": 11, "color": "#444"},
        hovertemplate="%{text}<extra></extra>",
    )
    fig.update_layout(
        title=f"circuit: top {len(edges)} edges ({doc['settings']['method']}; blue raises the "
        "metric, red lowers it, width |score|)",
        height=max(420, 70 * n_layers),
        xaxis={"visible": False},
        yaxis={
            "zeroline": False,
            "tickvals": list(range(-1, 2 * n_layers + 1)),
            "ticktext": ["embed", *[f"L{i // 2} {'MLP' if i % 2 else 'heads'}" for i in range(2 * n_layers)], "logits"],
        },
        margin={"l": 60, "r": 20, "t": 50, "b": 30},
    )
    return fig


def _need_plotly() -> None:
    try:
        import plotly  # noqa: F401
    except ImportError:
        raise InputError("reports draw with plotly: pip install 'causalscan[report]'", field="report") from None


def figures(doc: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The report's plotly figures by name, from a saved document and its tensors."""
    _need_plotly()
    import plotly.graph_objects as go

    base = doc.get("baselines") or {}
    gap = (base["clean"] - base["corrupt"]) if base else None
    kind, out = doc.get("kind"), {}
    if kind == "scan":
        method, scored_by = doc["settings"]["method"], doc["settings"].get("scored_by") or {}
        for sweep in doc["settings"]["sweeps"]:
            how = scored_by.get(sweep, method)
            fig = _sweep_heatmap(doc, f"{method}/{sweep}", tensors[f"{method}_signed/{sweep}"], gap)
            what = "exact effect" if how == "exact" else f"{how} estimate"
            fig.layout.title.text = f"{sweep}: {what}, {doc['settings']['direction']}; " + fig.layout.title.text
            out[f"{method}/{sweep}"] = fig
        tokens = [f"{i}:{_label(t)}" for i, t in enumerate(doc.get("tokens") or [])]
        for key, pat in tensors.items():
            if key.startswith("pattern/") and len(tokens) == pat.shape[0]:
                fig = heatmap(
                    pat,
                    tokens,
                    tokens,
                    f"attention of {key.split('/', 1)[1]} on the first pair (query rows, key columns)",
                    None,
                )
                fig.update_traces(
                    colorscale="Blues",
                    zmid=None,
                    reversescale=False,
                    zmin=0,
                    zmax=1,
                    hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>",
                )
                out[key] = fig
        for sweep, stats in (doc.get("agreement_by_sweep") or {}).items():
            out[f"agreement/{sweep}"] = _scatter(
                sweep, tensors[f"{method}_signed/{sweep}"].flatten(), tensors[f"exact/{sweep}"].flatten(), stats
            )
    elif kind == "circuit":
        out["circuit"] = _circuit_graph(doc)
        f = doc.get("faithfulness")
        if f:
            n = [x for x in f["n"] if x > 0]
            fig = go.Figure(
                go.Scatter(
                    x=n,
                    y=f["recovered"][-len(n) :],
                    mode="lines+markers",
                    hovertemplate="%{x} edges: %{y:.3f}<extra></extra>",
                )
            )
            fig.add_hline(y=0.8, line={"dash": "dot", "color": "grey"})
            fig.update_layout(
                title=f"faithfulness: share of clean - corrupt the top n edges keep (80% at {f['n_80']}, "
                f"95% at {f['n_95']}; every other edge: {doc['settings']['ablation']})",
                xaxis={"title": "edges in the circuit", "type": "log"},
                yaxis_title="recovered",
                height=340,
            )
            out["faithfulness"] = fig
        if "exact/edges" in tensors:
            out["agreement/edges"] = _scatter(
                "edges",
                tensors[f"{doc['settings']['method']}/edges"].flatten(),
                tensors["exact/edges"].flatten(),
                doc.get("agreement"),
            )
    elif kind == "patch":
        for sweep in doc["settings"]["sweeps"]:
            out[f"exact/{sweep}"] = _sweep_heatmap(doc, f"exact/{sweep}", tensors[f"exact/{sweep}"], gap)
    elif kind == "trace":
        a, b = doc.get("span") or (0, 0)
        y = [("*" if a <= i < b else "") + f"{i}:{_label(t)}" for i, t in enumerate(doc["tokens"])]
        for key, t in tensors.items():
            if key.startswith("trace_norm/"):
                grid = key.split("/", 1)[1]
                fig = heatmap(
                    tensors[f"trace/{grid}"],
                    [str(i) for i in range(t.shape[1])],
                    y,
                    f"{grid}: restored clean state, effect on the metric (tokens x layers; * noised)",
                    gap,
                )
                fig.update_traces(
                    colorscale="Purples" if grid == "resid" else "Greens" if grid == "mlp" else "Reds",
                    zmid=None,
                    reversescale=False,
                )
                out[f"trace/{grid}"] = fig
    elif kind == "elicit":
        rows = doc.get("rows", [])
        for which in ("learned", "random"):
            score = {r["vector"]: r["score"] for r in rows if r["kind"] == which}
            out.setdefault("objective", go.Figure()).add_bar(
                x=[f"v{k}" for k in score],
                y=list(score.values()),
                name=which,
                hovertemplate="%{x}: %{y:.4g}<extra>" + which + "</extra>",
            )
        if "objective" in out:
            out["objective"].update_layout(
                barmode="group", height=340, title="objective per vector: learned against random at the same radius"
            )
        curve = (doc.get("radius_rule") or {}).get("curve")
        if curve:
            fig = go.Figure(go.Scatter(x=[c[0] for c in curve], y=[c[1] for c in curve], mode="lines+markers"))
            fig.update_layout(
                title="radius rule: non-linear share of the response against R (chosen: 0.5)",
                xaxis={"title": "radius R", "type": "log"},
                yaxis_title="non-linear share",
                height=320,
            )
            out["radius"] = fig
    return out


# --- page ------------------------------------------------------------------------------------


def _num(v) -> str:
    return (
        "n/a"
        if v is None or (isinstance(v, float) and math.isnan(v))
        else f"{v:.4g}"
        if isinstance(v, float)
        else html.escape(str(v))
    )


def _kv(d: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_value(v)}</td></tr>" for k, v in d.items())
    return f"<table class='kv'>{rows}</table>"


def _value(v) -> str:
    if isinstance(v, dict):
        return _kv(v) if v else "{}"
    if isinstance(v, list):
        return html.escape(", ".join(str(x) for x in v))
    return _num(v)


def _table(rows: list[dict], cols: list[str], caption: str, mark: str | None = None) -> str:
    """A sortable table (click a header) of ``rows``; ``mark``: a phrase highlighted in string cells."""

    def cell(v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"<td data-v='{v}'>{_num(v)}</td>"
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
            if name.split("/")[0] in ("agreement", "objective", "radius", "pattern", "circuit", "faithfulness")
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
    if kind == "trace":
        parts.append(
            _table(
                doc.get("top", []),
                ["grid", "position", "token", "layer", "effect", "recovered"],
                "strongest restorations",
            )
        )
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
