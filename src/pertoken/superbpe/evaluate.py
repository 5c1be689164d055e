"""Compare tokenizers on a corpus split: bytes per token, tokens relative to the first
tokenizer, superword vocabulary entries, and encode throughput on whole documents."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer

from pertoken.errors import UserError

_SPACE_INSIDE = re.compile("[^\u0120]\u0120")


@dataclass
class TokenizerScore:
    name: str
    vocab_size: int
    tokens: int
    bytes_per_token: float
    relative_tokens: float
    superword_entries: int
    encode_mb_per_s: float


def load_any_tokenizer(spec: str) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file, a folder holding one (ours or
    a transformers folder), a folder of ``vocab.json`` + ``merges.txt`` (a released SuperBPE
    tokenizer), or a model alias such as ``smollm2-135m-instruct``."""
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises plain Exceptions for bad files
            raise UserError(f"{spec} is not a tokenizer.json file ({error})") from None
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(path / "tokenizer.json"))
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            from pertoken.superbpe.release import load_released

            return load_released(path)
        raise UserError(f"{spec} holds neither tokenizer.json nor vocab.json + merges.txt")
    from pertoken.models import ALIASES, alias_gguf, converted_dir

    if spec in ALIASES:
        folder = converted_dir(spec)
        if (folder / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(folder / "tokenizer.json"))
        from transformers import AutoTokenizer  # not converted yet: read the GGUF's tokenizer

        gguf = alias_gguf(spec)
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                             local_files_only=True).backend_tokenizer
    raise UserError(f"no tokenizer {spec!r}: give a tokenizer.json, a folder, or a model alias")


def is_superword(token: str) -> bool:
    """A byte-level token spans a space when a ``Ġ`` follows some other character in it."""
    return _SPACE_INSIDE.search(token) is not None


def superword_entries(tokenizer: Tokenizer) -> int:
    """Vocabulary entries that span a space (see :func:`is_superword`)."""
    return sum(is_superword(token) for token in tokenizer.get_vocab())


def score_tokenizers(tokenizers: list[tuple[str, Tokenizer]], documents: list[str],
                     repeats: int = 3) -> list[TokenizerScore]:
    """Score each tokenizer on the same documents (encode time: the best of ``repeats``)."""
    if not documents:
        raise UserError("nothing to encode: the corpus split has no text")
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    scores = []
    for name, tokenizer in tokenizers:
        best = float("inf")
        tokens = 0
        for _ in range(repeats):
            start = time.perf_counter()
            encodings = tokenizer.encode_batch_fast(documents, add_special_tokens=False)
            best = min(best, time.perf_counter() - start)
            tokens = sum(len(e.ids) for e in encodings)
        scores.append(TokenizerScore(
            name=name, vocab_size=tokenizer.get_vocab_size(), tokens=tokens,
            bytes_per_token=n_bytes / max(tokens, 1),
            relative_tokens=tokens / max(scores[0].tokens if scores else tokens, 1),
            superword_entries=superword_entries(tokenizer),
            encode_mb_per_s=n_bytes / 1e6 / best))
    return scores


def scores_json(corpus: str, split: str, documents: list[str], scores: list[TokenizerScore]) -> dict:
    return {"corpus": corpus, "split": split,
            "bytes": sum(len(d.encode("utf-8")) for d in documents),
            "tokenizers": [asdict(s) for s in scores]}
