"""The greedy DySpec tree (``ranked_tree``) against a brute-force reference: the ``budget``
paths of highest draft path probability among all paths of the top-``width`` tokens."""

import itertools

import pytest
import torch

from pertoken.speculative.draft_tree import ranked_tree

from .paths import node_path

VOCAB = 6


def _dist(path: tuple[int, ...], seed: int) -> torch.Tensor:
    """A fixed draft distribution after each token path (sharp enough to grow deep paths)."""
    g = torch.Generator().manual_seed(hash((seed, path)) % (2**31))
    return torch.softmax(3 * torch.randn(VOCAB, generator=g, dtype=torch.float64), -1).float()


def _draft_fn(seed, calls):
    def fn(tree, nodes):
        calls.append(list(nodes))
        out = []
        for node in nodes:
            path = []
            while node > 0:
                path.append(tree.tokens[node])
                node = tree.parents[node]
            out.append(_dist(tuple(reversed(path)), seed))
        return torch.stack(out)
    return fn


def _reference(seed, budget, width, depth, eos=(), min_value=0.0):
    """Every path of top-``width`` tokens up to ``depth`` (none below an EOS or a path less
    likely than ``min_value``), scored by its draft probability; the ``budget`` best."""
    scored = {}
    level = [((), 1.0)]
    for _ in range(depth):
        nxt = []
        for path, value in level:
            if (path and path[-1] in eos) or value < min_value:
                continue
            probs = _dist(path, seed)
            top = torch.topk(probs, width)
            for p, y in zip(top.values.tolist(), top.indices.tolist()):
                scored[path + (y,)] = value * p
                nxt.append((path + (y,), value * p))
        level = nxt
    return set(sorted(scored, key=lambda k: -scored[k])[:budget])


def _paths(tree):
    out = set()
    for i in range(1, len(tree)):
        out.add(tuple(tree.tokens[j] for j in node_path(tree.parents, i)))
    return out


@pytest.mark.parametrize("seed,budget,width,min_value",
                         list(itertools.product(range(6), (1, 3, 8, 20), (2, 4), (0.0, 0.2))))
def test_ranked_tree_keeps_the_most_probable_paths(seed, budget, width, min_value):
    calls = []
    tree, drafted, origin = ranked_tree(99, _draft_fn(seed, calls), budget, width=width,
                                        max_depth=5, min_value=min_value)
    assert len(tree) - 1 == min(budget, len(_reference(seed, 10**6, width, 5, (), min_value)))
    assert _paths(tree) == _reference(seed, budget, width, 5, (), min_value)
    # a connected tree whose nodes are the drafted ones, parents first
    for i in range(1, len(tree)):
        assert tree.parents[i] < i
        assert drafted.tokens[origin[i]] == tree.tokens[i]
        assert origin[tree.parents[i]] == drafted.parents[origin[i]]
    assert origin[0] == 0 and drafted.tokens[0] == tree.tokens[0] == 99
    # one draft call per layer, expanding only nodes still among the best ``budget``
    assert len(calls) <= 5 and all(len(c) <= budget for c in calls)


def test_ranked_tree_does_not_grow_below_eos():
    seed, budget, width = 1, 12, 3
    eos = (int(_dist((), seed).argmax()),)  # the most likely first token ends the text
    calls = []
    tree, drafted, _ = ranked_tree(99, _draft_fn(seed, calls), budget, eos_ids=eos,
                                   width=width, max_depth=5, min_value=0.0)
    assert _paths(tree) == _reference(seed, budget, width, 5, eos)
    eos_nodes = [i for i in range(1, len(tree)) if tree.tokens[i] in eos]
    assert eos_nodes and all(not tree.children[i] for i in eos_nodes)
    assert all(drafted.tokens[n] not in eos for c in calls for n in c)  # never expanded


def _lookup_reference(context, length, ngram=3):
    """The leftmost earlier occurrence of the longest suffix n-gram (``ngram`` down to 1)
    that has a token after it; what follows it, up to ``length`` tokens."""
    for n in range(min(ngram, len(context) - 1), 0, -1):
        key = context[-n:]
        for s in range(len(context) - n):
            if context[s:s + n] == key and s + n < len(context):
                return context[s + n:s + n + length]
    return []


def test_lookup_chain_follows_the_earliest_repeat_of_the_longest_suffix():
    import random

    from pertoken.speculative.draft_tree import lookup_chain

    assert lookup_chain([5, 6, 7, 8, 9, 6, 7], 3) == [8, 9, 6]
    assert lookup_chain([1, 2, 3], 4) == []  # nothing repeats
    assert lookup_chain([4], 4) == []
    rng = random.Random(0)
    for _ in range(300):
        context = [rng.randrange(5) for _ in range(rng.randrange(2, 30))]
        length = rng.randrange(1, 6)
        assert lookup_chain(context, length) == _lookup_reference(context, length), context


