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

from pertoken.speculative.generate import GenerateOutput, generate, warp
from pertoken.speculative.draft_tree import chain_tree, heap_tree, race_order, threshold_tree
from pertoken.speculative.tree import (accepted_keep, compact_cache, depths, tree_attention_mask,
                                       tree_forward, tree_position_ids)
from pertoken.speculative.verify import DraftTree, verify_greedy, verify_sampling

__all__ = ["DraftTree", "GenerateOutput", "generate", "warp", "accepted_keep", "chain_tree", "compact_cache", "depths", "heap_tree", "race_order",
           "threshold_tree", "tree_attention_mask", "tree_forward", "tree_position_ids",
           "verify_greedy", "verify_sampling"]
