"""Hand-checkable tests of the stage-2 SuperBPE reference trainer."""

import random

import pytest

from .reference import (
    is_forbidden,
    merge_word,
    reference_extend,
    replay_merges,
    word_count,
    word_pairs,
)

G = "\u0120"  # 'Ġ'


def ids(*tokens):
    return {t: i for i, t in enumerate(tokens)}


# ---------------------------------------------------------------- tie-break


def test_tie_break_right_id_decides_when_left_ids_tie():
    vocab = ids("a", "b", "c")
    words = [(["a", "c"], 1), (["a", "b"], 1)]  # (a,c) seen first, (a,b) has the smaller right id
    merges, _, _ = reference_extend(words, vocab, 1)
    assert merges == [("a", "b")]


def test_tie_break_left_id_decides_before_right_id():
    vocab = ids("a", "b", "c")
    words = [(["b", "a"], 1), (["a", "c"], 1)]  # ids (1, 0) vs (0, 2): left id decides
    merges, _, _ = reference_extend(words, vocab, 1)
    assert merges == [("a", "c")]


def test_tie_break_uses_ids_not_string_order():
    vocab = {"z": 0, "a": 1}
    merges, _, _ = reference_extend([(["a", "a"], 1), (["z", "z"], 1)], vocab, 1)
    assert merges == [("z", "z")]


def test_higher_count_beats_smaller_ids():
    vocab = ids("a", "b", "c", "d")
    merges, _, _ = reference_extend([(["a", "b"], 1), (["c", "d"], 2)], vocab, 2)
    assert merges == [("c", "d"), ("a", "b")]


# ---------------------------------------------------------------- merging and counting


def test_merge_left_to_right_non_overlapping():
    assert merge_word(["a", "a", "a", "a"], "a", "a") == ["aa", "aa"]
    assert merge_word(["a", "a", "a"], "a", "a") == ["aa", "a"]
    assert merge_word(["b", "a", "a", "a", "b"], "a", "a") == ["b", "aa", "a", "b"]
    assert merge_word(["a", "b", "a", "b"], "a", "b") == ["ab", "ab"]
    assert merge_word(["a"], "a", "a") == ["a"]
    assert merge_word([], "a", "a") == []


def test_pair_counts_include_overlapping_positions():
    assert word_pairs(["a", "a", "a"]) == {("a", "a"): 2}
    assert word_pairs(["a", "a", "a", "a"]) == {("a", "a"): 3}


def test_overlapping_pair_count_decides_the_pick():
    vocab = ids("b", "c", "a")  # (b,c) would win a tie
    # (a,a) counts 2 in "a a a"; (b,c) counts 1 -> (a,a) wins despite larger ids.
    merges, _, _ = reference_extend([(["a", "a", "a"], 1), (["b", "c"], 1)], vocab, 1)
    assert merges == [("a", "a")]
    # (a,a) = 2 x 1, (b,c) = 1 x 2: a tie, which the smaller ids win.
    merges, _, _ = reference_extend([(["a", "a", "a"], 1), (["b", "c"], 2)], vocab, 1)
    assert merges == [("b", "c")]


def test_training_merge_is_non_overlapping_and_continues_from_the_result():
    vocab = ids("a")
    merges, vocab2, _ = reference_extend([(["a", "a", "a"], 1)], vocab, 5)
    # "a a a" -> "aa a" -> "aaa"; then nothing is left.
    assert merges == [("a", "a"), ("aa", "a")]
    assert vocab2 == {"a": 0, "aa": 1, "aaa": 2}


def test_identical_words_are_summed():
    vocab = ids("c", "d", "a", "b")
    words = [(["a", "b"], 1), (["c", "d"], 1), (["a", "b"], 1)]
    merges, _, _ = reference_extend(words, vocab, 1)
    assert merges == [("a", "b")]


# ---------------------------------------------------------------- the ':Ġ' rule


def test_colon_space_is_forbidden_even_when_most_frequent_and_uses_no_id():
    vocab = ids(":", G, "a", "b")
    words = [([":", G], 10), (["a", "b"], 1)]
    merges, new_vocab, dups = reference_extend(words, vocab, 1)
    assert merges == [("a", "b")]  # picked in the same iteration
    assert new_vocab == {":": 0, G: 1, "a": 2, "b": 3, "ab": 4}
    assert ":" + G not in new_vocab
    assert dups == 0


def test_colon_space_stays_forbidden_in_later_iterations():
    vocab = ids(":", G, "a", "b", "c")
    words = [([":", G], 10), (["a", "b"], 3), (["c", "c"], 2)]
    merges, new_vocab, _ = reference_extend(words, vocab, 5)
    assert merges == [("a", "b"), ("c", "c")]
    assert new_vocab["ab"] == 5 and new_vocab["cc"] == 6


def test_colon_space_inside_a_longer_string_is_forbidden():
    vocab = ids("a:", G + "b", "x", "y")
    merges, _, _ = reference_extend([(["a:", G + "b"], 5), (["x", "y"], 1)], vocab, 1)
    assert merges == [("x", "y")]
    assert is_forbidden("a:" + G + "b", None, True)
    assert not is_forbidden(":a" + G, None, True)
    assert not is_forbidden(G + ":", None, True)


def test_colon_space_rule_can_be_turned_off():
    vocab = ids(":", G, "a", "b")
    merges, new_vocab, _ = reference_extend([([":", G], 10), (["a", "b"], 1)], vocab, 1, forbid_colon_space=False)
    assert merges == [(":", G)]
    assert new_vocab[":" + G] == 4


# ---------------------------------------------------------------- the word cap


def test_word_count_splits_on_u0120_only():
    assert word_count(G + "a" + G + "b" + G + "c" + G + "d" + G + "e") == 5
    assert word_count(G + "a" + G + "b" + G + "c" + G + "d") == 4
    assert word_count("a" + G) == 1
    assert word_count(G) == 0
    assert word_count(G + G + "a") == 1
    assert word_count("a\u00a0b") == 1  # NBSP is not a separator
    assert word_count("a\tb c\nd") == 1  # nor are tab, space, newline


def test_word_cap_forbids_three_words_allows_two():
    vocab = ids(G + "a" + G + "b", G + "c", "c")
    words = [([G + "a" + G + "b", G + "c"], 5), ([G + "a" + G + "b", "c"], 1)]
    merges, new_vocab, _ = reference_extend(words, vocab, 1, max_words=2)
    assert merges == [(G + "a" + G + "b", "c")]
    assert new_vocab[G + "a" + G + "bc"] == 3
    # A larger cap, or none, lets the frequent three-word pair through.
    for cap in (3, None):
        merges, _, _ = reference_extend(words, vocab, 1, max_words=cap)
        assert merges == [(G + "a" + G + "b", G + "c")]


def test_word_cap_ignores_nbsp_and_tab():
    vocab = ids(G + "a", "\u00a0b", "\tc", G + "d", "x", "y")
    words = [([G + "a", "\u00a0b"], 5), ([G + "a", "\tc"], 4), ([G + "a", G + "d"], 3), (["x", "y"], 1)]
    merges, _, _ = reference_extend(words, vocab, 10, max_words=1)
    assert merges == [(G + "a", "\u00a0b"), (G + "a", "\tc"), ("x", "y")]


def test_default_word_cap_is_four():
    four = G + "a" + G + "b" + G + "c" + G + "d"
    vocab = ids(four, G + "e", "e", "x", "y")
    words = [([four, G + "e"], 5), ([four, "e"], 4), (["x", "y"], 1)]
    merges, _, _ = reference_extend(words, vocab, 10)
    assert merges == [(four, "e"), ("x", "y")]


def test_all_pairs_forbidden_stops():
    vocab = ids(":", G)
    merges, new_vocab, dups = reference_extend([([":", G, ":", G], 3)], vocab, 5, max_words=None)
    # (G, :) is allowed; then (:, G:) -> ":Ġ:" forbidden, (G:, G) -> "Ġ:Ġ" forbidden, (:, G) forbidden.
    assert merges == [(G, ":")]
    assert new_vocab == {":": 0, G: 1, G + ":": 2}
    assert dups == 0


# ---------------------------------------------------------------- duplicates and ids


def test_duplicate_reuses_existing_id_and_is_counted():
    vocab = ids("a", "b", "ab", "c")
    words = [(["a", "b", "c"], 1), (["ab", "c"], 1), (["b", "b"], 1)]
    merges, new_vocab, dups = reference_extend(words, vocab, 3)
    # (a,b) wins the three-way tie at count 1 and makes "ab", which exists (id 2).
    # Both words are then ["ab","c"], so (ab,c) counts 2 and beats (b,b).
    assert merges == [("a", "b"), ("ab", "c"), ("b", "b")]
    assert dups == 1
    assert new_vocab == {"a": 0, "b": 1, "ab": 2, "c": 3, "abc": 4, "bb": 5}


def test_duplicate_from_two_different_pairs():
    vocab = ids("a", "b", "c", "bc")
    words = [(["a", "b", "c"], 3), (["a", "bc"], 2)]
    merges, new_vocab, dups = reference_extend(words, vocab, 10)
    assert merges == [("a", "b"), ("ab", "c"), ("a", "bc")]
    assert new_vocab == {"a": 0, "b": 1, "c": 2, "bc": 3, "ab": 4, "abc": 5}
    assert dups == 1


def test_new_ids_are_max_plus_one_in_creation_order():
    vocab = {"a": 0, "b": 1, "c": 7}
    merges, new_vocab, dups = reference_extend([(["a", "b"], 3), (["c", "c"], 2)], vocab, 2)
    assert merges == [("a", "b"), ("c", "c")]
    assert new_vocab == {"a": 0, "b": 1, "c": 7, "ab": 8, "cc": 9}
    assert dups == 0
    assert vocab == {"a": 0, "b": 1, "c": 7}  # input not changed


def test_unknown_symbol_is_an_error():
    with pytest.raises(KeyError):
        reference_extend([(["a", "q"], 1)], ids("a"), 1)


# ---------------------------------------------------------------- replay


def test_replay_applies_merges_in_order_left_to_right():
    words = [["a", "b", "c", "c", "c"], ["c", "c", "c", "c"]]
    out = replay_merges(words, [("a", "b"), ("ab", "c"), ("c", "c")])
    assert out == [["abc", "cc"], ["cc", "cc"]]
    assert words == [["a", "b", "c", "c", "c"], ["c", "c", "c", "c"]]  # input not changed
    # Order matters: (b,c) first leaves no (a,b) to merge.
    assert replay_merges([["a", "b", "c"]], [("b", "c"), ("a", "b")]) == [["a", "bc"]]
    assert replay_merges([["a", "b", "c"]], [("a", "b"), ("b", "c")]) == [["ab", "c"]]
    assert replay_merges([["a", "a", "a"]], [("a", "a")]) == [["aa", "a"]]


# ---------------------------------------------------------------- stopping


def test_stops_when_no_pair_is_left():
    merges, new_vocab, _ = reference_extend([(["a", "b"], 1), (["c"], 5)], ids("a", "b", "c"), 10)
    assert merges == [("a", "b")]
    assert len(new_vocab) == 4


def test_stops_after_n_new_merges():
    vocab = ids("a", "b", "c", "d")
    words = [(["a", "b", "c", "d"], 1)]
    assert reference_extend(words, vocab, 0)[0] == []
    assert reference_extend(words, vocab, 1)[0] == [("a", "b")]
    # After "ab", (c,d) with ids (2,3) beats (ab,c) with ids (4,2).
    assert reference_extend(words, vocab, 2)[0] == [("a", "b"), ("c", "d")]
    assert reference_extend(words, vocab, 3)[0] == [("a", "b"), ("c", "d"), ("ab", "cd")]
    assert reference_extend(words, vocab, 9)[0] == [("a", "b"), ("c", "d"), ("ab", "cd")]


def test_empty_input():
    assert reference_extend([], ids("a"), 5) == ([], {"a": 0}, 0)


# ---------------------------------------------------------------- cross-check


def _naive_extend(words, vocab, n_new, max_words, forbid_colon_space):
    """Recount everything from scratch each iteration, from a replay of the merges so far."""
    vocab = dict(vocab)
    initial = [list(w) for w, _ in words]
    counts = [c for _, c in words]
    merges, dups = [], 0
    while len(merges) < n_new:
        current = replay_merges(initial, merges)
        pairs = {}
        for symbols, c in zip(current, counts):
            for i in range(len(symbols) - 1):
                pairs[(symbols[i], symbols[i + 1])] = pairs.get((symbols[i], symbols[i + 1]), 0) + c
        allowed = [p for p in pairs if not is_forbidden(p[0] + p[1], max_words, forbid_colon_space)]
        if not allowed:
            break
        a, b = min(allowed, key=lambda p: (-pairs[p], vocab[p[0]], vocab[p[1]]))
        if a + b in vocab:
            dups += 1
        else:
            vocab[a + b] = max(vocab.values()) + 1
        merges.append((a, b))
    return merges, vocab, dups


@pytest.mark.parametrize("seed", range(20))
def test_incremental_counts_match_a_naive_recount(seed):
    rng = random.Random(seed)
    alphabet = ["a", "b", ":", G, "\u00a0"]
    vocab = {s: i for i, s in enumerate(rng.sample(alphabet, len(alphabet)))}
    for extra in ("ab", "aa", "ba", G + "a", "a" + G + "b"):  # so duplicates can happen
        vocab[extra] = len(vocab)
    words = [([rng.choice(alphabet) for _ in range(rng.randint(1, 12))], rng.randint(1, 4)) for _ in range(15)]
    max_words = rng.choice([None, 1, 2, 4])
    forbid = rng.random() < 0.7
    got = reference_extend(words, vocab, 60, max_words=max_words, forbid_colon_space=forbid)
    assert got == _naive_extend(words, vocab, 60, max_words, forbid)
