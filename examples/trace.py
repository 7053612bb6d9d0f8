"""Trace: ROME causal tracing on the zoo's facts model (noise on the subject tokens)."""

import causalscan as cs

tr = cs.trace("facts", cs.zoo.dataset_path("facts", "subjects"), window=1)
print(tr.top(3))  # the restorations that recover the most
print(tr.tensors()["trace_norm/mlp"].shape)  # [tokens, layers]: share of clean - corrupt recovered
