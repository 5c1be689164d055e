"""Sequoia's static tree: best-first expansion against an exhaustive search over shapes."""

import pytest
import torch

from pertoken.speculative.draft_tree import expected_accepted, static_shape, static_tree
from pertoken.speculative.verify import DraftTree


def _ordered_trees(n):
    """All ordered rooted trees with n non-root nodes, as parents lists (slow reference)."""
    if n == 0:
        yield [-1]
        return
    for tree in _ordered_trees(n - 1):
        for parent in range(len(tree)):
            yield tree + [parent]


def _value(acceptance, parents):
    """Expected accepted length by direct path products (independent of the code under test)."""
    total = 0.0
    for node in range(1, len(parents)):
        prob, child = 1.0, node
        while child != 0:
            siblings = [i for i in range(1, len(parents)) if parents[i] == parents[child]]
            rank = siblings.index(child)
            prob *= acceptance[rank] if rank < len(acceptance) else 0.0
            child = parents[child]
        total += prob
    return total


@pytest.mark.parametrize("acceptance", [(0.6, 0.2, 0.1), (0.3, 0.25, 0.2, 0.1), (0.9, 0.05)])
@pytest.mark.parametrize("budget", [1, 2, 3, 5, 6])
def test_best_first_shape_is_optimal(acceptance, budget):
    best = max(_value(acceptance, t) for t in _ordered_trees(budget))
    shape = static_shape(acceptance, budget)
    assert len(shape) == budget + 1
    assert _value(acceptance, shape) == pytest.approx(best)
    assert expected_accepted(acceptance, shape) == pytest.approx(best)


def test_shape_is_layered_and_respects_max_depth():
    shape = static_shape((0.95, 0.01), 10, max_depth=3)
    depth = [0] * len(shape)
    for i in range(1, len(shape)):
        assert shape[i] < i
        depth[i] = depth[shape[i]] + 1
    assert max(depth) == 3 and depth == sorted(depth)


def test_static_tree_fills_the_shape_with_distinct_siblings():
    probs = torch.softmax(torch.randn(5, 5, generator=torch.Generator().manual_seed(0),
                                      dtype=torch.float64), -1)
    shape = static_shape((0.5, 0.3, 0.1), 7)
    calls = []

    def draft_fn(tree, nodes):
        calls.append(len(nodes))
        return probs[[tree.tokens[n] for n in nodes]]

    tree = static_tree(0, draft_fn, shape, generator=torch.Generator().manual_seed(1))
    assert tree.parents == shape
    depth = [0] * len(shape)
    for i in range(1, len(shape)):
        depth[i] = depth[shape[i]] + 1
    assert len(calls) == max(depth)  # one draft call per layer that has children
    for kids in tree.children:
        assert len({tree.tokens[c] for c in kids}) == len(kids)
    # EOS nodes are not expanded
    eos_tree = static_tree(0, draft_fn, shape, eos_ids=tuple(range(5)),
                           generator=torch.Generator().manual_seed(1))
    assert isinstance(eos_tree, DraftTree) and all(p == 0 for p in eos_tree.parents[1:])
