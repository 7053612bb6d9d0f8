"""Kernels bound into PyTorch. The engine calls ops only through this package."""
