"""causalscan: causal perturbation analysis of transformer language models."""

from causalscan.errors import InputError
from causalscan.load import Model, load

__version__ = "0.1.0"
__all__ = ["InputError", "Model", "load"]
