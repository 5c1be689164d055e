import random

import pytest
import torch

from pertoken.errors import UserError
from pertoken.models import tiny_llama
from pertoken.speculative.generate import generate, warp


@pytest.fixture(scope="module")
def models():
    target, _ = tiny_llama(seed=5, num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    other, _ = tiny_llama(seed=6, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    return target, other


def _hf_greedy(model, prompt, n, eos):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos, pad_token_id=0, attention_mask=torch.ones(1, len(prompt),
                                                                                          dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("method", ["dyspec", "dyspec-heap", "chain", "tree"])
@pytest.mark.parametrize("draft_kind", ["same", "other"])
def test_greedy_speculation_is_token_identical_to_plain_and_hf_greedy(models, draft_kind, method):
    target, other = models
    draft = target if draft_kind == "same" else other
    rng = random.Random(0)
    checked = 0
    for trial in range(6):
        prompt = [rng.randrange(4, 260) for _ in range(rng.randrange(1, 12))]
        n = rng.choice([1, 7, 20])
        plain = generate(target, None, prompt, method="ar", max_new_tokens=n).tokens
        assert plain == _hf_greedy(target, prompt, n, None)
        for budget in (1, 4, 16):
            ours = generate(target, draft, prompt, method=method, budget=budget,
                            max_new_tokens=n, seed=trial)
            assert ours.tokens == plain, (prompt, budget)
            checked += 1
        # an EOS that greedy decoding reaches, so it falls inside some tree
        if len(plain) > 3:
            eos = plain[3]
            stop = plain.index(eos) + 1
            for budget in (4, 16):
                ours = generate(target, draft, prompt, method=method, budget=budget,
                                max_new_tokens=n, eos_token_id=eos, seed=trial)
                assert ours.tokens == plain[:stop] == _hf_greedy(target, prompt, n, eos)
    assert checked == 18


@pytest.mark.parametrize("method", ["dyspec", "tree"])
def test_greedy_speculation_stays_exact_with_small_batch_layout(method):
    """The CLI lays models out for few-row passes (packed MKL weights for tree passes, the
    plain kernel for one-row decoding; SDPA's grouped-query mode under tree masks); greedy
    output must not move."""
    from pertoken.speculative.cli import _for_trees
    from pertoken.speculative.tree import GQA_SDPA

    target, _ = tiny_llama(seed=5, num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    reference, _ = tiny_llama(seed=5, num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    draft, _ = tiny_llama(seed=6, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    _for_trees(target)
    _for_trees(draft)
    assert target.config._attn_implementation == GQA_SDPA
    rng = random.Random(1)
    for trial in range(5):
        prompt = [rng.randrange(4, 260) for _ in range(rng.randrange(1, 12))]
        plain = generate(reference, None, prompt, method="ar", max_new_tokens=20).tokens
        assert generate(target, None, prompt, method="ar", max_new_tokens=20).tokens == plain
        for budget in (4, 16):
            ours = generate(target, draft, prompt, method=method, budget=budget,
                            max_new_tokens=20, seed=trial)
            assert ours.tokens == plain, (prompt, budget)


def test_a_draft_equal_to_the_target_gets_several_tokens_per_call():
    target, _ = tiny_llama(seed=5, num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    with torch.no_grad():
        target.lm_head.weight.mul_(8)  # peaked next-token distributions, as a trained LM has
    out = generate(target, target, [10, 20, 30], budget=16, max_new_tokens=40)
    for method in ("chain", "dyspec-heap", "tree"):
        other = generate(target, target, [10, 20, 30], method=method, budget=8, max_new_tokens=40)
        assert other.tokens_per_call > 2 and other.tokens == out.tokens
    assert out.tokens == generate(target, None, [10, 20, 30], method="ar", max_new_tokens=40).tokens
    assert out.tokens_per_call > 2
    assert all(s.tree_size <= 16 for s in out.steps)


def test_sampling_runs_and_respects_top_k(models):
    target, other = models
    out = generate(target, other, [10, 20], temperature=1.0, top_k=1, budget=4, max_new_tokens=12)
    greedy = generate(target, None, [10, 20], method="ar", max_new_tokens=12).tokens
    assert out.tokens == greedy  # top-k = 1 leaves only the argmax


def test_warp_top_p_keeps_the_smallest_set_reaching_p():
    probs = warp(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), 1.0, top_p=0.7)
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0, 0]], dtype=torch.float64))


@pytest.mark.parametrize("kwargs,needle", [({"budget": 0}, "budget"), ({"temperature": -1.0}, "temperature"),
                                           ({"top_p": 0.0}, "top-p"), ({"top_p": 1.5}, "top-p"),
                                           ({"lookup": -1}, "lookup")])
def test_bad_settings_are_user_errors(models, kwargs, needle):
    target, other = models
    with pytest.raises(UserError, match=needle):
        generate(target, other, [1, 2], **kwargs)


def test_different_vocabularies_are_a_user_error(models):
    target, _ = models
    small, _ = tiny_llama(seed=1, vocab_size=300)
    with pytest.raises(UserError, match="vocabularies"):
        generate(target, small, [1, 2])


def test_streaming_callback_sees_exactly_the_output(models):
    target, other = models
    seen = []
    out = generate(target, other, [3, 4, 5], budget=4, max_new_tokens=9, on_tokens=seen.extend)
    assert seen == out.tokens and len(out.tokens) == 9


def test_cli_generate_streams_text_and_rejects_bad_settings(tmp_path, models, capsys):
    import subprocess
    import sys

    from pertoken.cli import main
    from pertoken.models import tiny_byte_tokenizer

    target, other = models
    tok = tiny_byte_tokenizer()
    for name, model in (("target", target), ("draft", other)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    args = ["speculative", "generate", "--model", str(tmp_path / "target"), "--draft",
            str(tmp_path / "draft"), "--prompt", "hello", "--max-new-tokens", "12"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert len(text) > 0
    # --budget auto at T=0 sizes each tree from the measured costs: the same greedy text
    assert main(args + ["--budget", "auto"]) == 0
    assert capsys.readouterr().out == text
    # sampled DySpec's auto budget: from its tokens per call measured at each budget, cached
    from pertoken.models import cache_dir

    assert main(args + ["--budget", "auto", "--temperature", "1"]) == 0
    assert len(capsys.readouterr().out) > 0
    assert len(list((cache_dir() / "speculative").glob("tokens-per-call-*.json"))) == 1
    for bad, needle in ((["--budget", "0"], "budget"), (["--temperature", "-1"], "temperature"),
                        (["--top-p", "2"], "top-p"), (["--lookup", "-1"], "lookup"),
                        (["--draft-temperature", "-1"], "draft temperature")):
        done = subprocess.run([sys.executable, "-m", "pertoken", *args, *bad], capture_output=True,
                              text=True)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], done.stderr


def test_greedy_dyspec_grafts_prompt_lookup_drafts(models):
    """A prompt that repeats the target's own greedy text: prompt-lookup drafts add more than a
    token per call over an unrelated draft alone, output still token-identical; ``lookup=0``
    turns them off."""
    target, other = models
    plain = generate(target, None, [7, 8, 9], method="ar", max_new_tokens=40).tokens
    prompt = [7, 8, 9] + plain[:30] + [7, 8, 9]  # greedy tends to repeat ``plain`` from here
    want = generate(target, None, prompt, method="ar", max_new_tokens=24).tokens
    with_lookup = generate(target, other, prompt, method="dyspec", budget=8, max_new_tokens=24)
    without = generate(target, other, prompt, method="dyspec", budget=8, max_new_tokens=24,
                       lookup=0)
    assert with_lookup.tokens == without.tokens == want
    assert with_lookup.tokens_per_call > without.tokens_per_call + 1


@pytest.mark.parametrize("costs", [{1: 0.05, 2: 0.06, 9: 0.08, 17: 0.1},  # a CPU-like curve
                                   {1: 1.0, 64: 1.0},  # flat: the whole budget
                                   {1: 0.01, 2: 1.0}])  # steep: one candidate per step
def test_greedy_dyspec_with_sized_trees_stays_exact(models, costs):
    """Per-step tree sizes (``tree_costs``), with prompt lookup, EOS inside trees and a draft
    equal to the target: token-identical to plain greedy, trees within the budget."""
    target, other = models
    rng = random.Random(3)
    plain = generate(target, None, [7, 8, 9], method="ar", max_new_tokens=40).tokens
    prompts = [[rng.randrange(4, 260) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    prompts.append([7, 8, 9] + plain[:30] + [7, 8, 9])  # prompt lookup finds repeats
    for prompt in prompts:
        want = generate(target, None, prompt, method="ar", max_new_tokens=20).tokens
        eos = want[4]
        stop = want.index(eos) + 1
        for draft in (target, other):
            for budget in (2, 8, 16):
                out = generate(target, draft, prompt, method="dyspec", budget=budget,
                               max_new_tokens=20, tree_costs=costs)
                assert out.tokens == want, (prompt, budget)
                assert all(s.tree_size <= budget for s in out.steps)
                sizes = [s.tree_size for s in out.steps]
                if costs[1] == 1.0:  # everything helps: the fixed-budget trees
                    fixed = generate(target, draft, prompt, method="dyspec", budget=budget,
                                     max_new_tokens=20)
                    assert sizes == [s.tree_size for s in fixed.steps]
                elif costs[2] == 1.0:  # one candidate, and the lookup tokens grafted besides
                    assert max(sizes) <= 1 + min(4, budget - 1)
                out = generate(target, draft, prompt, method="dyspec", budget=budget,
                               max_new_tokens=20, tree_costs=costs, eos_token_id=eos)
                assert out.tokens == want[:stop]
