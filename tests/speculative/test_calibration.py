import random

import pytest
import torch

from pertoken.speculative.draft_tree import Calibration, _isotonic, threshold_tree
from pertoken.speculative.tree import depths
from pertoken.speculative.verify import DraftTree


def _isotonic_reference(values, weights):
    """The min-max formula: fit[i] = max over j <= i of min over k >= i of mean(j..k)."""
    n = len(values)

    def mean(j, k):
        w = sum(weights[j:k + 1])
        return sum(v * x for v, x in zip(values[j:k + 1], weights[j:k + 1])) / w

    return [max(min(mean(j, k) for k in range(i, n)) for j in range(i + 1)) for i in range(n)]


def test_isotonic_fit_matches_the_min_max_formula():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        values = [rng.random() for _ in range(n)]
        weights = [rng.uniform(0.1, 5) for _ in range(n)]
        assert _isotonic(values, weights) == pytest.approx(_isotonic_reference(values, weights))


def test_calibration_counts_the_children_verification_examined():
    tree = DraftTree.root(0)
    a = tree.add(0, 5)   # share 0.72, rejected
    b = tree.add(0, 6)   # share 0.35, accepted
    tree.add(0, 7)       # share 0.95, never examined (after the accepted sibling)
    c = tree.add(b, 8)   # share 0.05, rejected at the last node
    tree.shares.update({a: 0.72, b: 0.35, 3: 0.95, c: 0.05})
    cal = Calibration(bins=10, prior=0.0 + 1e-9)
    cal.observe(tree, [b])
    tried = [round(t) for t in cal.tried]
    hits = [round(h) for h in cal.hits]
    assert tried == [1, 0, 0, 1, 0, 0, 0, 1, 0, 0]
    assert hits == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert all(x <= y for x, y in zip(cal.table, cal.table[1:]))


def test_an_untrained_calibration_is_the_identity_on_bin_centres():
    cal = Calibration(bins=4)
    assert [cal(s) for s in (0.1, 0.3, 0.6, 0.99, 1.0)] == [0.125, 0.375, 0.625, 0.875, 0.875]


def test_a_pessimistic_calibration_grows_wider_shallower_trees():
    torch.manual_seed(0)
    dist = torch.softmax(torch.randn(12) * 2, -1)

    def draft_fn(tree, nodes):
        return torch.stack([dist for _ in nodes])

    plain = threshold_tree(0, draft_fn, threshold=0.05, budget=500, deterministic=True)
    cal = Calibration(bins=10)
    cal.table = [x / 3 for x in cal.table]
    low = threshold_tree(0, draft_fn, threshold=0.05, budget=500, deterministic=True,
                         calibration=cal)
    # lower acceptance leaves more value at the parent (siblings) and less down the path
    assert max(depths(low.parents)) < max(depths(plain.parents))
    assert len(low.children[0]) > len(plain.children[0])
    assert set(plain.shares) == set(range(1, len(plain)))
