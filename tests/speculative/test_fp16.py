"""Float16 drafts: the swapped linears compute with float16-rounded weights, a float16 EAGLE
head and draft model keep decoding exact, and transformers' assisted generation takes a
float16 assistant."""

import random

import pytest
import torch

from pertoken.models import tiny_llama
from pertoken.speculative.eagle import EagleHead
from pertoken.speculative.generate import generate
from pertoken.speculative.fp16 import fp16_available, fp16_draft, fp16_linear

pytestmark = pytest.mark.skipif(not fp16_available(), reason="no fbgemm float16 linear")


@torch.inference_mode()
def test_fp16_linear_computes_with_the_weights_rounded_to_float16():
    g = torch.Generator().manual_seed(0)
    for rows, out_f, in_f in ((1, 40, 24), (9, 64, 48), (3, 7, 16)):
        weight = torch.randn(out_f, in_f, generator=g)
        bias = torch.randn(out_f, generator=g)
        x = torch.randn(rows, in_f, generator=g) * 3
        got = fp16_linear(weight, bias)(x)
        # reference: the rounded weights, multiplied in float64
        want = x.double() @ weight.half().double().T + bias.double()
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
        assert got.dtype == torch.float32 and got.shape == (rows, out_f)
    # leading dimensions, as a decoder layer calls it
    x = torch.randn(2, 5, 16, generator=g)
    assert fp16_linear(weight)(x).shape == (2, 5, 7)


def _head(target, seed):
    torch.manual_seed(seed)
    head = EagleHead(target, torch.arange(3, target.config.vocab_size, 2)).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return head


@torch.inference_mode()
def test_fp16_head_is_close_to_the_float_head_and_cannot_be_saved(tmp_path):
    target, _ = tiny_llama(seed=31, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    ids, feats = torch.randint(0, 256, (1, 12)), torch.randn(1, 12, 32)
    float_head = _head(target, 33)
    want_g, want = float_head(ids, feats)
    head = fp16_draft(_head(target, 33))
    assert not any(isinstance(m, torch.nn.Linear) for m in head.modules())
    assert head.dtype == torch.float32
    got_g, got = head(ids, feats)
    assert (got - want).norm() / want.norm() < 1e-3
    assert (got_g - want_g).norm() / want_g.norm() < 1e-3
    with pytest.raises(RuntimeError, match="float16"):
        head.save(tmp_path / "head", {})


@pytest.mark.parametrize("kind", ["eagle", "model"])
def test_greedy_with_an_fp16_draft_is_token_identical_to_plain_greedy(kind):
    target, _ = tiny_llama(seed=31, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    if kind == "eagle":
        draft = _head(target, 34)
    else:
        draft = tiny_llama(seed=32, num_hidden_layers=1, hidden_size=32, intermediate_size=64)[0]
    fp16_draft(draft)
    rng = random.Random(3)
    for trial in range(4):
        prompt = [rng.randrange(4, 260) for _ in range(rng.randrange(1, 10))]
        n = rng.choice([1, 9, 20])
        plain = generate(target, None, prompt, method="ar", max_new_tokens=n).tokens
        for method in ("dyspec", "chain", "tree"):
            for budget in (1, 6):
                out = generate(target, draft, prompt, method=method, budget=budget,
                               max_new_tokens=n, seed=trial)
                assert out.tokens == plain, (kind, method, prompt, budget)


@torch.inference_mode()
def test_transformers_assisted_generation_takes_an_fp16_assistant():
    target, _ = tiny_llama(seed=5, num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    draft, _ = tiny_llama(seed=6, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    fp16_draft(draft)
    ids = torch.tensor([[5, 9, 11, 40]])
    plain = target.generate(ids, do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assisted = target.generate(ids, do_sample=False, max_new_tokens=12, min_new_tokens=12,
                               assistant_model=draft)
    assert torch.equal(plain, assisted)


def test_non_float32_drafts_are_left_alone():
    draft, _ = tiny_llama(seed=6, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    draft = draft.to(torch.bfloat16)
    fp16_draft(draft)
    assert any(isinstance(m, torch.nn.Linear) for m in draft.modules())
