"""What a method runs on: datasets of prompt pairs and their prompts, task generators, metrics, the
corruption rows, the sweeps of components, and the inputs prepared once from all of them.
May import: base, model.
"""
