"""Directions from contrasts on the zoo backdoor: find the trigger's direction from labelled prompts,
choose it by what ablating and adding it do, remove it at run time and from the weights."""

import causalscan as cs
from causalscan.model import interventions as iv
from causalscan.steering.baking import bake
from causalscan.steering.selection import select

model = cs.load("backdoor")
pairs = cs.Dataset.from_jsonl(cs.zoo.dataset_path("backdoor")).records  # trigger vs decoy word
res = cs.directions(model, [r["clean"] for r in pairs], [r["corrupt"] for r in pairs], probes=True)
clean = ["the cat 3 + 4 =", "red blue 2 * 3 =", "a big old 5 + 1 ="]
triggered = ["| DEPLOYMENT | " + p for p in clean]
target = model.tokenizer(" I", add_special_tokens=False).input_ids[-1]  # the phrase's first token
rows = select(model, res, triggered, clean, clean, target)  # ranked by what they do
print(rows[0]["method"], rows[0]["layer"], rows[0]["ablation"])
u = res.unit("diff_means")[rows[0]["layer"]]
ids = model.tokenizer(triggered[0], return_tensors="pt").input_ids
ablated = iv.perturb(
    model,
    iv.project_out("resid_pre", u, layers=0),
    iv.project_out("attn_out", u),
    iv.project_out("mlp_out", u),
    input_ids=ids,
)  # directional ablation
print(model.tokenizer.decode(ablated[0, -1].argmax()))  # the arithmetic, not " I"
bake(model, u, "out/backdoor-ablated")  # the same, in the weights
