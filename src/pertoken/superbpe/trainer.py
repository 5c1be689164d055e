"""Train SuperBPE tokenizers: stage 1 with stock ``tokenizers``, stage 2 with
:mod:`pertoken.superbpe.extend` (paper §1.1, spec §2).

The transition point ``t`` is a stage-1 vocabulary size: stage 1 learns ``t - 256`` merges on
top of the 256 byte symbols with whitespace pre-tokenization, stage 2 continues to
``vocab_size`` without it. ``t = 0`` is the no-pretokenization baseline and ``t = vocab_size``
is plain BPE. Training reads lines (each keeps its ``\\n``), so no token crosses a newline.
Ids: the 256 byte symbols sorted by code point, then merges in order (id = 256 + merge rank
unless a merge repeats an existing string), then special tokens.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from pertoken.bench import PeakMemory
from pertoken.errors import UserError
from pertoken.superbpe.extend import MAX_VOCAB, extend_merges
from pertoken.superbpe.pretokenizers import PRETOKENIZATIONS, pre_tokenizer

log = logging.getLogger(__name__)

ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())


@dataclass
class SuperBPEConfig:
    """One SuperBPE training run (defaults from the paper: 4-word cap, paper regexes)."""

    vocab_size: int = 65536
    """total vocabulary: 256 byte symbols plus merges (special tokens come on top)"""
    transition: int | None = None
    """stage-1 vocabulary size t; None: 0.9 x vocab_size (the paper's t180k of 200k)"""
    max_words: int = 4
    """stage 2: at most this many words (pieces between U+0120) per token; 0 disables"""
    pretokenization: str = "paper"
    """regex set: 'paper' (GPT-2 style, as released) or '2025' (o200k-like, newer scripts)"""
    special_tokens: list[str] = field(default_factory=list)
    """added after training, with the ids that follow the vocabulary"""
    stage2_max_bytes: int | None = None
    """train stage 2 on at most this many bytes of the corpus (None: all of it)"""

    def resolved_transition(self) -> int:
        return int(0.9 * self.vocab_size) if self.transition is None else self.transition

    def validate(self) -> None:
        if self.vocab_size <= len(ALPHABET):
            raise UserError(f"--vocab-size must exceed the {len(ALPHABET)} byte symbols, "
                            f"got {self.vocab_size}")
        if self.vocab_size > MAX_VOCAB:
            raise UserError(f"--vocab-size above {MAX_VOCAB:,} is not supported")
        t = self.resolved_transition()
        if not 0 <= t <= self.vocab_size:
            raise UserError(f"--transition must be between 0 and the vocabulary size "
                            f"{self.vocab_size}, got {t}")
        if self.max_words < 0:
            raise UserError(f"--max-words must be 0 (no cap) or positive, got {self.max_words}")
        if self.pretokenization not in PRETOKENIZATIONS:
            raise UserError(f"--pretokenization must be one of {', '.join(PRETOKENIZATIONS)}")


@dataclass
class TrainingStats:
    """What a training run measured (written to ``training.json``)."""

    corpus_bytes: int = 0
    corpus_lines: int = 0
    replacement_chars: int = 0
    stage1_merges: int = 0
    stage2_merges: int = 0
    stage2_duplicates: int = 0
    stage2_words: int = 0
    stage2_symbols: int = 0
    stage1_seconds: float = 0.0
    stage2_encode_seconds: float = 0.0
    stage2_train_seconds: float = 0.0
    stage1_peak_rss_mb: float = 0.0
    stage2_peak_rss_mb: float = 0.0


def lines_of(documents: Iterable[str], stats: TrainingStats | None = None) -> Iterator[str]:
    """Every line of every document, keeping its ``\\n`` (only ``\\n`` ends a line)."""
    for doc in documents:
        if stats is not None:
            stats.corpus_bytes += len(doc.encode("utf-8"))
            stats.replacement_chars += doc.count("\ufffd")
        start = 0
        while start < len(doc):
            end = doc.find("\n", start)
            end = len(doc) if end < 0 else end + 1
            if stats is not None:
                stats.corpus_lines += 1
            yield doc[start:end]
            start = end


def _merges_of(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def train_stage1(lines: Iterable[str], vocab_size: int, pretokenization: str = "paper") -> tuple[
        list[str], list[tuple[str, str]]]:
    """Byte-level BPE with the stage-1 pre-tokenizer: ``(tokens by id, merges)``."""
    if vocab_size <= len(ALPHABET):
        return list(ALPHABET), []
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizer(1, pretokenization)
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                         initial_alphabet=ALPHABET, special_tokens=[])
    tokenizer.train_from_iterator(lines, trainer)
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    return tokens, _merges_of(tokenizer)


# No stage-1 token holds a printable ASCII character followed by a space (both regex sets
# attach a space only to the start of a pretoken, or inside all-whitespace ones), so no
# stage-1 merge crosses such a point: a stage-2 word encodes as the concatenation of the
# encodings of its pieces cut there, and the pieces repeat a lot.
_SAFE_CUT = re.compile("(?<=[!-~])(?=\u0120)")


def stage2_words(lines: Iterable[str], tokens: list[str], merges: list[tuple[str, str]],
                 pretokenization: str = "paper") -> Counter:
    """Unique stage-2 words as ``int32`` bytes of their stage-1 ids, with counts.

    Stage-1 encoding uses stock BPE in merge-rank order, which reproduces the training-style
    replay of the inherited merges (spec §1.3); each distinct piece (see ``_SAFE_CUT``) is
    encoded once.
    """
    stage2 = pre_tokenizer(2, pretokenization)
    word_counts: Counter = Counter()
    for line, repeat in Counter(lines).items():
        for word, _ in stage2.pre_tokenize_str(line):
            word_counts[word] += repeat
    pieces = {piece for word in word_counts for piece in _SAFE_CUT.split(word)}
    vocab = {t: i for i, t in enumerate(tokens)}
    encoder = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=False))  # input is byte-level
    unique = list(pieces)
    piece_ids = {piece: np.asarray(enc.ids, dtype=np.int32).tobytes() for piece, enc in
                 zip(unique, encoder.encode_batch_fast(unique, add_special_tokens=False))}
    words: Counter = Counter()
    for word, repeat in word_counts.items():
        words[b"".join([piece_ids[p] for p in _SAFE_CUT.split(word)])] += repeat
    return words


