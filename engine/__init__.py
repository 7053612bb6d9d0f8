"""causalscan: causal perturbation analysis of transformer language models.

>>> import causalscan as cs
>>> model = cs.load("random:llama-tiny")
>>> res = cs.scan("induction", cs.zoo.dataset_path("induction"), sites=["head", "neuron"], confirm=8)
>>> res.top(5), res.agreement
>>> tr = cs.trace("facts", cs.zoo.dataset_path("facts", "subjects"), window=1)   # ROME causal tracing
"""

from causalscan import interventions, metrics, steering, zoo
from causalscan.data import Dataset
from causalscan.elicit import elicit
from causalscan.errors import InputError
from causalscan.interventions import Intervention, perturb
from causalscan.load import Model, load
from causalscan.patching import Component, patch
from causalscan.scan import scan
from causalscan.tracing import trace

__version__ = "0.1.0"
__all__ = ["Component", "Dataset", "InputError", "Intervention", "Model", "elicit", "interventions", "load",
           "metrics", "patch", "perturb", "scan", "steering", "trace", "zoo"]
