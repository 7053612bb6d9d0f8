"""Perturb: interventions inside the forward pass, as a context manager or one call."""

import torch

import causalscan as cs
from causalscan.model import interventions as iv

model = cs.load("induction")
ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8]])
steer = iv.add("resid_post", torch.randn(model.adapter.d_model), alpha=4.0, layers=0, positions=[-1])
with cs.perturb(model, iv.zero("head", layers=1, index=[0, 1]), steer):
    logits = model.hf(input_ids=ids).logits
print(logits[0, -1].argmax().item(), model.hf(input_ids=ids).logits[0, -1].argmax().item())