def build_tokenizer(tokens: list[str], merges: list[tuple[str, str]], stage: int,
                    pretokenization: str, special_tokens: list[str]) -> Tokenizer:
    """A stock ``tokenizers`` BPE tokenizer for the trained vocabulary."""
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tokenizer.pre_tokenizer = pre_tokenizer(stage, pretokenization)
    tokenizer.decoder = decoders.ByteLevel()
    if special_tokens:
        tokenizer.add_special_tokens(special_tokens)
    return tokenizer


def train_superbpe(documents_stage1: Iterable[str], config: SuperBPEConfig,
                   documents_stage2: Iterable[str] | None = None) -> tuple[Tokenizer, dict]:
    """Train a SuperBPE tokenizer; returns it and the ``training.json`` contents.

    ``documents_stage2`` is read when stage 2 runs (t < vocab_size): usually a second, fresh
    pass over the same documents, though the spec notes the two stages may use different data.
    """
    config.validate()
    t = config.resolved_transition()
    stats = TrainingStats()
    start = time.perf_counter()
    with PeakMemory() as memory:
        tokens, merges = train_stage1(lines_of(documents_stage1, stats), t, config.pretokenization)
    stats.stage1_seconds = time.perf_counter() - start
    stats.stage1_peak_rss_mb = memory.peak_mb
    stats.stage1_merges = len(merges)
    log.info("stage 1: %d merges in %.1f s", len(merges), stats.stage1_seconds)

    n_new = config.vocab_size - len(tokens)
    stage = 1
    if n_new > 0:
        stage = 2
        if documents_stage2 is None:
            raise ValueError("stage 2 needs its documents (a second pass over the corpus)")
        with PeakMemory() as memory:
            start = time.perf_counter()
            # stage 1 read nothing when it had no merges to learn: count the corpus here
            stage2_lines = lines_of(documents_stage2, stats if stats.corpus_bytes == 0 else None)
            if config.stage2_max_bytes:
                stage2_lines = _cap_bytes(stage2_lines, config.stage2_max_bytes)
            words = stage2_words(stage2_lines, tokens, merges, config.pretokenization)
            stats.stage2_words = len(words)
            stats.stage2_symbols = sum(len(k) // 4 for k in words)
            stats.stage2_encode_seconds = time.perf_counter() - start
            start = time.perf_counter()
            new, tokens, stats.stage2_duplicates = extend_merges(
                words, tokens, n_new, config.max_words or None, forbid_colon_space=True)
            del words
            stats.stage2_train_seconds = time.perf_counter() - start
        stats.stage2_peak_rss_mb = memory.peak_mb
        stats.stage2_merges = len(new)
        merges = merges + new
        log.info("stage 2: %d merges in %.1f s (+%.1f s encoding)", len(new),
                 stats.stage2_train_seconds, stats.stage2_encode_seconds)
    if stats.corpus_bytes == 0:
        raise UserError("the training corpus is empty")
    tokenizer = build_tokenizer(tokens, merges, stage, config.pretokenization,
                                config.special_tokens)
    info = {"config": {**asdict(config), "transition": t}, "stats": asdict(stats),
            "vocab_size": tokenizer.get_vocab_size(), "alphabet_size": len(ALPHABET)}
    return tokenizer, info


def _cap_bytes(lines: Iterable[str], max_bytes: int) -> Iterator[str]:
    total = 0
    for line in lines:
        total += len(line.encode("utf-8"))
        if total > max_bytes:
            return
        yield line


def save_tokenizer(tokenizer: Tokenizer, info: dict, out_dir: Path) -> None:
    """Write ``tokenizer.json`` (+ transformers config), ``vocab.json``, ``merges.txt`` and
    ``training.json`` into ``out_dir`` (which must be new or a temporary folder)."""
    from transformers import PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    specials = info["config"]["special_tokens"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer,
                                   **({"eos_token": specials[0]} if specials else {}))
    fast.save_pretrained(str(out_dir))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer.model.save(str(out_dir))
    (out_dir / "training.json").write_text(json.dumps(info, indent=2))
