"""A slow, plainly written reference trainer for stage 2 of SuperBPE.

Stage 2 continues byte-level BPE training on "words" that may span whitespace,
with two skip rules:

* a merge whose string contains ':Ġ' (colon, then U+0120) is never learned;
* a merge whose string holds more than ``max_words`` words is never learned,
  where words are the non-empty pieces of the string split on U+0120 only.

This module exists to check a fast trainer merge-for-merge, so it favours being
obviously correct over being fast. Two speed-ups only:

* pair counts are kept incrementally: when a merge touches a word, that word's
  old pairs are taken off and its new pairs put on (both counted from scratch);
* the best pair is found with a lazy heap rather than a scan of every pair. An
  entry (-count, left id, right id, pair) is pushed whenever a pair's count has
  changed; a popped entry is used only if its count is still the pair's current
  count, otherwise it is stale and dropped. Ids of existing symbols never change,
  so every live pair always has a non-stale entry (any copies share its key), and the smallest
  non-stale entry is the pair a full scan with key (-count, left id, right id)
  would pick. (The tests check this against a from-scratch recount.)
"""

from __future__ import annotations

import heapq
from collections import Counter

SPACE = "\u0120"  # 'Ġ', the byte-level stand-in for a space
COLON_SPACE = ":" + SPACE


def word_count(token: str) -> int:
    """How many words the token string holds: non-empty pieces between U+0120s."""
    return len([piece for piece in token.split(SPACE) if piece])


def is_forbidden(token: str, max_words: int | None, forbid_colon_space: bool) -> bool:
    """Whether a merge producing this string is skipped by stage 2's rules."""
    if forbid_colon_space and COLON_SPACE in token:
        return True
    if max_words is not None and word_count(token) > max_words:
        return True
    return False


def merge_word(symbols: list[str], a: str, b: str) -> list[str]:
    """Apply the merge (a, b) to one word, left to right, non-overlapping. Returns a new list."""
    out: list[str] = []
    i = 0
    n = len(symbols)
    while i < n:
        if i + 1 < n and symbols[i] == a and symbols[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def replay_merges(words: list[list[str]], merges: list[tuple[str, str]]) -> list[list[str]]:
    """Training-style replay: each merge in order, applied to every word left to right,
    non-overlapping. Returns new lists; the input is not changed."""
    result = [list(word) for word in words]
    for a, b in merges:
        result = [merge_word(word, a, b) for word in result]
    return result


def word_pairs(symbols: list[str]) -> dict[tuple[str, str], int]:
    """Adjacent pairs of one word and how often each occurs (overlapping occurrences all count)."""
    return dict(Counter(zip(symbols, symbols[1:])))


def reference_extend(
    words: list[tuple[list[str], int]],
    vocab: dict[str, int],
    n_new: int,
    max_words: int | None = 4,
    forbid_colon_space: bool = True,
) -> tuple[list[tuple[str, str]], dict[str, int], int]:
    """Greedy stage-2 BPE. Returns (new_merges, final_vocab, duplicate_count).

    ``words`` is a list of (initial symbols, count); ``vocab`` maps every existing
    token string to its id and is not changed (a copy is extended). Every symbol
    of every word must be in ``vocab``.
    """
    vocab = dict(vocab)

    # Deduplicate identical words by summing their counts (first-seen order kept).
    merged_counts: dict[tuple[str, ...], int] = {}
    for symbols, count in words:
        key = tuple(symbols)
        merged_counts[key] = merged_counts.get(key, 0) + count
    word_list: list[list[str]] = []
    freq: list[int] = []
    for key, count in merged_counts.items():
        if count == 0:
            continue
        for symbol in key:
            if symbol not in vocab:
                raise KeyError(f"symbol {symbol!r} is not in the vocab")
        word_list.append(list(key))
        freq.append(count)

    # pair -> total count over all words; pair -> indices of words containing it.
    pair_counts: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}

    def add_to_count(pair: tuple[str, str], amount: int) -> None:
        total = pair_counts.get(pair, 0) + amount
        if total == 0:
            pair_counts.pop(pair, None)
        else:
            pair_counts[pair] = total

    for index, symbols in enumerate(word_list):
        for pair, occurrences in word_pairs(symbols).items():
            add_to_count(pair, occurrences * freq[index])
            where.setdefault(pair, set()).add(index)

    def replace_word(index: int, new_symbols: list[str]) -> set[tuple[str, str]]:
        """Swap word ``index`` for ``new_symbols``: take off all its old pair occurrences
        and put on all its new ones (only pairs whose number changes are touched).
        Returns the pairs whose total count changed."""
        changed = set()
        old_pairs = word_pairs(word_list[index])
        new_pairs = word_pairs(new_symbols)
        for pair in old_pairs.keys() | new_pairs.keys():
            before = old_pairs.get(pair, 0)
            after = new_pairs.get(pair, 0)
            if before != after:
                add_to_count(pair, (after - before) * freq[index])
                changed.add(pair)
            if before and not after:
                where[pair].discard(index)
                if not where[pair]:
                    del where[pair]
            elif after and not before:
                where.setdefault(pair, set()).add(index)
        word_list[index] = new_symbols
        return changed

    next_id = max(vocab.values(), default=-1) + 1
    forbidden: set[tuple[str, str]] = set()
    new_merges: list[tuple[str, str]] = []
    duplicates = 0

    heap: list[tuple[int, int, int, tuple[str, str]]] = []

    def push(pair: tuple[str, str]) -> None:
        count = pair_counts.get(pair, 0)
        if count >= 1 and pair not in forbidden:
            heapq.heappush(heap, (-count, vocab[pair[0]], vocab[pair[1]], pair))

    for pair in pair_counts:
        push(pair)

    while len(new_merges) < n_new:
        # Pick the most frequent allowed pair; ties go to the smallest (left id, right id).
        best: tuple[str, str] | None = None
        while heap:
            neg_count, _, _, pair = heapq.heappop(heap)
            if pair in forbidden or pair_counts.get(pair, 0) != -neg_count:
                continue  # stale entry
            if is_forbidden(pair[0] + pair[1], max_words, forbid_colon_space):
                forbidden.add(pair)  # skipped for good; no id, no merge slot
                continue
            best = pair
            break
        if best is None:
            break  # no pair with count >= 1 is left

        a, b = best
        new_token = a + b
        if new_token in vocab:
            duplicates += 1  # reuse the existing id; the merged symbol is the existing token
        else:
            vocab[new_token] = next_id  # max id so far + 1
            next_id += 1
        new_merges.append(best)

        changed: set[tuple[str, str]] = set()
        for index in sorted(where.get(best, set())):
            changed |= replace_word(index, merge_word(word_list[index], a, b))
        for pair in changed:
            push(pair)

    return new_merges, vocab, duplicates
