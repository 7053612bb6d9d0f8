"""Node methods: attribution patching (AtP, AtP*, AtP-IG), exact patching many patches per forward,
the scan that estimates then confirms, ROME's causal tracing, the false-negative bound, agreement.
May import: base, services, bindings, model, data.
"""
