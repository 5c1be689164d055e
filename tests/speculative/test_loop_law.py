"""The whole decoding loop keeps the target's (warped) law: chi-square on the first two sampled
tokens of a tiny random Llama, whose exact law we compute by enumeration."""

import pytest
import torch

from pertoken.models import tiny_llama
from pertoken.speculative import generate as gen_module
from pertoken.speculative.draft_tree import Calibration
from pertoken.speculative.eagle import EagleHead
from pertoken.speculative.generate import generate, warp

PROMPT = [5, 9, 14]
SETTINGS = {"temperature": 1.3, "top_k": 4, "top_p": 0.9}


@pytest.fixture(scope="module")
def models():
    target, _ = tiny_llama(seed=21, num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                           num_attention_heads=2, num_key_value_heads=1)
    draft, _ = tiny_llama(seed=22, num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                          num_attention_heads=2, num_key_value_heads=1)
    for model in (target, draft):
        with torch.no_grad():
            model.lm_head.weight.mul_(6)  # peaked distributions, so drafts get accepted
    return target, draft


def _exact_law(target):
    """P(y1, y2) under the warped target, as a dict over the pairs with positive mass."""
    with torch.inference_mode():
        first = warp(target(input_ids=torch.tensor([PROMPT])).logits[0, -1:], **SETTINGS)[0]
        law = {}
        for y1 in torch.nonzero(first > 0).flatten().tolist():
            second = warp(target(input_ids=torch.tensor([PROMPT + [y1]])).logits[0, -1:],
                          **SETTINGS)[0]
            for y2 in torch.nonzero(second > 0).flatten().tolist():
                law[(y1, y2)] = float(first[y1] * second[y2])
    return law


def _chi2(target, draft, method, n):
    law = _exact_law(target)
    counts = dict.fromkeys(law, 0)
    outside = 0
    # calibrated DySpec: one calibration learns across all samples, so tree shapes and
    # thresholds keep changing with past outcomes, which must not bias the output
    extra = {"calibration": Calibration()} if method == "dyspec-calibrated" else {}
    for seed in range(n):
        out = generate(target, draft, PROMPT, method=method.split("-calibrated")[0], budget=3,
                       max_new_tokens=2, seed=seed, **SETTINGS, **extra).tokens
        if tuple(out) in counts:
            counts[tuple(out)] += 1
        else:
            outside += 1
    chi2 = sum((counts[k] - n * p) ** 2 / (n * p) for k, p in law.items())
    dof = len(law) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(chi2 / 2)))
    return p_value, chi2, outside


def _eagle(target):
    """An EAGLE head for ``target`` over part of its vocabulary, random but peaked."""
    torch.manual_seed(23)
    head = EagleHead(target, torch.arange(0, target.config.vocab_size, 2)).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return head


@pytest.mark.parametrize("method", ["dyspec", "dyspec-calibrated", "chain", "tree", "eagle-dyspec"])
def test_sampling_loop_with_top_k_top_p_matches_the_exact_law(models, method):
    target, draft = models
    if method.startswith("eagle-"):
        method, draft = method[len("eagle-"):], _eagle(target)
    p_value, chi2, outside = _chi2(target, draft, method, 1000)
    assert outside == 0  # nothing outside the warped support
    assert p_value > 1e-3, chi2


@pytest.mark.long
@pytest.mark.parametrize("method", ["dyspec", "dyspec-calibrated", "eagle-dyspec"])
def test_sampling_loop_matches_the_exact_law_at_40k(models, method):
    target, draft = models
    if method.startswith("eagle-"):
        method, draft = method[len("eagle-"):], _eagle(target)
    p_value, chi2, outside = _chi2(target, draft, method, 40_000)
    assert outside == 0 and p_value > 1e-3, chi2


def test_verifying_against_the_unwarped_target_is_caught(models, monkeypatch):
    target, draft = models
    monkeypatch.setattr(gen_module, "warp", lambda logits, temperature, top_k=0, top_p=1.0:
                        warp(logits, temperature))  # top-k and top-p forgotten
    p_value, chi2, outside = _chi2(target, draft, "dyspec", 1000)
    assert outside > 0 or p_value < 1e-6, chi2
