"""Float16 drafts: the swapped linears compute with float16-rounded weights, a float16 EAGLE
head and draft model keep decoding exact, and transformers' assisted generation takes a
float16 assistant."""

import random

import pytest
import torch

from pertoken.models import tiny_llama
from pertoken.speculative.generate import generate
from pertoken.speculative.fp16 import fp16_available, fp16_draft, fp16_linear

from .heads import nudged_head, random_prompts, saved_pair

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


@torch.inference_mode()
def test_fp16_head_is_close_to_the_float_head_and_cannot_be_saved(tmp_path):
    target, _ = tiny_llama(seed=31, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    ids, feats = torch.randint(0, 256, (1, 12)), torch.randn(1, 12, 32)
    float_head = nudged_head(target, 33)
    want_g, want = float_head(ids, feats)
    head = fp16_draft(nudged_head(target, 33))
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
        draft = nudged_head(target, 34)
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


def test_beside_a_bfloat16_target_the_draft_runs_in_float32_on_float16_weights(tmp_path):
    from pertoken.speculative.cli import _draft_model, _load_pair

    _, head = saved_pair(tmp_path, head_seed=34)
    target, _, loaded = _load_pair(str(tmp_path / "target"), str(tmp_path / "head"), "bfloat16",
                                   fp16_draft=True)
    assert next(target.parameters()).dtype == torch.bfloat16
    assert loaded.dtype == torch.float32
    assert not any(isinstance(m, torch.nn.Linear) for m in loaded.modules())
    # the saved float32 weights rounded once, to float16: not through bfloat16 first
    assert torch.equal(loaded.fc._weight_bias()[0], head.fc.weight.detach().half().float())
    rows = target.get_output_embeddings().weight[head.vocab].float()
    assert torch.equal(loaded.vocab_projection._weight_bias()[0], rows.half().float())
    # a draft model too (bench's --assistant loads the same way)
    model = _draft_model(str(tmp_path / "target"), "bfloat16", fp16_draft=True)
    assert model.dtype == torch.float32
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    # the head's float32 logits and features beside the target's bfloat16 ones: it only proposes
    for trial, prompt in enumerate(random_prompts(5)):
        plain = generate(target, None, prompt, method="ar", max_new_tokens=16).tokens
        for method in ("dyspec", "chain"):
            out = generate(target, loaded, prompt, method=method, budget=6, max_new_tokens=16,
                           seed=trial)
            assert out.tokens == plain, (prompt, method)
            sampled = generate(target, loaded, prompt, method=method, budget=6,
                               max_new_tokens=16, seed=trial, temperature=1.0)
            assert len(sampled.tokens) == 16


def test_without_fp16_drafts_the_draft_takes_the_target_dtype(tmp_path, monkeypatch):
    from pertoken.speculative import cli

    saved_pair(tmp_path, head_seed=34)
    args = str(tmp_path / "target"), str(tmp_path / "head"), "bfloat16"
    assert cli._load_pair(*args, fp16_draft=False)[2].dtype == torch.bfloat16
    assert cli._load_pair(str(tmp_path / "target"), str(tmp_path / "target"), "bfloat16",
                          fp16_draft=False)[2].dtype == torch.bfloat16
    monkeypatch.setattr("pertoken.speculative.fp16.fp16_available", lambda: False)
    assert cli._draft_dtype("bfloat16", True) == "bfloat16"
    assert cli._load_pair(*args, fp16_draft=True)[2].dtype == torch.bfloat16
