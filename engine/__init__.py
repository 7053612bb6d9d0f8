"""causalscan: causal perturbation analysis of transformer language models.

>>> import causalscan as cs
>>> res = cs.scan("induction", cs.zoo.dataset_path("induction"), sites=["head", "neuron"], confirm=8)
>>> res.agreement["recall_at_k"]
1.0
>>> tr = cs.trace("facts", cs.zoo.dataset_path("facts", "subjects"), window=1)   # ROME causal tracing
>>> tr.tensors()["trace_norm/mlp"].shape                                         # [tokens, layers]
torch.Size([5, 4])
"""

from causalscan import interventions, metrics, steering, tasks, zoo
from causalscan.circuits import circuit
from causalscan.data import Dataset
from causalscan.directions import directions
from causalscan.elicit import elicit
from causalscan.errors import InputError
from causalscan.interventions import Intervention, perturb
from causalscan.load import Model, load
from causalscan.patching import patch
from causalscan.scan import scan
from causalscan.sweeps import Component
from causalscan.tracing import trace

__version__ = "0.1.0"
__all__ = [
    "Component",
    "Dataset",
    "InputError",
    "Intervention",
    "Model",
    "circuit",
    "directions",
    "elicit",
    "interventions",
    "load",
    "metrics",
    "patch",
    "perturb",
    "scan",
    "steering",
    "tasks",
    "trace",
    "zoo",
]
