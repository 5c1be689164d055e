"""Speculative sampling keeps the target's law: chi-square tests on a toy lookup-table LM,
with broken variants that the same test must catch (spec §8.1)."""

import pytest
import torch

from pertoken.speculative import draft_tree, verify
from pertoken.speculative.draft_tree import heap_tree, layered_heap_tree, threshold_tree
from pertoken.speculative.verify import verify_greedy, verify_sampling

from .paths import node_path

V = 6


def _tables(seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.softmax(torch.randn(V, V, generator=g, dtype=torch.float64) * 1.5, -1)
    draft = torch.softmax(torch.randn(V, V, generator=g, dtype=torch.float64) * 1.5, -1)
    return target, draft


def _draft_fn(draft):
    return lambda tree, nodes: draft[[tree.tokens[n] for n in nodes]]


def _sample_pairs(n, build, seed=0, table_seed=3):
    """n samples of the first two tokens after root token 0 (completed by target sampling)."""
    target, draft = _tables(table_seed)
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V, dtype=torch.long)
    for _ in range(n):
        tree = build(_draft_fn(draft), g)
        accepted, token = verify_sampling(tree, target[tree.tokens], g)
        out = [tree.tokens[i] for i in accepted] + [token]
        if len(out) < 2:
            out.append(int(torch.multinomial(target[out[0]], 1, generator=g)))
        counts[out[0], out[1]] += 1
    expected = target[0][:, None] * target * n
    return counts, expected


def _p_value(counts, expected):
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(chi2 / 2))), chi2


def _heap(budget=6):
    return lambda fn, g: heap_tree(0, fn, budget=budget, generator=g)


def _threshold(budget=6):
    return lambda fn, g: threshold_tree(0, fn, threshold=0.02, budget=budget, generator=g)


def _layered(budget=6):
    return lambda fn, g: layered_heap_tree(0, fn, budget=budget, generator=g, min_value=0.05)[0]


def _static(acceptance=(0.5, 0.2, 0.1), budget=6):
    shape = draft_tree.static_shape(acceptance, budget)
    return lambda fn, g: draft_tree.static_tree(0, fn, shape, generator=g)


def _layered_calibrated(budget=6):
    calibration = draft_tree.Calibration()
    calibration.table = [0.05 + 0.09 * b for b in range(calibration.bins)]  # as if learnt

    def build(fn, g):
        return layered_heap_tree(0, fn, budget=budget, generator=g, min_value=0.05,
                                 calibration=calibration)[0]
    return build


@pytest.mark.parametrize("build", [_heap(), _threshold(), _static(), _layered(),
                                   _layered_calibrated()],
                         ids=["heap", "threshold", "static", "layered-heap", "layered-calibrated"])
def test_tree_speculative_sampling_matches_the_target_law_quick(build):
    p, chi2 = _p_value(*_sample_pairs(20_000, build))
    assert p > 1e-3, chi2


def test_missing_residual_update_is_caught(monkeypatch):
    monkeypatch.setattr(verify, "residual", lambda target, draft: target)
    p, chi2 = _p_value(*_sample_pairs(20_000, _heap()))
    assert p < 1e-6, chi2


def test_pruning_drafted_tokens_by_identity_is_caught():
    def pruned(fn, g):
        tree = heap_tree(0, fn, budget=6, generator=g)
        for kids in tree.children:
            kids[:] = [c for c in kids if tree.tokens[c] != 1]  # drop a drafted token after the fact
        return tree

    p, chi2 = _p_value(*_sample_pairs(20_000, pruned))
    assert p < 1e-6, chi2


@pytest.mark.long
@pytest.mark.parametrize("build", [_heap(), _threshold(), _static(), _layered()],
                         ids=["heap", "threshold", "static", "layered-heap"])
def test_tree_speculative_sampling_matches_the_target_law_400k(build):
    p, chi2 = _p_value(*_sample_pairs(400_000, build, seed=11))
    assert p > 1e-3, chi2


@pytest.mark.long
def test_draft_held_fixed_after_a_rejection_is_caught_at_400k(monkeypatch):
    monkeypatch.setattr(verify, "without", lambda draft, token: draft)  # the SpecInfer rule
    p, chi2 = _p_value(*_sample_pairs(400_000, _heap(), seed=12))
    assert p < 1e-4, chi2


def test_reranking_sampled_drafts_by_their_own_value_is_caught():
    """Keeping the budget most probable of the sampled drafts (ranking a slot by the token drawn
    in it, where the heap ranks it by the value known before the draw) biases the drafts."""
    def by_drawn_value(fn, g):
        tree, drafted, _ = layered_heap_tree(0, fn, budget=12, generator=g, min_value=0.0)
        keep = sorted(range(1, len(drafted)), key=lambda i: -drafted.shares[i])[:2]
        out = verify.DraftTree.root(0)
        kept = [i for i in drafted.children[0] if i in keep]
        for i in kept:
            out.add(0, drafted.tokens[i])
        if kept:
            out.draft_probs[0] = drafted.draft_probs[0]
        return out

    p, chi2 = _p_value(*_sample_pairs(20_000, by_drawn_value))
    assert p < 1e-6, chi2


