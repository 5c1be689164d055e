"""The decoding methods (a module of its own so that the CLI can list them without torch)."""

METHODS = ("ar", "chain", "tree", "dyspec", "dyspec-heap")

BENCH_METHODS = METHODS + ("hf-assisted", "hf-ar")
"""``hf-assisted``: transformers' ``generate(assistant_model=...)``; ``hf-ar``: its plain loop."""
