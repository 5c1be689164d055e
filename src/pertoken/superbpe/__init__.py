"""SuperBPE: superword tokenizers (Liu et al., 2025, arXiv 2503.13423).

Byte-level BPE with a pretokenization curriculum: stage 1 learns subwords with whitespace
pre-tokenization up to a transition point t; stage 2 continues from that exact state with only
digit groups split off, so tokens can bridge spaces ("ĠbyĠtheĠway").

- :func:`train_superbpe` / :class:`SuperBPEConfig`: train (stage 1 on stock ``tokenizers``,
  stage 2 with :func:`extend_merges`, an exact continued-BPE trainer with the skip rules).
- :func:`load_released`: rebuild a released SuperBPE tokenizer from vocab.json + merges.txt.
- :func:`score_tokenizers`: bytes per token, relative tokens, superwords, encode speed.
"""

from pertoken.superbpe.evaluate import load_any_tokenizer, score_tokenizers
from pertoken.superbpe.extend import extend_merges
from pertoken.superbpe.pretokenizers import pre_tokenizer, word_count
from pertoken.superbpe.release import load_released, paper_transition_to_merges
from pertoken.superbpe.trainer import SuperBPEConfig, save_tokenizer, train_superbpe

__all__ = ["SuperBPEConfig", "extend_merges", "load_any_tokenizer", "load_released",
           "paper_transition_to_merges", "pre_tokenizer", "save_tokenizer", "score_tokenizers",
           "train_superbpe", "word_count"]
