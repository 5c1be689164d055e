"""Stage 2 of SuperBPE: continue byte-level BPE training from the stage-1 state with two skip
rules (paper §1.1, "Stage 2 in the fork"), exactly and in one pass.

Written by hand because stock ``tokenizers`` cannot continue training from a merge list and has
no pair constraints. The loop is the standard incremental BPE trainer, compiled with numba:

- the corpus is a list of unique stage-2 words (sequences of stage-1 token ids) with counts;
- the best pair is the one with the highest count, ties going to the smallest
  ``(left_id, right_id)``, as in ``tokenizers``' ``BpeTrainer``; stale heap entries are
  refreshed lazily, as there;
- a merge is applied to every occurrence, left to right within a word;
- a pair whose merged string would contain ``:Ġ``, or more than ``max_words`` words (pieces
  between U+0120), is skipped for good and uses no id;
- a merge whose string already is a token reuses that token's id (the two symbols unify), as
  the authors' fork does; this is found after a pass and the pass is rerun with the id forced.

Word counts and the ``:Ġ`` test are derived from per-token flags, since both only change at the
join of the two merged tokens (no stage-1 token contains ``:Ġ``).
"""

from __future__ import annotations

import heapq
import logging

import numpy as np
from numba import njit, types
from numba.typed import Dict

log = logging.getLogger(__name__)

ID_BITS = 18
MAX_VOCAB = 1 << ID_BITS
_ID_MASK = MAX_VOCAB - 1
COUNT_BITS = 63 - 2 * ID_BITS


@njit(cache=True)
def _grow(array, size):
    if size < array.shape[0]:
        return array
    bigger = np.empty(max(2 * array.shape[0], size + 1), dtype=array.dtype)
    bigger[: array.shape[0]] = array
    return bigger


@njit(cache=True)
def _key(count, left, right):
    # heapq is a min-heap: negate so the highest count, then the smallest pair, comes first
    return -((count << (2 * ID_BITS)) | ((_ID_MASK - left) << ID_BITS) | (_ID_MASK - right))


# The pair table lives in parallel arrays indexed by slot: ``slots`` maps a pair key to its
# slot; ``count``, ``pair_of`` and ``done`` (merged or forbidden) per slot; ``head`` is the
# first node of the slot's occurrence list, whose nodes are ``node_pos`` (the left position of
# an occurrence, possibly stale) and ``node_next``.
@njit(cache=True)
def _slot(pair, slots, n_slots, count, head, done, pair_of):
    if pair in slots:
        return slots[pair], n_slots, count, head, done, pair_of
    s = n_slots
    slots[pair] = s
    n_slots += 1
    count = _grow(count, n_slots)
    head = _grow(head, n_slots)
    done = _grow(done, n_slots)
    pair_of = _grow(pair_of, n_slots)
    count[s] = 0
    head[s] = -1
    done[s] = False
    pair_of[s] = pair
    return s, n_slots, count, head, done, pair_of


