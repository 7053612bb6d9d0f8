"""Kernels bound into PyTorch: launchers, custom ops with fake-tensor rules, the backend choice.
The engine calls ops only through this package (``causalscan.bindings.ops``).
May import: kernels.
"""
