"""Quick start: the README's main job from Python (the twin of `causalscan scan --out out/scan`)."""

import causalscan as cs

res = cs.scan("induction", cs.zoo.dataset_path("induction"), sites=["head", "neuron", "resid_pre"], confirm=32)
print(res.top(5))  # ranked nodes: score, signed estimate, exact effect
print(res.agreement)  # Spearman, recall@K, sign agreement on the confirmed nodes
res.save("out/scan")  # scan.json + scores.safetensors
