"""Elementwise ops of causalscan, each with a pure-PyTorch reference beside its kernel.
Kernels know nothing of models: they see tensors shaped ``[batch, pos, comp, dim]``.
May import: nothing of causalscan.
"""
