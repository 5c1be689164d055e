"""DySpec: lossless speculative decoding with a dynamic draft-token tree (arXiv 2410.11744).

So far:

- :mod:`pertoken.speculative.tree`: verify a whole draft tree in one forward pass of a stock
  transformers model (4D additive mask, depth positions) and compact the KV cache;
- :mod:`pertoken.speculative.draft_tree`: grow the tree from draft probabilities, drawing
  without replacement (heap construction, Alg. 1; layer-wise threshold, Alg. 2), or a
  chain for classic speculative sampling;
- :mod:`pertoken.speculative.verify`: recursive rejection sampling and greedy verification;
- :mod:`pertoken.speculative.generate`: the decoding loop for ``ar``, ``chain``, ``tree``
  (Sequoia's static tree), ``dyspec`` and ``dyspec-heap``;
- :mod:`pertoken.speculative.draft_train`: distil a small draft for a target;
- :mod:`pertoken.speculative.eagle` and :mod:`~pertoken.speculative.eagle_train`: an
  EAGLE-style draft head on the target's own features, and its training;
- :mod:`pertoken.speculative.bench`: acceptance, cost curve, automatic budget and the
  side-by-side benchmark.
"""

from pertoken._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "DraftTree": "pertoken.speculative.verify",
    "GenerateOutput": "pertoken.speculative.generate",
    "BenchConfig": "pertoken.speculative.bench",
    "DraftTrainConfig": "pertoken.speculative.draft_train",
    "EagleHead": "pertoken.speculative.eagle",
    "EagleTrainConfig": "pertoken.speculative.eagle_train",
    "load_eagle": "pertoken.speculative.eagle",
    "train_eagle": "pertoken.speculative.eagle_train",
    "accepted_keep": "pertoken.speculative.tree",
    "auto_budget": "pertoken.speculative.bench",
    "choose_budget": "pertoken.speculative.bench",
    "chain_tree": "pertoken.speculative.draft_tree",
    "compact_cache": "pertoken.speculative.tree",
    "depths": "pertoken.speculative.tree",
    "generate": "pertoken.speculative.generate",
    "heap_tree": "pertoken.speculative.draft_tree",
    "measure_acceptance": "pertoken.speculative.bench",
    "race_order": "pertoken.speculative.draft_tree",
    "run_bench": "pertoken.speculative.bench",
    "static_shape": "pertoken.speculative.draft_tree",
    "static_tree": "pertoken.speculative.draft_tree",
    "threshold_tree": "pertoken.speculative.draft_tree",
    "tree_attention_mask": "pertoken.speculative.tree",
    "tree_forward": "pertoken.speculative.tree",
    "train_draft": "pertoken.speculative.draft_train",
    "tree_position_ids": "pertoken.speculative.tree",
    "verify_greedy": "pertoken.speculative.verify",
    "verify_sampling": "pertoken.speculative.verify",
    "warp": "pertoken.speculative.generate",
})
