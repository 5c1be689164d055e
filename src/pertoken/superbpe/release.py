"""Rebuild a released SuperBPE tokenizer from its ``vocab.json`` and ``merges.txt`` on stock
``tokenizers`` (paper §1.3): BPE with ``ignore_merges=False``, the stage-2 pre-tokenizer, and a
ByteLevel decoder."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE

from pertoken.errors import UserError
from pertoken.superbpe.pretokenizers import pre_tokenizer


def paper_transition_to_merges(t: int) -> int:
    """Inherited merges for the paper's transition point t.

    The reference scripts take ``head -n t merges.txt``, whose first line is the header, so a
    tokenizer released as "t180k" inherits 179,999 merges.
    """
    return max(t - 1, 0)


def load_released(folder: str | Path, pretokenization: str = "paper", stage: int = 2) -> Tokenizer:
    """A released SuperBPE (``stage=2``) or BPE-baseline (``stage=1``) tokenizer from a folder
    holding ``vocab.json`` and ``merges.txt``."""
    folder = Path(folder)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    for path in (vocab, merges):
        if not path.is_file():
            raise UserError(f"{path} not found: a released tokenizer needs vocab.json and merges.txt")
    tokenizer = Tokenizer(BPE.from_file(str(vocab), str(merges), ignore_merges=False))
    tokenizer.pre_tokenizer = pre_tokenizer(stage, pretokenization)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer
