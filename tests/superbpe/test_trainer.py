"""SuperBPE training: stage 2 against the slow reference, invariants, the released tokenizer."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pertoken.data import open_corpus, take_bytes
from pertoken.superbpe import (SuperBPEConfig, extend_merges, load_released, pre_tokenizer,
                               train_superbpe, word_count)
from pertoken.superbpe.trainer import ALPHABET, lines_of, stage2_words, train_stage1

from .reference import reference_extend, replay_merges

RELEASED = Path(__file__).resolve().parents[3] / "shared" / "data" / "superbpe-t180k"
EXTRA = ("Answer: B. Note: the value is 1234567 and the ratio: 3:4.\n"
         "In the end of the day we go to the end of the road.\n" * 40
         + "tabs\tand\u00a0nbsp\u00a0runs and unicode Ünïcödé 中文 🚀\n" * 10)


def _documents(max_bytes):
    return list(take_bytes(open_corpus("wiki-en").documents("train"), max_bytes)) + [EXTRA]


@pytest.fixture(scope="module")
def corpus_1mb():
    return _documents(1_000_000)


@pytest.fixture(scope="module")
def corpus_2mb():
    return _documents(2_000_000)


def _stage2_start(docs, stage1_vocab, pretokenization="paper"):
    tokens, merges = train_stage1(lines_of(docs), stage1_vocab, pretokenization)
    words = stage2_words(lines_of(docs), tokens, merges, pretokenization)
    return tokens, merges, words


def _as_strings(words, tokens):
    return [([tokens[i] for i in np.frombuffer(k, dtype=np.int32)], n) for k, n in words.items()]


def _first_divergence(ours, reference):
    for i, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            return i
    return None if len(ours) == len(reference) else min(len(ours), len(reference))


@pytest.mark.parametrize("pretokenization", ["paper", "2025"])
def test_stage2_start_equals_training_style_replay_of_inherited_merges(pretokenization):
    docs = _documents(150_000)
    tokens, merges, words = _stage2_start(docs, 600, pretokenization)
    pieces = [p for line in lines_of(docs)
              for p, _ in pre_tokenizer(2, pretokenization).pre_tokenize_str(line)]
    replayed = replay_merges([list(p) for p in pieces], merges)
    expected = {}
    for word in replayed:
        expected[tuple(word)] = expected.get(tuple(word), 0) + 1
    ours = {tuple(w): n for w, n in _as_strings(words, tokens)}
    assert ours == expected


@pytest.mark.parametrize("max_words,size,n_new", [(4, "2mb", 2000), (2, "1mb", 1500),
                                                  (None, "1mb", 1500)])
def test_stage2_merges_equal_the_reference_trainer(request, max_words, size, n_new):
    docs = request.getfixturevalue(f"corpus_{size}")
    tokens, _, words = _stage2_start(docs, 1000)
    ours, grown, duplicates = extend_merges(words, tokens, n_new, max_words)
    assert len(ours) == n_new
    reference, ref_vocab, ref_duplicates = reference_extend(
        _as_strings(words, tokens), {t: i for i, t in enumerate(tokens)}, n_new, max_words)
    assert _first_divergence(ours, reference) is None
    assert duplicates == ref_duplicates
    if max_words is not None:  # the cap really binds on this corpus
        assert extend_merges(words, tokens, n_new, None)[0] != ours
    for token in grown:
        assert ref_vocab[token] == grown.index(token)


def test_no_pretokenization_baseline_matches_the_reference():
    docs = _documents(200_000)
    tokens, _, words = _stage2_start(docs, 0)
    assert tokens == ALPHABET
    ours, _, _ = extend_merges(words, tokens, 800, 4)
    reference, _, _ = reference_extend(_as_strings(words, tokens),
                                       {t: i for i, t in enumerate(tokens)}, 800, 4)
    assert _first_divergence(ours, reference) is None


def test_duplicate_strings_reuse_the_existing_id():
    # "ab" exists but never forms in stage 2 because "bc" was merged first in this word;
    # stage 2 then merges a + b again, which must reuse the id of "ab"
    tokens = ["a", "b", "c", "ab", "bc"]
    words = {np.array([0, 1], dtype=np.int32).tobytes(): 1,   # a b (no merge "a b" applied)
             np.array([0, 4, 0, 1], dtype=np.int32).tobytes(): 5}
    ours, grown, duplicates = extend_merges(words, tokens, 3, None)
    reference, ref_vocab, ref_duplicates = reference_extend(
        _as_strings(words, tokens), {t: i for i, t in enumerate(tokens)}, 3, None)
    assert ours == reference and duplicates == ref_duplicates >= 1
    assert ref_vocab["ab"] == 3 and "ab" in grown and grown.count("ab") == 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("superbpe")
    bad = folder / "bad.txt"
    bad.write_bytes(b"valid text \xff\xfe then more \x80 text\n\nAnother: paragraph here.\n")
    docs = _documents(300_000) + list(open_corpus(str(bad)).documents("all"))
    config = SuperBPEConfig(vocab_size=3000, transition=1000, special_tokens=["<|endoftext|>"])
    tokenizer, info = train_superbpe(docs, config, docs)
    return tokenizer, info


def test_training_counts_replacement_characters(trained):
    _, info = trained
    assert info["stats"]["replacement_chars"] == 3
    assert info["stats"]["stage1_merges"] == 1000 - 256
    assert info["stats"]["stage2_merges"] == 2000


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_decode_inverts_encode_for_any_unicode(trained, text):
    tokenizer, _ = trained
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_vocabulary_invariants(trained):
    tokenizer, info = trained
    model = json.loads(tokenizer.to_str())["model"]
    vocab, merges = model["vocab"], [tuple(m) for m in model["merges"]]
    assert sorted(vocab, key=vocab.get)[:256] == ALPHABET
    for rank, (a, b) in enumerate(merges):
        assert vocab[a + b] == 256 + rank  # ids are alphabet size + merge rank
    for token in vocab:
        assert ":\u0120" not in token
        assert word_count(token) <= 4
        assert "\u010a" not in token[:-1]  # a newline only ends a token
    assert tokenizer.token_to_id("<|endoftext|>") == 3000
    superwords = [t for t in vocab if re.search("[^\u0120]\u0120", t)]
    assert len(superwords) > 100


def test_transition_at_vocab_size_is_plain_bpe_trained_by_tokenizers():
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    docs = _documents(100_000)
    ours, _ = train_superbpe(docs, SuperBPEConfig(vocab_size=900, transition=900))
    stock = Tokenizer(BPE())
    stock.pre_tokenizer = pre_tokenizer(1)
    stock.train_from_iterator(lines_of(docs), BpeTrainer(vocab_size=900, initial_alphabet=ALPHABET,
                                                         min_frequency=0, show_progress=False))
    assert ours.get_vocab() == stock.get_vocab()
    text = "Plain BPE never crosses a space."
    assert ours.encode(text).ids == stock.encode(text).ids


def test_released_t180k_reproduces_the_published_ids():
    if not RELEASED.is_dir():
        pytest.skip("shared/data/superbpe-t180k is not beside this checkout")
    tokenizer = load_released(RELEASED)
    encoding = tokenizer.encode("By the way, I am a fan of the Milky Way.")
    assert encoding.ids == [189205, 181251, 244, 4332, 180235, 199785, 13]
    assert encoding.tokens[0] == "By\u0120the\u0120way"
