"""causalscan: causal perturbation analysis of transformer language models.

>>> import causalscan as cs
>>> res = cs.scan("induction", cs.zoo.dataset_path("induction"), sites=["head", "neuron"], confirm=8)
>>> res.agreement["recall_at_k"]
1.0
>>> tr = cs.trace("facts", cs.zoo.dataset_path("facts", "subjects"), window=1)   # ROME causal tracing
>>> tr.tensors()["trace_norm/mlp"].shape                                         # [tokens, layers]
torch.Size([5, 4])

The public API: the verbs below and their results; ``interventions``, ``metrics``, ``tasks``,
``steering`` and ``zoo`` as modules. The layout of the package: docs/architecture.md.
"""

from causalscan import steering, zoo
from causalscan.circuits.circuit import circuit
from causalscan.data import metrics, tasks
from causalscan.data.pairs import Dataset
from causalscan.data.sweeps import Component
from causalscan.errors import InputError
from causalscan.features.attribution_graph import attribution_graph
from causalscan.model import interventions
from causalscan.model.interventions import Intervention, perturb
from causalscan.model.load import Model, load
from causalscan.patching.patch import patch
from causalscan.patching.scan import scan
from causalscan.patching.tracing import trace
from causalscan.steering.audit import audit
from causalscan.steering.directions import directions
from causalscan.steering.elicit import elicit
from causalscan.versions import __version__

__all__ = [
    "Component",
    "Dataset",
    "InputError",
    "Intervention",
    "Model",
    "__version__",
    "attribution_graph",
    "audit",
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
