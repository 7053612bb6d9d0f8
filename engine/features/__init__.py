"""Sparse dictionaries (SAEs, transcoders) as sites: loading SAELens folders, the exact rewrite of a
site through a dictionary, training one, and attribution graphs. See docs/features.md."""

from causalscan.features.dictionary import Dictionary
from causalscan.features.saelens import read, write
from causalscan.features.sites import attach, detach

__all__ = ["Dictionary", "attach", "detach", "read", "write"]
