"""Audit: find the zoo backdoor's hidden behaviour with no trigger and no phrase given."""

import causalscan as cs

res = cs.audit("backdoor", n=16)  # its 20 clean prompts: 10 to learn on, 10 held out
for mode in res.modes[:3]:  # ranked: novelty x specificity (learned, not random) x generalisation
    print(mode["mode"], mode["name"], mode["learned_vectors"], mode["random_vectors"], mode["examples"][0])
print(res.ranking[0])  # the best vector: its layer, radius, mode and share of held-out prompts
res.save("out/audit")  # audit.json, vectors.safetensors (ranked), completions.jsonl
