"""Scan: AtP* over every head and neuron, the top confirmed by exact patching."""

import causalscan as cs

res = cs.scan(
    "induction", cs.zoo.dataset_path("induction", "previous"), sites=["head", "neuron"], method="atp*", confirm=8
)
print(res.top(4))  # both induction heads and both previous-token heads, above every neuron
print(res.to_pandas().head())
