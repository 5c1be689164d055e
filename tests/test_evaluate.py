import math

import pytest
import torch

from pertoken.errors import UserError
from pertoken.evaluate import PerplexityConfig, perplexity, token_stream, windows

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Ünïcödé 中文 Straße 🚀 and some more words to make it longer than a window.",
         "short",
         "A third document, with its own words, numbers 12345 and punctuation!"]


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (100, 16, 5), (3, 512, 256), (2, 2, 1),
                                             (57, 8, 7), (1000, 512, 256)])
def test_windows_score_every_position_once_with_enough_context(n, window, stride):
    spans = windows(n, window, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == list(range(1, n))
    for start, end, first in spans:
        assert end - start <= window
        assert first - start >= min(window - stride, first) or start == 0


def _slow_reference(model, ids, scored, window, stride):
    """Score each token alone, from exactly the context its window gives it."""
    nll = 0.0
    for start, end, first in windows(len(ids), window, stride):
        for t in range(first, end):
            if not scored[t]:
                continue
            context = torch.tensor([ids[start:t]])
            with torch.no_grad():
                logits = model(context).logits[0, -1].double()
            nll -= float(torch.log_softmax(logits, -1)[ids[t]])
    return nll


@pytest.mark.parametrize("window,stride,batch", [(16, 8, 1), (16, 8, 3), (24, 5, 2), (1024, 512, 4)])
def test_perplexity_matches_token_by_token_reference(tiny, window, stride, batch):
    model, tok = tiny
    config = PerplexityConfig(window=window, stride=stride, max_tokens=None, batch_size=batch)
    result = perplexity(model, tok, TEXTS, config, progress=False)
    ids, scored, n_bytes, n_docs = token_stream(tok, TEXTS, None)
    reference = _slow_reference(model, ids, scored, window, stride)
    assert result.tokens == sum(scored) == sum(len(tok.encode(t, add_special_tokens=False)) for t in TEXTS)
    assert result.nll == pytest.approx(reference, rel=1e-5)
    assert result.bytes == n_bytes == sum(len(t.encode()) for t in TEXTS)
    assert result.documents == n_docs == len(TEXTS)
    assert result.perplexity == pytest.approx(math.exp(reference / result.tokens), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(reference / math.log(2) / n_bytes, rel=1e-5)


def test_one_window_equals_transformers_own_loss(tiny):
    """With a window over the whole stream, perplexity is exp of the model's built-in loss."""
    model, tok = tiny
    text = TEXTS[0]
    result = perplexity(model, tok, [text], PerplexityConfig(window=512, stride=256, max_tokens=None,
                                                             separator="none"), progress=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert result.tokens == ids.shape[1] - 1
    assert result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_max_tokens_caps_scored_tokens_and_counts_their_bytes(tiny):
    model, tok = tiny
    result = perplexity(model, tok, TEXTS, PerplexityConfig(window=32, stride=16, max_tokens=50),
                        progress=False)
    assert result.tokens == 50
    first = len(tok.encode(TEXTS[0], add_special_tokens=False))
    rest = tok.decode(tok.encode(TEXTS[1], add_special_tokens=False)[: 50 - first])
    assert result.bytes == len(TEXTS[0].encode()) + len(rest.encode())
    assert result.documents == 2


def test_separator_tokens_are_never_scored(tiny):
    model, tok = tiny
    ids, scored, _, _ = token_stream(tok, TEXTS, None, separator="eos")
    assert all(not s for i, s in zip(ids, scored) if i == tok.eos_token_id)
    assert sum(1 for i in ids if i == tok.eos_token_id) == len(TEXTS)


def test_empty_input_and_bad_config_are_user_errors(tiny):
    model, tok = tiny
    with pytest.raises(UserError, match="nothing to score"):
        perplexity(model, tok, ["", ""], progress=False)
    for bad in [PerplexityConfig(window=8, stride=8), PerplexityConfig(window=1, stride=1),
                PerplexityConfig(max_tokens=0), PerplexityConfig(separator="comma")]:
        with pytest.raises(UserError):
            bad.validate()
