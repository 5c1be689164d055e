"""DySpec: lossless speculative decoding with a dynamic draft-token tree (arXiv 2410.11744).

So far: the tree forward pass on stock transformers (:mod:`pertoken.speculative.tree`).
"""

from pertoken.speculative.tree import (accepted_keep, compact_cache, depths, tree_attention_mask,
                                       tree_forward, tree_position_ids)

__all__ = ["accepted_keep", "compact_cache", "depths", "tree_attention_mask", "tree_forward",
           "tree_position_ids"]
