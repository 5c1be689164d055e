"""Selection rules against slow references that sort (value desc, index asc) pairs."""

import pytest
import torch

from pertoken.sae.selection import (batch_topk_mask, feature_choice_mask, select, topk_entries,
                                    topk_mask, uniform_capacities, zipf_capacities)


def _first(pairs, n):
    """The ``n`` best of ``(value, index)`` pairs: larger value first, then lower index."""
    return {i for _, i in sorted(pairs, key=lambda p: (-p[0], p[1]))[:n]}


def _ref_topk(z, k):
    mask = torch.zeros_like(z, dtype=torch.bool)
    for r in range(z.shape[0]):
        for c in _first([(float(z[r, c]), c) for c in range(z.shape[1])], k):
            mask[r, c] = True
    return mask


def _ref_batch(z, k):
    f = z.shape[1]
    mask = torch.zeros(z.numel(), dtype=torch.bool)
    for i in _first([(float(v), i) for i, v in enumerate(z.reshape(-1))], k * z.shape[0]):
        mask[i] = True
    return mask.view(-1, f)


def _ref_feature(z, caps):
    mask = torch.zeros_like(z, dtype=torch.bool)
    for c in range(z.shape[1]):
        for r in _first([(float(z[r, c]), r) for r in range(z.shape[0])], int(caps[c])):
            mask[r, c] = True
    return mask


def _batches():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(7, 11, generator=g)
    # heavy ties: few distinct values, including at every boundary
    yield torch.randint(-2, 3, (9, 12), generator=g).float()
    yield torch.zeros(5, 6)
    yield torch.randint(0, 2, (16, 8), generator=g).float() * 0.5


@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_matches_the_reference_including_ties(k):
    for z in _batches():
        mask = topk_mask(z, k)
        assert torch.equal(mask, _ref_topk(z, k))
        assert (mask.sum(1) == min(k, z.shape[1])).all()


@pytest.mark.parametrize("k", [1, 3, 5, 12])
def test_topk_entries_are_the_reference_masks_nonzero_in_row_major_order(k):
    # random rows take the one-topk path, tied rows the mask; k = 12 is a whole row or more
    for z in _batches():
        rows, cols = topk_entries(z, k)
        want = _ref_topk(z, k).nonzero(as_tuple=True)
        assert torch.equal(rows, want[0]) and torch.equal(cols, want[1])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_mutual_choice_selects_exactly_k_times_b_like_the_reference(k):
    for z in _batches():
        mask = batch_topk_mask(z, k)
        assert torch.equal(mask, _ref_batch(z, k))
        assert int(mask.sum()) == k * z.shape[0]  # before the ReLU
        assert torch.equal(select(z, "mutual-choice", k), select(z, "batchtopk", k))


def test_feature_choice_matches_the_reference_and_respects_capacities():
    g = torch.Generator().manual_seed(1)
    for z in _batches():
        b, f = z.shape
        for caps in (uniform_capacities(f, b, 2),
                     torch.randint(0, b + 3, (f,), generator=g)):
            mask = feature_choice_mask(z, caps)
            assert torch.equal(mask, _ref_feature(z, caps.clamp(max=b)))
            assert (mask.sum(0) <= caps).all()
        assert torch.equal(select(z, "feature-choice", 2), feature_choice_mask(z, uniform_capacities(f, b, 2)))


def test_uniform_capacities_sum_to_the_budget():
    caps = uniform_capacities(10, 7, 3)
    assert int(caps.sum()) == 21 and int(caps.max()) - int(caps.min()) <= 1
    assert uniform_capacities(8, 8, 4).tolist() == [4] * 8  # B = F: m = k exactly


def test_zipf_capacities_sum_to_the_budget_decrease_with_rank_and_clamp():
    ranks = torch.randperm(50, generator=torch.Generator().manual_seed(2))
    caps = zipf_capacities(ranks, tokens=20, k=4, alpha=1.2, beta=1.0)
    assert int(caps.sum()) == 80 and int(caps.max()) <= 20
    by_rank = caps[torch.argsort(ranks)]
    assert (by_rank[:-1] >= by_rank[1:]).all()
    steep = zipf_capacities(torch.arange(10), tokens=5, k=3, alpha=4.0, beta=0.0)
    assert steep.tolist() == [5, 5, 3, 1, 1, 0, 0, 0, 0, 0]  # k * B = 15
    flat = zipf_capacities(torch.arange(8), tokens=8, k=4, alpha=0.0, beta=1.0)
    assert flat.tolist() == [4] * 8


@pytest.mark.parametrize("k", [1, 4, 9])
def test_our_selections_give_saelens_activations(k):
    """Spec §6.1: the same pre-activations through SAELens's TopK and BatchTopK activation
    modules and through our masks then ReLU give the same codes."""
    from sae_lens.saes.batchtopk_sae import BatchTopK
    from sae_lens.saes.topk_sae import TopK

    z = torch.randn(37, 50, generator=torch.Generator().manual_seed(k)) - 0.3
    assert torch.equal(TopK(k)(z), torch.relu(z) * topk_mask(z, k))
    assert torch.equal(BatchTopK(k)(z), torch.relu(z) * batch_topk_mask(z, k))
