"""Patch: exact activation patching of whole sweeps, many patches per forward."""

import causalscan as cs

model = cs.load("random:llama-tiny")  # or a local HF directory, a zoo name, an HF model object
res = cs.patch(model, "examples/ioi.jsonl", sites=["head", "resid_pre"], direction="noising")
print(res.top(5))  # ranked by mean |effect| over pairs
print(res.tensors()["exact/head"].shape)  # [layers, heads]
