"""Directions and steering: directions from contrasts (diff of means, PCA, ITI probes) and their
choice by intervention, weight baking, conditional steering (CAST), MELBO/DCT search, steered generation.
May import: base, services, bindings, model, data.
"""

from causalscan.steering.generation import generate

__all__ = ["generate"]
