"""Selection rules of sparse autoencoders: which (token, feature) pairs of a batch's
pre-activations ``z`` (tokens x features) keep their value (spec §1.2).

- ``topk``: each token keeps its ``k`` largest pre-activations (Gao et al.).
- ``batchtopk`` / ``mutual-choice``: the ``k * B`` largest entries of the whole batch are kept,
  one budget shared by all tokens (BatchTopK; Mutual Choice).
- ``feature-choice``: feature ``j`` keeps its ``m_j`` largest tokens, with ``sum m_j = k * B``
  (uniform ``m = kB/F`` or Zipf-shaped capacities, :func:`zipf_capacities`).

Every rule selects exactly its budget of entries from ``z`` (before the ReLU, which then zeroes
the negative picks) and breaks ties deterministically: among equal values the lower index wins
(row-major index for the batch-wide rule). Selection runs in float32 (bf16 ties would make the
count drift, spec pitfall 4). Written by hand: torch's ``topk`` does not define tie order, and
no library offers a per-column top-k with per-column counts.
"""

from __future__ import annotations

import torch


def _fill_ties(values: torch.Tensor, threshold: torch.Tensor, want: torch.Tensor,
               dim: int) -> torch.Tensor:
    """Mask of entries above ``threshold`` plus, among those equal to it, the first
    ``want - (number above)`` along ``dim`` (thresholds and counts broadcast along ``dim``)."""
    above = values > threshold
    equal = values == threshold
    room = want - torch.count_nonzero(above, dim=dim).unsqueeze(dim)
    if bool((torch.count_nonzero(equal, dim=dim).unsqueeze(dim) <= room).all()):
        return above | equal  # every tie fits (the usual case in float32): no running count
    return above | (equal & (equal.cumsum(dim) <= room))


def topk_mask(z: torch.Tensor, k: int) -> torch.Tensor:
    """Each row keeps its ``k`` largest entries."""
    z = z.float()
    k = min(k, z.shape[1])
    if k <= 0:
        return torch.zeros_like(z, dtype=torch.bool)
    kth = torch.topk(z, k, dim=1).values[:, -1:]
    return _fill_ties(z, kth, torch.tensor(k), dim=1)


def topk_entries(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_mask(z, k).nonzero(as_tuple=True)`` (rows and columns in row-major order) from
    one ``topk`` call, without the dense mask, unless some row has a tie at its boundary."""
    n, f = z.shape
    k = min(k, f)
    if 0 < k < f:
        values, index = torch.topk(z.float(), k + 1, dim=1)
        if not bool((values[:, k - 1] == values[:, k]).any()):  # each row's k are unambiguous
            cols = index[:, :k].sort(dim=1).values.reshape(-1)
            return torch.arange(n).repeat_interleave(k), cols
    return topk_mask(z, k).nonzero(as_tuple=True)


def batch_topk_mask(z: torch.Tensor, k: int) -> torch.Tensor:
    """Mutual Choice / BatchTopK: the ``k * B`` largest entries of the batch (``B = z.shape[0]``)."""
    z = z.float()
    budget = min(k * z.shape[0], z.numel())
    if budget <= 0:
        return torch.zeros_like(z, dtype=torch.bool)
    flat = z.reshape(-1)
    kth = torch.topk(flat, budget).values[-1]
    return _fill_ties(flat, kth, torch.tensor(budget), dim=0).view_as(z)


def feature_choice_mask(z: torch.Tensor, capacities: torch.Tensor | int) -> torch.Tensor:
    """Feature Choice: column ``j`` keeps its ``capacities[j]`` largest entries (an int: the
    same for every column; each capacity is clamped to the number of tokens)."""
    z = z.float()
    n, f = z.shape
    caps = torch.as_tensor(capacities, dtype=torch.long).expand(f).clamp(0, n)
    top = int(caps.max()) if f else 0
    if top == 0:
        return torch.zeros_like(z, dtype=torch.bool)
    values = torch.topk(z, top, dim=0).values  # (top, F), descending per column
    kth = values.gather(0, (caps - 1).clamp(min=0)[None])  # (1, F)
    mask = _fill_ties(z, kth, caps[None], dim=0)
    return mask & (caps > 0)[None]


def uniform_capacities(features: int, tokens: int, k: int) -> torch.Tensor:
    """``m_j`` summing to ``k * tokens``: ``floor(kB / F)`` each, the remainder spread one
    apiece over the first features."""
    budget = k * tokens
    caps = torch.full((features,), budget // features, dtype=torch.long)
    caps[: budget % features] += 1
    return caps


def zipf_capacities(ranks: torch.Tensor, tokens: int, k: int, alpha: float,
                    beta: float) -> torch.Tensor:
    """Zipf-shaped Feature Choice capacities (spec §1.2, a project reconstruction):
    ``m_j`` proportional to ``(r_j + beta) ** -alpha`` with ``r_j = rank_j + 1`` (``ranks``
    count from 0 for the densest feature; Zipf ranks from 1),
    rounded so that they sum to ``k * tokens`` and clamped to ``tokens`` (the clamped surplus
    goes to the next features by weight)."""
    ranks = torch.as_tensor(ranks, dtype=torch.float64)
    f = ranks.numel()
    budget = min(k * tokens, f * tokens)
    weight = (ranks + 1 + beta).pow(-alpha)
    caps = torch.zeros(f, dtype=torch.long)
    free = torch.ones(f, dtype=torch.bool)
    left = budget
    while left > 0 and free.any():
        share = torch.where(free, weight, torch.zeros_like(weight))
        ideal = share / share.sum() * left
        want = caps.double() + ideal
        full = free & (want >= tokens)
        if full.any():  # saturate these and hand the rest to the others
            left -= int((tokens - caps[full]).sum())
            caps[full] = tokens
            free &= ~full
            continue
        floor = ideal.floor().long()
        caps += floor
        left -= int(floor.sum())
        if left > 0:  # largest remainders first (ties: lower index)
            remainder = torch.where(free, ideal - floor.double(), torch.full_like(ideal, -1.0))
            order = torch.sort(-remainder, stable=True).indices[:left]
            caps[order] += 1
            left = 0
    return caps


def select(z: torch.Tensor, rule: str, k: int,
           capacities: torch.Tensor | None = None) -> torch.Tensor:
    """The mask of ``rule`` (``topk``, ``batchtopk``/``mutual-choice``, ``feature-choice``)."""
    if rule == "topk":
        return topk_mask(z, k)
    if rule in ("batchtopk", "mutual-choice"):
        return batch_topk_mask(z, k)
    if rule == "feature-choice":
        if capacities is None:
            capacities = uniform_capacities(z.shape[1], z.shape[0], k)
        return feature_choice_mask(z, capacities)
    raise ValueError(f"unknown selection rule {rule!r}")
