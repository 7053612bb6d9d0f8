"""Edge methods: the model's graph of residual writes and readers, edge attribution (EAP, EAP-IG),
exact edge patching, and ``circuit`` with its faithfulness curve.
May import: base, services, bindings, model, data, patching.
"""
