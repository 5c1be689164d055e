"""Perplexity and bits per byte of a causal LM on a stream of documents.

Documents are tokenized one by one, each preceded by a separator token (the tokenizer's eos by
default) that gives the first real token something to be predicted from and is never scored
itself. The stream is cut at ``max_tokens`` scored tokens and scored with a strided sliding
window (as in the transformers perplexity guide): windows of ``window`` tokens advance by
``stride``, and each token is scored once, in the first window whose new part contains it, so
every scored token sees at least ``window - stride`` tokens of context (or all before it).

bits per byte = total negative log-likelihood in bits / UTF-8 bytes of the scored text, which
compares models with different tokenizers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from pertoken.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class PerplexityConfig:
    """How perplexity is measured."""

    window: int = 512
    """tokens per forward pass (context plus scored tokens)"""
    stride: int = 256
    """tokens the window advances by; each window scores at most this many new tokens"""
    max_tokens: int | None = 4096
    """stop after this many scored tokens (None: the whole split)"""
    batch_size: int = 4
    """windows per forward pass"""
    separator: str = "eos"
    """token put before each document: eos, bos, or none (then the first token is not scored)"""

    def validate(self) -> None:
        if self.window < 2:
            raise UserError(f"--window must be at least 2, got {self.window}")
        if not 1 <= self.stride <= self.window - 1:
            raise UserError(f"--stride must be between 1 and window-1 ({self.window - 1}), "
                            f"got {self.stride}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError(f"--max-tokens must be positive, got {self.max_tokens}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        if self.separator not in ("eos", "bos", "none"):
            raise UserError(f"--separator must be eos, bos or none, got {self.separator!r}")


@dataclass
class PerplexityResult:
    """What a perplexity run measured."""

    tokens: int
    """tokens scored"""
    bytes: int
    """UTF-8 bytes of the text those tokens spell"""
    nll: float
    """total negative log-likelihood in nats"""
    seconds: float
    documents: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def _separator_id(tokenizer, separator: str) -> int | None:
    if separator == "none":
        return None
    token_id = tokenizer.eos_token_id if separator == "eos" else tokenizer.bos_token_id
    if token_id is None:
        raise UserError(f"the tokenizer has no {separator} token: use --separator none")
    return token_id


def token_stream(tokenizer, documents: Iterable[str], max_tokens: int | None,
                 separator: str = "eos") -> tuple[list[int], list[bool], int, int]:
    """Tokenize documents into one stream.

    Returns ``(ids, scored, n_bytes, n_documents)`` where ``scored[i]`` says whether token ``i``
    is scored (separators and a stream-initial token are not) and ``n_bytes`` counts the UTF-8
    bytes of the scored text. The last document is cut so that at most ``max_tokens`` tokens
    are scored; its bytes are those of the decoded kept tokens.
    """
    sep = _separator_id(tokenizer, separator)
    ids: list[int] = []
    scored: list[bool] = []
    n_bytes = n_docs = n_scored = 0
    for doc in documents:
        if max_tokens is not None and n_scored >= max_tokens:
            break
        doc_ids = tokenizer.encode(doc, add_special_tokens=False)
        if not doc_ids:
            continue
        if sep is not None:
            ids.append(sep)
            scored.append(False)
        doc_scored = [True] * len(doc_ids)
        if not ids:  # no separator and nothing before: the first token has no context
            doc_scored[0] = False
        budget = None if max_tokens is None else max_tokens - n_scored
        if budget is not None and sum(doc_scored) > budget:
            keep = budget + (0 if doc_scored[0] else 1)
            doc_ids, doc_scored = doc_ids[:keep], doc_scored[:keep]
            doc = tokenizer.decode(doc_ids)
        text_ids = doc_ids if doc_scored[0] else doc_ids[1:]
        n_bytes += len((doc if doc_scored[0] else tokenizer.decode(text_ids)).encode("utf-8"))
        ids.extend(doc_ids)
        scored.extend(doc_scored)
        n_scored += sum(doc_scored)
        n_docs += 1
    return ids, scored, n_bytes, n_docs


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_scored)`` for each window over ``n`` tokens.

    Tokens ``first_scored .. end-1`` are scored in that window, each predicted from the tokens
    ``start .. t-1``; together the windows score every position ``1 .. n-1`` exactly once.
    """
    spans = []
    prev_end = 1
    for start in range(0, max(n - 1, 1), stride):
        end = min(start + window, n)
        if end > prev_end:
            spans.append((start, end, prev_end))
            prev_end = end
        if end == n:
            break
    return spans


@torch.inference_mode()
def perplexity(model, tokenizer, documents: Iterable[str],
               config: PerplexityConfig | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` over ``documents`` (see the module docstring for the protocol)."""
    from tqdm.auto import tqdm

    config = config or PerplexityConfig()
    config.validate()
    start_time = time.perf_counter()
    ids, scored, n_bytes, n_docs = token_stream(tokenizer, documents, config.max_tokens,
                                                config.separator)
    n_tokens = sum(scored)
    if n_tokens == 0:
        raise UserError("nothing to score: the corpus split has no text")
    stream = torch.tensor(ids, dtype=torch.long)
    mask = torch.tensor(scored, dtype=torch.bool)
    spans = windows(len(ids), config.window, config.stride)
    device = next(model.parameters()).device
    nll = 0.0
    with tqdm(total=n_tokens, desc="perplexity", unit="tok", disable=not progress or None) as bar:
        for group in _batches(spans, config.batch_size):
            nll += _score_group(model, stream, mask, group, device, bar)
    seconds = time.perf_counter() - start_time
    result = PerplexityResult(tokens=n_tokens, bytes=n_bytes, nll=nll, seconds=seconds,
                              documents=n_docs)
    log.info("perplexity %.3f, %.4f bits/byte over %d tokens in %.1f s", result.perplexity,
             result.bits_per_byte, n_tokens, seconds)
    return result


def _batches(spans, batch_size):
    """Consecutive windows of equal length, at most ``batch_size`` at a time."""
    group: list[tuple[int, int, int]] = []
    for span in spans:
        if group and (len(group) == batch_size
                      or span[1] - span[0] != group[0][1] - group[0][0]):
            yield group
            group = []
        group.append(span)
    if group:
        yield group


def _score_group(model, stream, mask, group, device, bar) -> float:
    """Score a batch of windows of equal length (no padding, so batching changes nothing)."""
    length = group[0][1] - group[0][0]
    # logits are needed from the earliest position that predicts a scored token onwards
    offset = min(first - 1 - start for start, _, first in group)
    input_ids = torch.stack([stream[start:end] for start, end, _ in group]).to(device)
    logits = model(input_ids=input_ids, logits_to_keep=length - offset).logits.float()
    total = 0.0
    for row, (start, end, first) in enumerate(group):
        # the logit at window position p predicts token start + p + 1
        positions = torch.arange(first - 1, end - 1) - start - offset
        targets = stream[first:end].to(device)
        logprobs = torch.log_softmax(logits[row, positions], dim=-1)
        token_lp = logprobs.gather(-1, targets[:, None])[:, 0]
        weight = mask[first:end].to(device)
        total -= float(token_lp[weight].sum())
        bar.update(int(weight.sum()))
    return total