@njit(cache=True)
def _train(sym, word_of, word_count, n_words, first_space, last_space, last_colon, next_id,
           n_new, max_words, forbid_colon_space, forced):
    """Learn up to ``n_new`` merges over ``sym`` (symbols of all words laid end to end,
    ``word_of`` giving each position's word). Returns (left, right, id) arrays of the merges.
    The flag arrays are indexed by token id and must have room for the new ids."""
    n = sym.shape[0]
    nxt = np.empty(n, dtype=np.int64)
    prv = np.empty(n, dtype=np.int64)
    for p in range(n):
        nxt[p] = p + 1 if p + 1 < n and word_of[p + 1] == word_of[p] else -1
        prv[p] = p - 1 if p > 0 and word_of[p - 1] == word_of[p] else -1

    slots = Dict.empty(key_type=types.int64, value_type=types.int64)
    count = np.zeros(1024, dtype=np.int64)
    head = np.full(1024, -1, dtype=np.int64)
    done = np.zeros(1024, dtype=np.bool_)
    pair_of = np.zeros(1024, dtype=np.int64)
    node_pos = np.empty(max(n, 16), dtype=np.int64)
    node_next = np.empty(max(n, 16), dtype=np.int64)
    n_slots = 0
    n_nodes = 0

    for p in range(n):
        q = nxt[p]
        if q < 0:
            continue
        s, n_slots, count, head, done, pair_of = _slot(
            (sym[p] << ID_BITS) | sym[q], slots, n_slots, count, head, done, pair_of)
        count[s] += word_count[word_of[p]]
        node_pos[n_nodes] = p
        node_next[n_nodes] = head[s]
        head[s] = n_nodes
        n_nodes += 1

    heap = [np.int64(0) for _ in range(0)]
    for s in range(n_slots):
        heap.append(_key(count[s], pair_of[s] >> ID_BITS, pair_of[s] & _ID_MASK))
    heapq.heapify(heap)

    out_left = np.empty(n_new, dtype=np.int64)
    out_right = np.empty(n_new, dtype=np.int64)
    out_id = np.empty(n_new, dtype=np.int64)
    n_out = 0
    touched = np.empty(64, dtype=np.int64)
    found = np.empty(64, dtype=np.int64)

    while n_out < n_new and len(heap) > 0:
        key = -heapq.heappop(heap)
        top_count = key >> (2 * ID_BITS)
        a = _ID_MASK - ((key >> ID_BITS) & _ID_MASK)
        b = _ID_MASK - (key & _ID_MASK)
        s = slots[(a << ID_BITS) | b]
        if done[s]:
            continue
        if count[s] != top_count:  # stale entry: refresh it, as BpeTrainer does
            if count[s] > 0:
                heapq.heappush(heap, _key(count[s], a, b))
            continue
        if top_count < 1:
            break
        joined_words = n_words[a] + n_words[b]
        if not last_space[a] and not first_space[b] and n_words[a] > 0 and n_words[b] > 0:
            joined_words -= 1
        if (forbid_colon_space and last_colon[a] and first_space[b]) or (
                max_words > 0 and joined_words > max_words):
            done[s] = True
            continue

        c = forced[n_out]
        if c < 0:
            c = next_id
            next_id += 1
            n_words[c] = joined_words
            first_space[c] = first_space[a]
            last_space[c] = last_space[b]
            last_colon[c] = last_colon[b]
        out_left[n_out] = a
        out_right[n_out] = b
        out_id[n_out] = c
        n_out += 1

        # the occurrences still valid, left to right (the order matters when a == b)
        n_found = 0
        node = head[s]
        while node >= 0:
            p = node_pos[node]
            q = nxt[p]
            if sym[p] == a and q >= 0 and sym[q] == b:
                found = _grow(found, n_found + 1)
                found[n_found] = p
                n_found += 1
            node = node_next[node]
        positions = np.sort(found[:n_found])
        n_touched = 0
        last = -1
        for i in range(n_found):
            p = positions[i]
            q = nxt[p]
            if p == last or sym[p] != a or q < 0 or sym[q] != b:
                continue  # a duplicate node, or consumed by the merge just left of it
            last = p
            w = word_count[word_of[p]]
            left = prv[p]
            right = nxt[q]
            if left >= 0:
                count[slots[(sym[left] << ID_BITS) | a]] -= w
            if right >= 0:
                count[slots[(b << ID_BITS) | sym[right]]] -= w
            sym[p] = c
            sym[q] = -1
            nxt[p] = right
            if right >= 0:
                prv[right] = p
            for side in range(2):
                if side == 0:
                    if left < 0:
                        continue
                    at = left
                    pair = (sym[left] << ID_BITS) | c
                else:
                    if right < 0:
                        continue
                    at = p
                    pair = (c << ID_BITS) | sym[right]
                t, n_slots, count, head, done, pair_of = _slot(
                    pair, slots, n_slots, count, head, done, pair_of)
                count[t] += w
                node_pos = _grow(node_pos, n_nodes + 1)
                node_next = _grow(node_next, n_nodes + 1)
                node_pos[n_nodes] = at
                node_next[n_nodes] = head[t]
                head[t] = n_nodes
                n_nodes += 1
                touched = _grow(touched, n_touched + 1)
                touched[n_touched] = t
                n_touched += 1
        count[s] = 0
        done[s] = True
        for i in range(n_touched):
            t = touched[i]
            if count[t] > 0 and not done[t]:
                heapq.heappush(heap, _key(count[t], pair_of[t] >> ID_BITS, pair_of[t] & _ID_MASK))
    return out_left[:n_out], out_right[:n_out], out_id[:n_out]