def test_layered_heap_tree_is_the_heap_tree():
    """With the same (deterministic) draws, the layer-by-layer build keeps exactly the heap's
    tree, on random draft tables and budgets; and it makes one draft call per layer."""
    for seed in range(6):
        _, draft = _tables(seed)
        draft = draft ** 3 / (draft ** 3).sum(-1, keepdim=True)  # sharper: deeper trees
        for budget in (1, 3, 6, 10):
            calls = []
            fn = _draft_fn(draft)

            def counted(tree, nodes, fn=fn):
                calls.append(len(nodes))
                return fn(tree, nodes)

            heap = heap_tree(0, fn, budget=budget, deterministic=True, eos_ids=(5,))
            tree, drafted, origin = layered_heap_tree(0, counted, budget=budget,
                                                      deterministic=True, eos_ids=(5,),
                                                      width=budget, min_value=0.0)
            paths = lambda t: sorted(tuple(t.tokens[j] for j in node_path(t.parents, i))
                                     for i in range(len(t)))
            assert paths(tree) == paths(heap), (seed, budget)
            depth = max(len(node_path(drafted.parents, i)) for i in range(len(drafted)))
            assert len(calls) <= depth
            for i, j in enumerate(origin):
                assert tree.tokens[i] == drafted.tokens[j]
            for node, kids in enumerate(tree.children):
                assert [tree.tokens[c] for c in kids] == [
                    drafted.tokens[c] for c in drafted.children[origin[node]]][:len(kids)]
                assert (node in tree.draft_probs) == bool(kids)


def test_race_order_draws_without_replacement_with_the_right_first_law():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    firsts = torch.zeros(4)
    for _ in range(20_000):
        order = draft_tree.race_order(probs, g)
        assert sorted(order) == [0, 1, 2]
        firsts[order[0]] += 1
    assert torch.allclose(firsts / 20_000, probs.float(), atol=0.015)


def test_race_order_second_draw_follows_the_renormalised_remainder():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])  # zeros inside: the support's indices
    g = torch.Generator().manual_seed(1)
    pairs = torch.zeros(6, 6)
    n = 30_000
    for _ in range(n):
        order = draft_tree.race_order(probs, g, limit=2)
        pairs[order[0], order[1]] += 1
    p = probs.double()
    expected = p[:, None] * p[None, :] / (1 - p[:, None])
    expected.fill_diagonal_(0)
    assert torch.allclose(pairs.double() / n, expected, atol=0.012)


def test_sample_index_draws_from_unnormalised_weights_and_never_a_zero():
    weights = torch.tensor([0.0, 2.0, 0.0, 1.0, 0.5, 0.0, 0.5, 0.0])  # sums to 4
    g = torch.Generator().manual_seed(2)
    counts = torch.zeros(8)
    n = 40_000
    for _ in range(n):
        counts[verify.sample_index(weights, g)] += 1
    assert counts[weights == 0].sum() == 0
    expected = weights / weights.sum() * n
    chi2 = float(((counts - expected)[weights > 0] ** 2 / expected[weights > 0]).sum())
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001
    assert verify.sample_index(torch.tensor([0.0, 0.0, 1.0]), g) == 2


def test_trees_respect_budget_and_record_sampling_order():
    target, draft = _tables(1)
    g = torch.Generator().manual_seed(0)
    for tree in (heap_tree(0, _draft_fn(draft), budget=5, generator=g),
                 threshold_tree(0, _draft_fn(draft), threshold=0.0, budget=5, generator=g)):
        assert len(tree) == 6
        for node, kids in enumerate(tree.children):
            assert len({tree.tokens[c] for c in kids}) == len(kids)  # no repeated siblings
            if kids:
                assert node in tree.draft_probs


def test_greedy_verification_follows_the_argmax():
    tree = verify.DraftTree.root(0)
    a = tree.add(0, 2)
    tree.add(0, 3)
    tree.add(a, 4)
    logits = torch.zeros(4, V)
    logits[0, 2] = 1  # root -> 2 (accepted)
    logits[1, 5] = 1  # after 2 the target wants 5, not the drafted 4
    assert verify_greedy(tree, logits) == ([1], 5)


def _chain(length=3):
    return lambda fn, g: draft_tree.chain_tree(0, fn, length, generator=g)


def test_chain_speculative_sampling_matches_the_target_law_quick():
    p, chi2 = _p_value(*_sample_pairs(20_000, _chain()))
    assert p > 1e-3, chi2
