"""Sparse autoencoders with adaptive sparsity allocation: TopK, Mutual Choice (BatchTopK) and
Feature Choice, with aux_k and aux_zipf losses (arXiv 2411.02124; spec ``sae.md``).

So far:

- :mod:`pertoken.sae.selection`: the selection rules, with deterministic tie-breaking, and
  Feature Choice capacities (uniform, Zipf);
- :mod:`pertoken.sae.model`: the autoencoder (tied init, unit-norm decoder, batch or threshold
  codes), FVU, the aux_k loss and aux_zipf's candidates (Zipf fit of feature densities);
- :mod:`pertoken.sae.cache`: residual-stream activations into float16 shards (resumable,
  shuffled across documents) and :class:`~pertoken.sae.cache.ActivationStore` to read them.

``pertoken sae cache`` writes a store from the command line.

Still to come (issue #5): ``sae train`` and ``sae eval``, the trainer, threshold conversion, evaluation,
SAELens-format saving and the benchmark.
"""

from pertoken._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "ActivationStore": "pertoken.sae.cache",
    "CacheConfig": "pertoken.sae.cache",
    "cache_activations": "pertoken.sae.cache",
    "SAEConfig": "pertoken.sae.model",
    "SparseAutoencoder": "pertoken.sae.model",
    "aux_loss": "pertoken.sae.model",
    "fvu": "pertoken.sae.model",
    "underused": "pertoken.sae.model",
    "zipf_fit": "pertoken.sae.model",
    "batch_topk_mask": "pertoken.sae.selection",
    "feature_choice_mask": "pertoken.sae.selection",
    "select": "pertoken.sae.selection",
    "topk_mask": "pertoken.sae.selection",
    "uniform_capacities": "pertoken.sae.selection",
    "zipf_capacities": "pertoken.sae.selection",
})
