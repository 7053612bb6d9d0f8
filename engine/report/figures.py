"""The report's figures, as plotly figures by name: one signed heatmap per sweep, estimate against
exact for each sweep's confirmed nodes, attention patterns, tracing grids, the circuit, and for
``elicit`` the objective per vector and the radius rule's curve. Token labels are HTML-escaped
before plotly draws them (plotly reads a few tags in labels).
"""

from __future__ import annotations

import math

import torch

from causalscan.errors import InputError
from causalscan.report.audit import audit_figures
from causalscan.report.graphs import attribution_graph, circuit_graph
from causalscan.report.labels import label as _label
from causalscan.report.labels import number_text

MAX_COLUMNS = 64  # a sweep wider than this (neurons) shows each layer's top MAX_COLUMNS by |value|


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
            f" (n {stats['n']}: Spearman {number_text(stats['spearman'])}, recall@{stats['k']} "
            f"{number_text(stats['recall_at_k'])}, sign {number_text(stats['sign_agreement'])})"
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
        out["circuit"] = circuit_graph(doc)
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
    elif kind == "graph":
        out["graph"] = attribution_graph(doc, tensors)
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
    elif kind == "audit":
        out.update(audit_figures(doc))
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
