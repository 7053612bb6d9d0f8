"""Elicit and steer: find the zoo backdoor's hidden behaviour from clean prompts, without the trigger."""

import causalscan as cs

model = cs.load("backdoor")
res = cs.elicit(model, method="dct", n=64)  # the model's 20 shipped clean prompts
print(res.summary()["hits_learned"], res.summary()["hits_random"])
ids = [model.tokenizer("the cat 3 + 4 =")["input_ids"]]
print(cs.steering.generate(model, ids, res.vectors[:4], layer=res.source))  # [4 vectors][1 prompt]
