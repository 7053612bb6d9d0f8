"""Features: a small SAE trained on the backdoor model, its latents patched, scanned and steered."""

import json

import causalscan as cs
from causalscan.features.training import train
from causalscan.model import saelens

model = cs.load("backdoor")
prompts = [json.loads(line)["prompt"] for line in open("examples/backdoor_prompts.jsonl")]
sae, stats = train(model, "resid_pre", 3, d_sae=256, prompts=prompts, k=8, tokens=12_000, epochs=6)
print(stats["explained_variance"], stats["dead_share"])  # held-out explained variance, dead latents
saelens.write(sae, "out/sae-backdoor")  # SAELens's format: cfg.json + sae_weights.safetensors

model = cs.load("backdoor", sae="out/sae-backdoor")  # adds the sites feature and feature_error
data = cs.zoo.dataset_path("backdoor")
res = cs.scan(model, data, sites=["feature", "feature_error"])  # estimated, confirmed by exact patching
print(res.top(5))
exact = cs.patch(model, data, sites=["feature"])  # every latent exactly (off latents cost nothing)
print(exact.tensors()["exact/feature"].shape)  # [layers with a dictionary, positions, d_sae]
