"""SuperBPE: superword tokenizers (Liu et al., 2025, arXiv 2503.13423).

Byte-level BPE with a pretokenization curriculum: stage 1 learns subwords with whitespace
pre-tokenization up to a transition point t; stage 2 continues from that exact state with only
digit groups split off, so tokens can bridge spaces ("ĠbyĠtheĠway").

- :func:`train_superbpe` / :class:`SuperBPEConfig`: train (stage 1 on stock ``tokenizers``,
  stage 2 with :func:`extend_merges`, an exact continued-BPE trainer with the skip rules).
- :func:`load_released`: rebuild a released SuperBPE tokenizer from vocab.json + merges.txt.
- :func:`score_tokenizers`: bytes per token, relative tokens, superwords, encode speed.
"""

from pertoken._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "SuperBPEConfig": "pertoken.superbpe.trainer",
    "extend_merges": "pertoken.superbpe.extend",
    "load_any_tokenizer": "pertoken.superbpe.evaluate",
    "load_released": "pertoken.superbpe.release",
    "paper_transition_to_merges": "pertoken.superbpe.release",
    "pre_tokenizer": "pertoken.superbpe.pretokenizers",
    "save_tokenizer": "pertoken.superbpe.trainer",
    "score_tokenizers": "pertoken.superbpe.evaluate",
    "train_superbpe": "pertoken.superbpe.trainer",
    "word_count": "pertoken.superbpe.pretokenizers",
})
