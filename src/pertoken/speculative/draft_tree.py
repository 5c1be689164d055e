"""Grow a draft tree from the draft's own probabilities (DySpec §4, spec §1.1–1.2).

Every node's children are drawn *without replacement* from its draft distribution, using one
exponential race (Gumbel-top-k) per node and consuming that order. Whether to draw again is
decided from slot values known before the draw (never from the drawn token), which keeps the
verification exact:

- a child drawn from node ``i`` (value ``v_i``, current draft ``d_i``) gets value ``v_i d_i[y]``
  (its draft path probability), and ``v_i`` becomes ``v_i (1 - d_i[y])``;
- the threshold variant (Alg. 2) keeps drawing at every frontier node while ``v_i > threshold``,
  layer by layer, with one batched draft call per layer;
- the heap variant (Alg. 1) always expands the pending slot of highest value.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import torch

from pertoken.speculative.verify import DraftTree


def race_order(probs: torch.Tensor, generator: torch.Generator | None = None) -> list[int]:
    """A without-replacement sampling order of the tokens with positive probability.

    ``argsort(log(U) / p)`` descending (an exponential race) has the law of drawing one token at
    a time from the renormalised remainder.
    """
    support = torch.nonzero(probs > 0).flatten()
    u = torch.rand(support.numel(), generator=generator, dtype=torch.float64)
    keys = torch.log(u) / probs[support].double()
    return support[torch.argsort(keys, descending=True)].tolist()


DraftFn = Callable[[DraftTree, Sequence[int]], torch.Tensor]
"""Given the tree and some of its nodes, the draft distributions after each node ``(k, V)``."""


def threshold_tree(root_token: int, draft_fn: DraftFn, threshold: float, budget: int,
                   max_depth: int = 32, eos_ids: Sequence[int] = (),
                   generator: torch.Generator | None = None) -> DraftTree:
    """Alg. 2: grow layer by layer while slot values exceed ``threshold``, up to ``budget``
    drafted nodes (the root not counted)."""
    tree = DraftTree.root(root_token)
    frontier = [0]
    values = {0: 1.0}
    for _ in range(max_depth):
        if not frontier or len(tree) - 1 >= budget:
            break
        probs = draft_fn(tree, frontier)
        next_frontier = []
        for node, dist in zip(frontier, probs):
            tree.draft_probs[node] = dist
            value = values[node]
            current = dist.double()
            for y in race_order(dist, generator):
                if value <= threshold or len(tree) - 1 >= budget:
                    break
                share = float(current[y])
                child = tree.add(node, y)
                values[child] = value * share
                value *= 1 - share
                current = current.clone()
                current[y] = 0
                total = current.sum()
                if total <= 0:
                    break
                current /= total
                if y not in eos_ids:
                    next_frontier.append(child)
        frontier = next_frontier
    _drop_unused_draft_probs(tree)
    return tree


def heap_tree(root_token: int, draft_fn: DraftFn, budget: int, eos_ids: Sequence[int] = (),
              generator: torch.Generator | None = None) -> DraftTree:
    """Alg. 1: always draw from the pending slot of highest value, up to ``budget`` nodes.

    A node's draft distribution is computed (one draft call) when its first slot is drawn.
    """
    tree = DraftTree.root(root_token)
    orders: dict[int, list[int]] = {}
    current: dict[int, torch.Tensor] = {}
    heap = [(-1.0, 0, 0)]  # (-value, tie-break counter, node)
    counter = 1
    while heap and len(tree) - 1 < budget:
        neg_value, _, node = heapq.heappop(heap)
        value = -neg_value
        if node not in orders:
            dist = draft_fn(tree, [node])[0]
            tree.draft_probs[node] = dist
            orders[node] = race_order(dist, generator)
            current[node] = dist.double()
        if not orders[node]:
            continue
        y = orders[node].pop(0)
        share = float(current[node][y])
        child = tree.add(node, y)
        rest = current[node].clone()
        rest[y] = 0
        total = rest.sum()
        if total > 0:
            current[node] = rest / total
            heapq.heappush(heap, (-(value * (1 - share)), counter, node))
            counter += 1
        if y not in eos_ids:
            heapq.heappush(heap, (-(value * share), counter, child))
            counter += 1
    _drop_unused_draft_probs(tree)
    return tree


def chain_tree(root_token: int, draft_fn: DraftFn, length: int, eos_ids: Sequence[int] = (),
               generator: torch.Generator | None = None) -> DraftTree:
    """Classic speculative sampling: ``length`` tokens drawn one after another from the draft
    (a tree with one child per node)."""
    tree = DraftTree.root(root_token)
    node = 0
    for _ in range(length):
        dist = draft_fn(tree, [node])[0]
        tree.draft_probs[node] = dist
        y = int(torch.multinomial(dist.double(), 1, generator=generator))
        node = tree.add(node, y)
        if y in eos_ids:
            break
    return tree


def _drop_unused_draft_probs(tree: DraftTree) -> None:
    for node in [n for n in tree.draft_probs if not tree.children[n]]:
        del tree.draft_probs[node]
