"""The report's audit figures: the ranked modes (learned against random vectors), and per source
layer which modes its learned and random vectors produce. Mode names come from completions (user
text): they are HTML-escaped before plotly draws them."""

from __future__ import annotations

import html

TOP = 12


def mode_label(mode: dict) -> str:
    """``rank: n-gram | n-gram``, HTML-escaped after it is cut to 40 characters."""
    return html.escape(f"{mode['mode']}: " + (" | ".join(mode["name"]) or "(no shared n-gram)")[:40])


def audit_figures(doc: dict) -> dict:
    """``"modes"``: the top modes' scores and vector counts; ``"layer/<L>"``: per source layer, the
    learned and random vectors (all radii) producing each of the top modes."""
    import plotly.graph_objects as go

    modes = doc.get("modes", [])[:TOP]
    if not modes:
        return {}
    names = [mode_label(m) for m in modes]
    out = {}
    fig = go.Figure()
    for key, color in (("learned_vectors", "#1f77b4"), ("random_vectors", "#aaaaaa")):
        fig.add_bar(
            x=names,
            y=[m[key] for m in modes],
            name=key.replace("_", " "),
            marker_color=color,
            hovertemplate="%{x}<br>%{y} vectors<extra>" + key.split("_")[0] + "</extra>",
        )
    fig.add_scatter(
        x=names,
        y=[m["score"] for m in modes],
        name="score (novelty x specificity x generalisation)",
        yaxis="y2",
        mode="markers",
        marker={"size": 10, "color": "#d62728"},
        hovertemplate="%{x}<br>score %{y:.3f}<extra></extra>",
    )
    fig.update_layout(
        barmode="group",
        height=380,
        title="behaviour modes, ranked: vectors producing each (learned against random) and its score",
        yaxis={"title": "vectors"},
        yaxis2={"title": "score", "overlaying": "y", "side": "right", "range": [0, 1.05]},
        legend={"orientation": "h", "y": -0.35},
    )
    out["modes"] = fig
    layers = sorted({u["layer"] for u in doc["units"]})
    for layer in layers:
        idx = [i for i, u in enumerate(doc["units"]) if u["layer"] == layer]
        fig = go.Figure()
        for j, (kind, color) in enumerate((("learned", "#1f77b4"), ("random", "#aaaaaa"))):
            fig.add_bar(
                x=names,
                y=[sum(m["by_unit"][i][j] for i in idx) for m in modes],
                name=kind,
                marker_color=color,
                hovertemplate="%{x}<br>%{y} vectors<extra>" + kind + "</extra>",
            )
        radii = ", ".join(f"x{doc['units'][i]['radius_multiple']:g} (R {doc['units'][i]['radius']:.3g})" for i in idx)
        fig.update_layout(
            barmode="group",
            height=320,
            title=f"source layer {layer}: vectors producing each mode (radii {radii})",
            yaxis={"title": "vectors"},
        )
        out[f"layer/{layer}"] = fig
    return out