def token_flags(tokens: list[str], capacity: int) -> tuple[np.ndarray, ...]:
    """Per-id flags for the skip rules: words, starts with Ġ, ends with Ġ, ends with ':'."""
    from pertoken.superbpe.pretokenizers import word_count

    n_words = np.zeros(capacity, dtype=np.int64)
    first_space = np.zeros(capacity, dtype=np.bool_)
    last_space = np.zeros(capacity, dtype=np.bool_)
    last_colon = np.zeros(capacity, dtype=np.bool_)
    for i, token in enumerate(tokens):
        n_words[i] = word_count(token)
        first_space[i] = token.startswith("\u0120")
        last_space[i] = token.endswith("\u0120")
        last_colon[i] = token.endswith(":")
    return n_words, first_space, last_space, last_colon


def extend_merges(words: dict[bytes, int], tokens: list[str], n_new: int, max_words: int | None = 4,
                  forbid_colon_space: bool = True) -> tuple[list[tuple[str, str]], list[str], int]:
    """Continue BPE training for up to ``n_new`` merges.

    Args:
        words: unique stage-2 words, each the ``int32`` bytes of its stage-1 token ids, with counts.
        tokens: token string of every existing id (``tokens[i]`` is id ``i``).
    Returns:
        ``(merges, tokens, duplicates)``: the new merges as string pairs, the token list grown by
        the new ids, and how many merges reused an existing token's id.
    """
    if len(tokens) + n_new > MAX_VOCAB:
        raise ValueError(f"vocabularies above {MAX_VOCAB:,} are not supported")
    arrays = [np.frombuffer(key, dtype=np.int32) for key in words]
    counts = np.fromiter(words.values(), dtype=np.int64, count=len(words))
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    if int((counts * lengths).sum()) >= 1 << COUNT_BITS:
        raise ValueError("corpus too large for 27-bit pair counts")
    sym0 = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, dtype=np.int64)
    word_of = np.repeat(np.arange(len(arrays), dtype=np.int64), lengths)
    capacity = len(tokens) + n_new + 1
    flags = token_flags(tokens, capacity)
    forced = np.full(max(n_new, 1), -1, dtype=np.int64)
    rounds = 0
    while True:
        rounds += 1
        left, right, ids = _train(sym0.copy(), word_of, counts, *(f.copy() for f in flags),
                                  len(tokens), n_new, max_words or 0, forbid_colon_space, forced)
        grown = list(tokens)
        index = {t: i for i, t in enumerate(tokens)}
        duplicate_at = -1
        for k, (a, b, c) in enumerate(zip(left.tolist(), right.tolist(), ids.tolist())):
            string = grown[a] + grown[b]
            if forced[k] >= 0:
                continue
            if string in index:  # the fork reuses the existing id: rerun with it forced
                duplicate_at = k
                forced[k] = index[string]
                break
            assert c == len(grown)
            grown.append(string)
            index[string] = c
        if duplicate_at < 0:
            break
        log.info("merge %d duplicates an existing token; rerunning with its id reused", duplicate_at)
    merges = [(grown[a], grown[b]) for a, b in zip(left.tolist(), right.tolist())]
    return merges, grown, int((forced >= 0).sum())
