"""The decoding methods (a module of its own so that the CLI can list them without torch)."""

METHODS = ("ar", "chain", "tree", "dyspec", "dyspec-heap")
