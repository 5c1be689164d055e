"""pertoken: make language models spend less per token.

The core modules are shared by every method:

- :mod:`pertoken.models`: load a causal LM and its tokenizer (alias, local folder, GGUF file).
- :mod:`pertoken.data`: named corpora built from installed packages, user text files, splits.
- :mod:`pertoken.evaluate`: perplexity and bits per byte.
- :mod:`pertoken.report`: gather ``docs/results/*.json`` into one HTML page.
"""

__version__ = "0.1.0"
