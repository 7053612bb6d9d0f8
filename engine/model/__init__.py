"""The model layer: a checkpoint loaded and checked (HF directory, GGUF, zoo, random), the adapter from
sites to its modules, forwards of the model or a slice of its layers with taps, interventions, gradient taps,
relevance rules.
May import: base, bindings.
"""
