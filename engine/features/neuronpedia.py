"""An attribution graph as the JSON that circuit-tracer's and Neuronpedia's graph front ends read:
``metadata`` (slug, the transcoders, the prompt's tokens, the node threshold), ``qParams``, ``nodes``
(``node_id`` ``{layer}_{latent}_{position}``, ``feature_type`` "cross layer transcoder", "mlp
reconstruction error", "embedding" or "logit", cumulative ``influence``, ``activation``) and
``links`` (``source``, ``target``, ``weight``) of the pruned graph. Their front end names every
transcoder latent "cross layer transcoder"; per-layer transcoders are the case of one layer."""

from __future__ import annotations

import torch


def export(g, slug: str = "causalscan-graph") -> dict:
    """The pruned graph in the JSON that circuit-tracer's and Neuronpedia's front ends read
    (``metadata``, ``qParams``, ``nodes``, ``links``)."""
    nodes, edges, inf = g.prune()
    sorted_inf, order = inf.sort(descending=True)
    cum = torch.zeros_like(inf)
    cum[order] = sorted_inf.cumsum(0) / sorted_inf.sum().clamp_min(1e-30)
    ids = {}
    out_nodes = []
    for u in nodes.nonzero().flatten().tolist():
        node = _node(g, u, cum[u].item())
        ids[u] = node["node_id"]
        out_nodes.append(node)
    t, s = edges.nonzero().unbind(1)
    links = [
        {"source": ids[a], "target": ids[b], "weight": g.adjacency[b, a].item()}
        for a, b in zip(s.tolist(), t.tolist(), strict=True)
        if a in ids and b in ids
    ]
    used = {x for link in links for x in (link["source"], link["target"])}
    out_nodes = [n for n in out_nodes if n["node_id"] in used or n["feature_type"] in ("embedding", "logit")]
    return {
        "metadata": {
            "slug": slug,
            "scan": g.model,
            "transcoder_list": list(g.settings["transcoders"].values()),
            "prompt_tokens": g.tokens,
            "prompt": "".join(g.tokens),
            "node_threshold": g.settings["node_threshold"],
            "schema_version": 1,
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": out_nodes,
        "links": links,
    }


def _node(g, u: int, cum: float) -> dict:
    layer, pos, i = g.where(u)
    kind = g.kind(u)
    base = {"ctx_idx": pos, "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0}
    base |= {"clerp": "", "influence": cum, "activation": None}
    if kind == "latent":
        node_id = f"{layer}_{i}_{pos}"
        return base | {
            "node_id": node_id,
            "feature": (layer + i) * (layer + i + 1) // 2 + i,  # Cantor pairing of (layer, latent)
            "layer": str(layer),
            "feature_type": "cross layer transcoder",
            "jsNodeId": f"{layer}_{i}-0",
            "activation": g.activations[u].item(),
        }
    if kind == "error":
        return base | {
            "node_id": f"{layer}_-1_{pos}",
            "feature": -1,
            "layer": str(layer),
            "feature_type": "mlp reconstruction error",
            "jsNodeId": f"{layer}_-1-{pos}",
        }
    if kind == "token":
        return base | {
            "node_id": f"E_{i}_{pos}",
            "feature": pos,
            "layer": "E",
            "feature_type": "embedding",
            "jsNodeId": f"E_{i}-{pos}",
        }
    j = u - (len(g.adjacency) - len(g.logit_tokens))
    p = g.logit_probs[j].item()
    return base | {
        "node_id": f"{g.n_layers + 1}_{i}_{pos}",
        "feature": i,
        "layer": str(g.n_layers + 1),
        "feature_type": "logit",
        "token_prob": p,
        "is_target_logit": j == 0,
        "jsNodeId": f"L_{i}-{pos}",
        "clerp": f'Output "{g.logit_strings[j]}" (p={p:.3f})',
    }


__all__ = ["export"]
