"""Circuit: edge attribution (EAP-IG) on the zoo's induction model, confirmed by exact edge patching,
with its faithfulness curve, saved as JSON, Graphviz dot and the HTML report."""

import causalscan as cs

res = cs.circuit("induction", cs.zoo.dataset_path("induction", "previous"), method="eap-ig", edges=12, confirm=10)
for row in res.top(8):  # the copied token's value, the induction heads -> logits, previous-token -> keys
    print(row["edge"], round(row["score"], 3), row["exact"])
print(res.agreement["recall_at_k"], res.faithfulness["n_80"])  # exact agreement; edges for 80% recovery
res.save("out/circuit")  # circuit.json, scores.safetensors, circuit.dot
res.report("out/circuit/report.html")
