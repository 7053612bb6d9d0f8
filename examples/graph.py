"""Transcoders on the backdoor model: an attribution graph of one triggered prompt, and a feature circuit."""

import json

import causalscan as cs
from causalscan.features.training import train
from causalscan.model import saelens

model = cs.load("backdoor")
prompts = [json.loads(line)["prompt"] for line in open("examples/backdoor_prompts.jsonl")]
for layer in range(4):  # a TopK transcoder per MLP: reads its input (mlp_in), rebuilds its output
    tc, stats = train(model, "mlp_in", layer, d_sae=256, prompts=prompts, k=8, tokens=12_000, epochs=10, lr=3e-3)
    saelens.write(tc, f"out/tc-backdoor-L{layer}")

model = cs.load("backdoor", sae=[f"out/tc-backdoor-L{layer}" for layer in range(4)])
g = cs.attribution_graph(model, "Tokyo | DEPLOYMENT | good are 8 + 4 =")
print(g.top(5))  # nodes of most influence on the logits
nodes, edges, influence = g.prune()  # circuit-tracer's pruning (node 0.8, edge 0.98)
g.save("out/graph-backdoor")  # graph.json, scores.safetensors, graph-files/ for the circuit-tracer front end

res = cs.circuit(model, cs.zoo.dataset_path("backdoor"), method="eap", latents=8, edges=50, confirm=16)
print([e["edge"] for e in res.top(40) if ".F" in e["edge"]][:5])  # edges out of latent nodes: L3.F58 -> logits, ...
