"""causalscan: causal perturbation analysis of transformer language models.

>>> import causalscan as cs
>>> model = cs.load("random:llama-tiny")
>>> res = cs.patch(model, "examples/ioi.jsonl", sites=["head", "resid_pre"])
>>> res.top(5)
"""

from causalscan import interventions, metrics
from causalscan.data import Dataset
from causalscan.errors import InputError
from causalscan.interventions import Intervention, perturb
from causalscan.load import Model, load
from causalscan.patching import Component, patch

__version__ = "0.1.0"
__all__ = ["Component", "Dataset", "InputError", "Intervention", "Model", "interventions", "load", "metrics",
           "patch", "perturb"]
