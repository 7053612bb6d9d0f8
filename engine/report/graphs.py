"""The report's graph figures: a circuit's top edges between its nodes, and an attribution graph's
pruned nodes and strongest edges over tokens and layers."""

from __future__ import annotations

import torch

from causalscan.report.labels import label as _label
from causalscan.report.labels import number_text


def _position(node: str, n_layers: int, latents: dict | None = None) -> tuple[float, float]:
    """Where a circuit node sits: the embedding at the bottom, each layer's heads (and key-value
    heads) in a row and its MLP above them with its latent nodes beside it (``latents``: a node's
    place in its layer's row), the logits on top."""
    if node == "embed":
        return 0.0, -1.0
    if node == "logits":
        return 0.0, 2.0 * n_layers
    layer, rest = node[1:].split(".", 1)
    if rest == "MLP":
        return 0.0, 2 * int(layer) + 1.0
    if rest.startswith("F"):
        return 1.0 + (latents or {}).get(node, 0), 2 * int(layer) + 1.0
    return float(rest.lstrip("KVH")) + (0.5 if rest.startswith("KV") else 0.0) + 1.0, 2.0 * int(layer)


def circuit_graph(doc: dict):
    """The circuit's edges as lines between nodes: blue positive, red negative, width by |score|."""
    import plotly.graph_objects as go

    edges = doc.get("edges", [])[: doc["settings"]["size"]]
    n_layers = 1 + max([int(n[1:].split(".")[0]) for n in doc.get("nodes", []) if n.startswith("L")] + [0])
    feats = sorted(
        (n for n in doc.get("nodes", []) if ".F" in n), key=lambda n: (n.split(".")[0], int(n.split("F")[1]))
    )
    latents = {n: sum(1 for m in feats[:i] if m.split(".")[0] == n.split(".")[0]) for i, n in enumerate(feats)}
    big = max([abs(e["score"]) for e in edges] + [1e-12])
    fig = go.Figure()
    ends = [
        (_position(e["upstream"], n_layers, latents), _position(e["reader_node"], n_layers, latents)) for e in edges
    ]
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
        text=[
            f"{_label(e['edge'])}<br>score {number_text(e['score'])}<br>exact {number_text(e['exact'])}" for e in edges
        ],
        hovertemplate="%{text}<extra></extra>",
    )
    nodes = doc.get("nodes", [])
    pos = [_position(n, n_layers, latents) for n in nodes]
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


DRAWN_EDGES = 300  # an attribution graph's figure draws at most this many of its pruned edges


def attribution_graph(doc: dict, tensors: dict[str, torch.Tensor]):
    """The pruned attribution graph: nodes at (position, layer) (tokens at the bottom, logits on top),
    its strongest edges (at most ``DRAWN_EDGES``) as lines, blue positive, red negative; size by
    influence on the logits; hover names each node."""
    import plotly.graph_objects as go

    nodes = doc["pruned"]["nodes"]
    edges = tensors["pruned_edges"]  # [E, 3]: source, target (indices into nodes), weight
    edges = edges[edges[:, 2].abs().argsort(descending=True)[:DRAWN_EDGES]]
    n_layers = doc["graph"]["layers"]
    count: dict = {}
    for n in nodes:
        count[(n["layer"], n["position"])] = count.get((n["layer"], n["position"]), 0) + 1
    spot, seen = [], {}
    for n in nodes:  # nodes sharing (layer, position) spread across the token's column
        key = (n["layer"], n["position"])
        k, c = seen.get(key, 0), count[key]
        spot.append((n["position"] + (0.8 * k / (c - 1) - 0.4 if c > 1 else 0.0), n["layer"]))
        seen[key] = k + 1
    fig = go.Figure()
    for positive, color in ((True, "#2166ac"), (False, "#b2182b")):
        xs, ys = [], []
        for a, b, v in edges.tolist():
            if (v >= 0) == positive:
                xs += [spot[int(a)][0], spot[int(b)][0], None]
                ys += [spot[int(a)][1], spot[int(b)][1], None]
        fig.add_scatter(
            x=xs, y=ys, mode="lines", line={"color": color, "width": 1}, opacity=0.5, hoverinfo="skip", showlegend=False
        )
    top = max([n["influence"] for n in nodes] + [1e-12])
    colors = {"latent": "#444", "error": "#999", "token": "#1b9e77", "logit": "#d95f02"}
    fig.add_scatter(
        x=[p[0] for p in spot],
        y=[p[1] for p in spot],
        mode="markers",
        marker={
            "size": [6 + 14 * min(1.0, max(n["influence"], 0.0) / top) ** 0.5 for n in nodes],
            "color": [colors[n["kind"]] for n in nodes],
        },
        text=[f"{_label(n['node'])}<br>influence {number_text(n['influence'])}" for n in nodes],
        hovertemplate="%{text}<extra></extra>",
        showlegend=False,
    )
    tokens = doc.get("tokens") or []
    fig.update_layout(
        title=f"attribution graph: {len(nodes)} nodes, {doc['graph']['pruned_edges']} edges after pruning<br>"
        f"<sup>the {len(edges)} strongest drawn; blue raises the target, red lowers it; size: influence on the "
        "logits; grey: error nodes, green: tokens</sup>",
        height=max(420, 40 * (n_layers + 2)),
        xaxis={"title": "token", "tickvals": list(range(len(tokens))), "ticktext": [_label(x) for x in tokens]},
        yaxis={
            "zeroline": False,
            "tickvals": list(range(-1, n_layers + 1)),
            "ticktext": ["tokens", *[f"L{i}" for i in range(n_layers)], "logits"],
        },
        margin={"l": 60, "r": 20, "t": 50, "b": 60},
    )
    return fig


__all__ = ["DRAWN_EDGES", "attribution_graph", "circuit_graph"]
