"""Sparse dictionaries (SAEs, transcoders): training a small one (:mod:`causalscan.features.training`)
and attribution graphs with transcoders (:mod:`causalscan.features.attribution_graph`). The dictionary,
its SAELens folders and the feature sites live in the model layer (:mod:`causalscan.model.dictionary`,
:mod:`causalscan.model.saelens`, :mod:`causalscan.model.features`) and are re-exported here. See
docs/features.md and docs/graph.md.
May import: base, services, model, data.
"""

from causalscan.model.dictionary import Dictionary
from causalscan.model.features import attach, detach
from causalscan.model.saelens import read, write

__all__ = ["Dictionary", "attach", "detach", "read", "write"]
