"""Sparse autoencoders with adaptive sparsity allocation: TopK, Mutual Choice (BatchTopK) and
Feature Choice, with aux_k and aux_zipf losses (arXiv 2411.02124; spec ``sae.md``).

- :mod:`pertoken.sae.selection`: the selection rules, with deterministic tie-breaking, and
  Feature Choice capacities (uniform, Zipf);
- :mod:`pertoken.sae.model`: the autoencoder (tied init, unit-norm decoder, batch or threshold
  codes), FVU, the aux_k loss and aux_zipf's candidates (Zipf fit of feature densities);
- :mod:`pertoken.sae.cache`: residual-stream activations into float16 shards (resumable,
  shuffled across documents) and :class:`~pertoken.sae.cache.ActivationStore` to read them;
- :mod:`pertoken.sae.io`: :func:`save_sae` writes the SAELens folder layout (activation scale
  folded in; Mutual/Feature Choice as JumpReLU with their thresholds) and :func:`load` reads it
  back;
- :mod:`pertoken.sae.train`: the trainer (sparse forward and backward, dead counters in
  tokens, aux losses, learnt inference thresholds, Zipf capacities, checkpoints and resume,
  data-parallel under ``torchrun``);
- :mod:`pertoken.sae.metrics`: :func:`evaluate` (FVU, L0 distribution, dead fraction, feature
  densities; batch or threshold mode) and :func:`ce_loss_recovered` (CE loss recovered, ΔCE,
  KL score).

On the command line: ``pertoken sae cache`` writes a store, ``pertoken sae train`` trains an
SAE on it, ``pertoken sae eval`` scores a saved SAE on a held-out store.
"""

from pertoken._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "ActivationStore": "pertoken.sae.cache",
    "CacheConfig": "pertoken.sae.cache",
    "cache_activations": "pertoken.sae.cache",
    "ce_loss_recovered": "pertoken.sae.metrics",
    "evaluate": "pertoken.sae.metrics",
    "load": "pertoken.sae.io",
    "save_sae": "pertoken.sae.io",
    "SAEConfig": "pertoken.sae.model",
    "TrainConfig": "pertoken.sae.train",
    "train_sae": "pertoken.sae.train",
    "write_store": "pertoken.sae.cache",
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
