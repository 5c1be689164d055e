import random

import pytest
import torch
from transformers import DynamicCache

from pertoken.models import tiny_llama
from pertoken.speculative.tree import (GQA_SDPA, accepted_keep, compact_cache, depths,
                                       tree_attention_mask, tree_forward, tree_position_ids,
                                       use_gqa_attention)

from .paths import node_path


def _model(attn):
    model, _ = tiny_llama(seed=1, num_hidden_layers=3, hidden_size=64, intermediate_size=96)
    if attn == GQA_SDPA:
        return use_gqa_attention(model)
    model.set_attn_implementation(attn)
    return model


def _prefill(model, prefix):
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([prefix]), cache=cache, use_cache=True)
    return cache


def _path(parents, node):  # the root included
    return [0] + node_path(parents, node)


def _random_tree(rng, n):
    return [-1] + [rng.randrange(i) for i in range(1, n)]


@pytest.mark.parametrize("attn", ["sdpa", "eager", GQA_SDPA])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_pass_logits_equal_sequential_decoding_of_each_path(attn, seed):
    rng = random.Random(seed)
    model = _model(attn)
    prefix = [rng.randrange(4, 260) for _ in range(rng.randrange(1, 40))]
    parents = _random_tree(rng, rng.randrange(2, 16))
    tokens = [rng.randrange(4, 260) for _ in parents]
    logits = tree_forward(model, _prefill(model, prefix), tokens, parents)
    assert logits.shape == (len(parents), model.config.vocab_size)
    for node in range(len(parents)):
        path_tokens = [tokens[i] for i in _path(parents, node)]
        cache = _prefill(model, prefix)
        with torch.inference_mode():
            for token in path_tokens:
                step = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
        assert torch.allclose(logits[node], step.logits[0, -1], atol=1e-5, rtol=0)


def test_gqa_attention_runs_tree_passes_without_repeating_the_cache(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    model = _model(GQA_SDPA)
    assert model.config._attn_implementation == GQA_SDPA
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    reference = _model("sdpa")
    prefix, tokens, parents = [5, 6, 7, 8], [9, 10, 11, 12], [-1, 0, 0, 1]
    expected = tree_forward(reference, _prefill(reference, prefix), tokens, parents)
    cache = _prefill(model, prefix)

    def refuse(*args):
        raise AssertionError("repeat_kv copied the cache")

    monkeypatch.setattr(sdpa, "repeat_kv", refuse)
    torch.testing.assert_close(tree_forward(model, cache, tokens, parents), expected,
                               rtol=1e-5, atol=1e-5)
    eager = _model("eager")
    assert use_gqa_attention(eager) is eager  # other implementations are left alone
    assert eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("attn", ["sdpa", "eager", GQA_SDPA])
def test_compacted_cache_continues_like_a_full_recompute(attn):
    rng = random.Random(7)
    model = _model(attn)
    prefix = [rng.randrange(4, 260) for _ in range(20)]
    parents = [-1, 0, 0, 1, 1, 3, 2, 6]
    tokens = [rng.randrange(4, 260) for _ in parents]
    cache = _prefill(model, prefix)
    tree_forward(model, cache, tokens, parents)
    accepted = _path(parents, 5)  # root, 1, 3, 5
    compact_cache(cache, accepted_keep(len(prefix), accepted))
    assert cache.get_seq_length() == len(prefix) + len(accepted)
    bonus = 42
    with torch.inference_mode():
        step = model(input_ids=torch.tensor([[bonus]]), cache=cache, use_cache=True).logits[0, -1]
        full = model(input_ids=torch.tensor([prefix + [tokens[i] for i in accepted] + [bonus]]))
    assert torch.allclose(step, full.logits[0, -1], atol=1e-5, rtol=0)


def test_mask_is_additive_float_and_bool_masks_are_refused():
    mask = tree_attention_mask([-1, 0, 0, 1], prefix_length=2, dtype=torch.float32)
    assert mask.shape == (1, 1, 4, 6) and mask.dtype == torch.float32
    visible = mask[0, 0] == 0
    assert visible[:, :2].all()  # everyone sees the prefix
    assert visible[3, 2:].tolist() == [True, True, False, True]  # root, parent, not sibling, self
    assert visible[2, 2:].tolist() == [True, False, True, False]
    with pytest.raises(TypeError, match="additive float"):
        tree_attention_mask([-1, 0], 0, torch.bool)


def test_positions_follow_depth_and_parents_must_precede_children():
    assert depths([-1, 0, 0, 1, 3]) == [0, 1, 1, 2, 3]
    assert tree_position_ids([-1, 0, 0, 1], 5).tolist() == [[5, 6, 6, 7]]
    with pytest.raises(ValueError, match="precede"):
        depths([-1, 2, 0])


@pytest.mark.parametrize("seed", [0, 1])
def test_tree_fed_in_layers_gives_the_logits_of_each_path(seed):
    """Feeding a tree in several calls (each over the cache of the earlier nodes), keeping only
    some rows, equals sequential decoding of each node's path."""
    rng = random.Random(seed)
    model = _model("sdpa")
    prefix = [rng.randrange(4, 200) for _ in range(5)]
    parents = _random_tree(rng, 12)
    tokens = [rng.randrange(4, 200) for _ in parents]
    cache = _prefill(model, prefix)
    got = {}
    for start, end in ((0, 1), (1, 5), (5, 12)):
        keep = list(range(start, end, 2))
        logits = tree_forward(model, cache, tokens[:end], parents[:end], start=start, keep=keep)
        got.update(zip(keep, logits))
    assert cache.get_seq_length() == len(prefix) + len(parents)
    for node, row in got.items():
        ids = prefix + [tokens[i] for i in _path(parents, node)]
        with torch.inference_mode():
            want = model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert torch.allclose(row, want, atol=1e-4), node


def test_draft_runner_probabilities_and_cache_after_commit():
    from pertoken.speculative.generate import _DraftRunner
    from pertoken.speculative.verify import DraftTree

    model = _model("sdpa")
    prefix = [7, 8, 9, 10]
    cache = _prefill(model, prefix)
    runner = _DraftRunner(model, cache, temperature=0.6, every_node=False)
    runner.start(len(prefix))
    tree = DraftTree.root(11)
    first = runner(tree, [0])
    a, b = tree.add(0, 12), tree.add(0, 13)
    second = runner(tree, [a, b])
    c = tree.add(a, 14)
    tree.add(c, 15)  # never fed: added after the last call
    runner(tree, [c])
    for node, probs in ((0, first[0]), (a, second[0]), (b, second[1])):
        ids = prefix + [tree.tokens[i] for i in _path(tree.parents, node)]
        with torch.inference_mode():
            want = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double() / 0.6, -1)
        assert torch.allclose(probs.double(), want, atol=1e-5)
    runner.commit(tree, [0, a, c, 4])  # the whole path, its last node unseen by the draft
    fresh = _prefill(model, prefix + [11, 12, 14, 15])
    assert cache.get_seq_length() == fresh.get_seq_length() == 8
    for mine, ref in zip(cache.layers, fresh.layers):
        assert torch.allclose(mine.keys, ref.keys, atol=1e-5)
        assert torch.allclose(mine.values, ref.values, atol=1e-5)
