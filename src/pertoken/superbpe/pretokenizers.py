"""The pre-tokenizers of SuperBPE's two stages, as stock ``tokenizers`` parts (paper §1.1, §1.2).

Stage 1 splits on whitespace and punctuation (GPT-2 style, no contractions), so it learns
subwords; stage 2 splits only digit groups (and, in the 2025 set, punctuation runs and spaces
before spaces), so tokens can span spaces. The Split must come before ByteLevel: ``Ġ`` (U+0120)
is a letter, so the other order makes stage 1 itself learn superwords.
"""

from __future__ import annotations

from tokenizers import Regex, pre_tokenizers

PRETOKENIZATIONS = ("paper", "2025")

_PAPER_STAGE1 = r"(?=(\d{3})+(?!\d))| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_PAPER_STAGE2 = r"(?=(\d{3})+(?!\d))"
_NEW_STAGE1 = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_NEW_STAGE2 = r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]{2,}[\r\n/]*| +(?!\S)"


def pre_tokenizer(stage: int, pretokenization: str = "paper") -> pre_tokenizers.PreTokenizer:
    """The stage-1 or stage-2 pre-tokenizer of the ``paper`` or ``2025`` configuration."""
    if pretokenization not in PRETOKENIZATIONS:
        raise ValueError(f"unknown pretokenization {pretokenization!r}")
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                          use_regex=False)
    if pretokenization == "paper":
        regex = _PAPER_STAGE1 if stage == 1 else _PAPER_STAGE2
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            byte_level])
    regex = _NEW_STAGE1 if stage == 1 else _NEW_STAGE2
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False), byte_level])


def word_count(token: str) -> int:
    """Words in a byte-level token: non-empty pieces between U+0120 (``Ġ``), the paper's rule."""
    return len([piece for piece in token.split("\u0120") if piece])