def test_graft_chain_reuses_drafted_nodes_and_stops_at_eos():
    from pertoken.speculative.draft_tree import graft_chain

    calls = []
    tree, drafted, origin = ranked_tree(99, _draft_fn(0, calls), 4, width=2, max_depth=3,
                                        min_value=0.0)
    first = tree.tokens[tree.children[0][0]]  # an existing first token: reused
    before = len(tree)
    added = graft_chain(tree, drafted, origin, [first, 7, 8, 9], eos_ids=(8,))
    assert added == 2 and len(tree) == before + 2  # 7 and 8 new; nothing after the EOS 8
    path, node = [], len(tree) - 1
    while node > 0:
        path.append(tree.tokens[node])
        node = tree.parents[node]
    assert path[::-1] == [first, 7, 8]
    for i in range(1, len(tree)):  # ``origin`` still maps the tree into the drafted one
        assert drafted.tokens[origin[i]] == tree.tokens[i]
        assert origin[tree.parents[i]] == drafted.parents[origin[i]]


def _rate_reference(values, tree_sizes, costs, scale, draft_seconds):
    """The best ``k`` by the sizing objective, from trees built and grafted for every ``k``
    (``tree_sizes[k - 1]``: drafted nodes of that tree), with costs interpolated by numpy."""
    import numpy as np

    sizes = sorted(costs)
    rates = []
    for k in range(1, len(values) + 1):
        n = tree_sizes[k - 1] + 1
        if n <= sizes[-1]:
            seconds = float(np.interp(n, sizes, [costs[s] for s in sizes]))
        else:  # beyond the last size, along the last segment
            a, b = sizes[-2], sizes[-1]
            seconds = costs[b] + (costs[b] - costs[a]) * (n - b) / (b - a)
        rates.append((1 + scale * sum(values[:k])) / (seconds + draft_seconds))
    return 1 + max(range(len(rates)), key=lambda i: (rates[i], -i))


@pytest.mark.parametrize("seed", range(8))
def test_tree_sizer_picks_the_best_rate_over_every_grafted_tree(seed):
    import copy
    import random

    from pertoken.speculative.draft_tree import (TreeSizer, chosen_tree, graft_chain,
                                                 ranked_candidates)
    from pertoken.speculative.generate import _chain_ranks

    rng = random.Random(seed)
    drafted, order, values = ranked_candidates(99, _draft_fn(seed, []), 12, width=3,
                                               max_depth=5, min_value=0.0)
    assert values == sorted(values, reverse=True) and len(order) == len(values) == 12
    # a chain that follows drafted nodes for a while, then leaves them (or hits an EOS)
    node, chain = 0, []
    for _ in range(rng.randrange(0, 5)):
        kids = drafted.children[node]
        if not kids or rng.random() < 0.3:
            break
        node = rng.choice(kids)
        chain.append(drafted.tokens[node])
    chain += [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 3))]
    eos = {chain[-1]} if chain and seed % 3 == 0 else set()
    grown = []
    for k in range(1, len(order) + 1):
        tree, origin = chosen_tree(drafted, sorted(order[:k]))
        graft_chain(tree, copy.deepcopy(drafted), origin, chain, tuple(eos))
        grown.append(len(tree) - 1)
    steps = sorted(rng.sample(range(1, 40), 5))
    costs = {n: 0.05 + 0.002 * n + rng.random() * 0.004 for n in steps}
    sizer = TreeSizer(costs)
    sizer.observe(predicted=3.0, accepted=rng.randrange(0, 8), draft_seconds=rng.random() / 100)
    ranks = _chain_ranks(drafted, order, chain, eos)
    want = _rate_reference(values, grown, sizer.target_costs, sizer.scale, sizer.draft_seconds)
    assert sizer.choose(values, ranks) == want


def test_tree_sizer_grows_with_cheap_passes_and_a_well_calibrated_draft():
    from pertoken.speculative.draft_tree import TreeSizer

    values = [0.9, 0.7, 0.5, 0.3, 0.2, 0.1]
    assert TreeSizer({1: 1.0, 64: 1.0}).choose(values) == 6  # flat costs: everything helps
    assert TreeSizer({1: 1.0, 2: 100.0}).choose(values) == 1  # a second token costs too much
    sizer = TreeSizer({1: 0.05, 2: 0.06, 16: 0.3})
    before = sizer.choose(values)
    sizer.observe(predicted=1.0, accepted=5, draft_seconds=0.0)  # accepts more than predicted
    assert sizer.scale == pytest.approx(9 / 5)
    assert sizer.choose(values) > before
    sizer.observe(predicted=20.0, accepted=0, draft_seconds=0.0)
    assert sizer.choose(values) < before
    with pytest.raises(ValueError):
        TreeSizer({})
    # measured costs that dip are fitted non-decreasing (pooled with their neighbours)
    assert TreeSizer({1: 1.0, 2: 3.0, 4: 2.0, 8: 5.0}).target_costs == {1: 1.0, 2: 2.5, 4: 2.5,
                                                                         8: 5.0}
