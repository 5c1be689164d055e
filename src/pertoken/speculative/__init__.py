"""DySpec: lossless speculative decoding with a dynamic draft-token tree (arXiv 2410.11744).

So far:

- :mod:`pertoken.speculative.tree`: verify a whole draft tree in one forward pass of a stock
  transformers model (4D additive mask, depth positions) and compact the KV cache;
- :mod:`pertoken.speculative.draft_tree`: grow the tree from draft probabilities, drawing
  without replacement (heap construction, Alg. 1; layer-wise threshold, Alg. 2), or a
  chain for classic speculative sampling;
- :mod:`pertoken.speculative.verify`: recursive rejection sampling and greedy verification;
- :mod:`pertoken.speculative.generate`: the decoding loop for ``ar``, ``chain``, ``dyspec`` and ``dyspec-heap``.
"""

import importlib

# Exports load on first use (PEP 562), so that importing the CLI stays light.
_EXPORTS = {
    "DraftTree": "pertoken.speculative.verify",
    "GenerateOutput": "pertoken.speculative.generate",
    "accepted_keep": "pertoken.speculative.tree",
    "chain_tree": "pertoken.speculative.draft_tree",
    "compact_cache": "pertoken.speculative.tree",
    "depths": "pertoken.speculative.tree",
    "generate": "pertoken.speculative.generate",
    "heap_tree": "pertoken.speculative.draft_tree",
    "race_order": "pertoken.speculative.draft_tree",
    "threshold_tree": "pertoken.speculative.draft_tree",
    "tree_attention_mask": "pertoken.speculative.tree",
    "tree_forward": "pertoken.speculative.tree",
    "tree_position_ids": "pertoken.speculative.tree",
    "verify_greedy": "pertoken.speculative.verify",
    "verify_sampling": "pertoken.speculative.verify",
    "warp": "pertoken.speculative.generate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
