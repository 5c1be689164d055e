"""Grow a draft tree from the draft's own probabilities (DySpec §4, spec §1.1–1.2).

Every node's children are drawn *without replacement* from its draft distribution, using one
exponential race (Gumbel-top-k) per node and consuming that order. Whether to draw again is
decided from slot values known before the draw (never from the drawn token), which keeps the
verification exact:

- a child drawn from node ``i`` (value ``v_i``, current draft ``d_i``) gets value ``v_i d_i[y]``
  (its draft path probability), and ``v_i`` becomes ``v_i (1 - d_i[y])``;
- the threshold variant (Alg. 2) keeps drawing at every frontier node while ``v_i > threshold``,
  layer by layer, with one batched draft call per layer;
- the heap variant (Alg. 1) always expands the pending slot of highest value;
  :func:`layered_heap_tree` builds the same tree with one draft call per layer.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import torch

from pertoken.speculative.verify import DraftTree, sample_index


def race_order(probs: torch.Tensor, generator: torch.Generator | None = None,
               limit: int | None = None, deterministic: bool = False) -> list[int]:
    """A without-replacement sampling order of the tokens with positive probability.

    Sorting ``p / E`` descending, with ``E`` independent standard exponentials (an exponential
    race, i.e. Gumbel-top-k), has the law of drawing one token at a time from the renormalised
    remainder. Only the first ``limit`` tokens of the order are returned (a partial sort: their
    law is the same). ``deterministic=True`` orders by probability instead, for greedy
    decoding, whose exactness does not depend on the drafts. The exponentials are drawn for
    the support only (an EAGLE head's 8,192 tokens of the target's 49,152: 0.2 ms instead of
    0.8 on a 2-core CPU).
    """
    support = torch.nonzero(probs).squeeze(1)
    k = support.numel() if limit is None else min(limit, support.numel())
    if k == 0:
        return []
    if deterministic:
        return torch.topk(probs, k).indices.tolist()
    race = torch.empty(support.numel(), dtype=probs.dtype,
                       device=probs.device).exponential_(generator=generator)
    return support[torch.topk(probs[support] / race, k).indices].tolist()


class Calibration:
    """An online map from a drafted token's share (its probability under the renormalised
    draft it was drawn from) to the chance that verification accepts it, given that its parent
    was reached and its earlier siblings were rejected (spec §1.5, project policy; DySpec's
    Hypothesis 1 uses the share itself, and small drafts are over-confident).

    Shares fall in ``bins`` equal bins; each bin's rate starts at its centre with ``prior``
    pseudo-observations, and the table is the weighted isotonic (non-decreasing) fit of the
    rates, by pool-adjacent-violators (hand-written: ten bins). Only finished steps feed it, so
    tree shapes depend on past steps and earlier draws only and verification stays exact.
    """

    def __init__(self, bins: int = 10, prior: float = 4.0) -> None:
        self.bins = bins
        centres = [(i + 0.5) / bins for i in range(bins)]
        self.tried = [prior] * bins
        self.hits = [c * prior for c in centres]
        self.table = centres

    def __call__(self, share: float) -> float:
        return self.table[min(int(share * self.bins), self.bins - 1)]

    def observe(self, tree: DraftTree, accepted: Sequence[int]) -> None:
        """Record the children verification examined along the accepted path."""
        path = [0, *accepted]
        for i, node in enumerate(path):
            taken = path[i + 1] if i + 1 < len(path) else None
            for child in tree.children[node]:
                if child in tree.shares:
                    b = min(int(tree.shares[child] * self.bins), self.bins - 1)
                    self.tried[b] += 1
                    self.hits[b] += child == taken
                if child == taken:
                    break
        self.table = _isotonic([h / t for h, t in zip(self.hits, self.tried)], self.tried)


def _isotonic(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return [m for m, _, c in blocks for _ in range(c)]


def _add_drawn(tree: DraftTree, node: int, token: int, left: float,
               calibration: Calibration | None) -> tuple[int, float, float]:
    """Add ``token``, drawn at ``node`` while ``left`` of the node's draft mass was undrawn.
    Returns the child, its acceptance estimate (its share of the renormalised draft, through
    ``calibration`` if given) and the draft mass left undrawn."""
    mass = float(tree.draft_probs[node][token])
    share = min(1.0, mass / left)
    child = tree.add(node, token)
    tree.shares[child] = share
    return child, share if calibration is None else calibration(share), left - mass


DraftFn = Callable[[DraftTree, Sequence[int]], torch.Tensor]
"""Given the tree and some of its nodes, the draft distributions after each node ``(k, V)``."""


def threshold_tree(root_token: int, draft_fn: DraftFn, threshold: float, budget: int,
                   max_depth: int = 32, eos_ids: Sequence[int] = (),
                   generator: torch.Generator | None = None,
                   deterministic: bool = False,
                   calibration: Calibration | None = None) -> DraftTree:
    """Alg. 2: grow layer by layer while slot values exceed ``threshold``, up to ``budget``
    drafted nodes (the root not counted). With ``calibration``, values use calibrated shares."""
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
            left = 1.0  # draft mass not drawn yet at this node
            for y in race_order(dist, generator, budget, deterministic):
                if value <= threshold or len(tree) - 1 >= budget or left <= 0:
                    break
                child, accept, left = _add_drawn(tree, node, y, left, calibration)
                values[child] = value * accept
                value *= 1 - accept
                if y not in eos_ids:
                    next_frontier.append(child)
        frontier = next_frontier
    _drop_unused_draft_probs(tree)
    return tree


def heap_tree(root_token: int, draft_fn: DraftFn, budget: int, eos_ids: Sequence[int] = (),
              generator: torch.Generator | None = None,
              deterministic: bool = False,
              calibration: Calibration | None = None) -> DraftTree:
    """Alg. 1: always draw from the pending slot of highest value, up to ``budget`` nodes
    (values from calibrated shares when ``calibration`` is given).

    A node's draft distribution is computed (one draft call) when its first slot is drawn.
    """
    tree = DraftTree.root(root_token)
    orders: dict[int, list[int]] = {}
    left: dict[int, float] = {}  # draft mass not drawn yet, per node
    heap = [(-1.0, 0, 0)]  # (-value, tie-break counter, node)
    counter = 1
    while heap and len(tree) - 1 < budget:
        neg_value, _, node = heapq.heappop(heap)
        value = -neg_value
        if node not in orders:
            dist = draft_fn(tree, [node])[0]
            tree.draft_probs[node] = dist
            orders[node] = race_order(dist, generator, budget, deterministic)
            left[node] = 1.0
        if not orders[node]:
            continue
        y = orders[node].pop(0)
        child, accept, left[node] = _add_drawn(tree, node, y, left[node], calibration)
        if orders[node] and left[node] > 0:
            heapq.heappush(heap, (-(value * (1 - accept)), counter, node))
            counter += 1
        if y not in eos_ids:
            heapq.heappush(heap, (-(value * accept), counter, child))
            counter += 1
    _drop_unused_draft_probs(tree)
    return tree


def _keep_best(best: list[float], value: float, budget: int) -> None:
    """Add ``value`` to ``best``, the min-heap of the ``budget`` best values so far."""
    if len(best) >= budget:
        heapq.heapreplace(best, value)
    else:
        heapq.heappush(best, value)


def chosen_tree(drafted: DraftTree, chosen: Sequence[int]) -> tuple[DraftTree, list[int]]:
    """The tree of the ``chosen`` nodes of ``drafted`` (increasing indices, closed under
    parents, so parents come first) and each node's index in ``drafted``. Shares, and the draft
    distributions of nodes that keep children, come along where ``drafted`` has them."""
    tree = DraftTree.root(drafted.tokens[0])
    origin = [0]
    index = {0: 0}
    for i in chosen:
        index[i] = tree.add(index[drafted.parents[i]], drafted.tokens[i])
        if i in drafted.shares:
            tree.shares[index[i]] = drafted.shares[i]
        origin.append(i)
    for i, j in index.items():
        if tree.children[j] and i in drafted.draft_probs:
            tree.draft_probs[j] = drafted.draft_probs[i]
    return tree, origin


def ranked_candidates(root_token: int, draft_fn: DraftFn, budget: int,
                      eos_ids: Sequence[int] = (), width: int = 8, max_depth: int = 16,
                      min_value: float = 0.1) -> tuple[DraftTree, list[int], list[float]]:
    """The candidates of :func:`ranked_tree`: ``(drafted, order, values)``, the tree the draft
    was fed, the ``budget`` best of its nodes by draft path probability (most probable first;
    any first ``k`` of them form a connected tree, as a node never outranks its parent), and
    their path probabilities."""
    drafted = DraftTree.root(root_token)
    value = [1.0]
    frontier = [0]
    best: list[float] = []  # the values of the budget best candidates, a min-heap
    for _ in range(max_depth):
        frontier = [c for c in frontier if value[c] >= min_value]
        if not frontier:
            break
        probs = draft_fn(drafted, frontier)
        top = torch.topk(probs, min(width, budget, probs.shape[-1]), dim=-1)
        new = sorted(((value[node] * p, node, y)
                      for node, ps, ys in zip(frontier, top.values.tolist(), top.indices.tolist())
                      for p, y in zip(ps, ys) if p > 0), key=lambda c: -c[0])
        added = []
        for v, node, y in new:
            if len(best) >= budget and v <= best[0]:
                break  # sorted: no later candidate enters either
            _keep_best(best, v, budget)
            child = drafted.add(node, y)
            value.append(v)
            if y not in eos_ids:
                added.append(child)
        # a node displaced from the best ``budget`` since it was added has no child that enters
        frontier = [c for c in added if len(best) < budget or value[c] > best[0]]
    # a stable sort: a child whose token has probability 1 stays after its parent
    order = sorted(range(1, len(drafted)), key=lambda i: -value[i])[:budget]
    return drafted, order, [value[i] for i in order]


def ranked_tree(root_token: int, draft_fn: DraftFn, budget: int, eos_ids: Sequence[int] = (),
                width: int = 8, max_depth: int = 16,
                min_value: float = 0.1) -> tuple[DraftTree, DraftTree, list[int]]:
    """The greedy (temperature 0) DySpec tree: the ``budget`` drafted paths of highest draft
    path probability (spec §2: at T=0 the drafts may be deterministic, best-first top-k by path
    probability, as EAGLE-2 builds its trees).

    Grown layer by layer with one draft call per layer: every node of the newest layer that is
    still among the ``budget`` best so far is expanded into its ``width`` most likely tokens, and
    a candidate is kept only while its path probability beats the ``budget``-th best (paths only
    lose probability as they grow, so nothing drafted later displaces it back). The best
    ``budget`` candidates then form the tree (a connected one: a node never outranks its
    parent); that is the best-first (heap) tree with exact sibling values, among the top
    ``width`` tokens of each node, built in ``depth`` draft calls instead of one per node.
    Unlike the threshold tree it ranks nodes across layers, so a confident deep path can win
    over an unlikely sibling; it re-ranks drafts after seeing them, which is exact only because
    greedy verification does not depend on how the drafts were made.

    A node whose path probability is below ``min_value`` is not expanded: a draft call for
    children that unlikely costs more than it brings. With the SmolLM2 EAGLE head at budgets 8
    and 16, 0.1 cut the drafting time per step by a third (20 to 13 ms) and left tokens per
    call as they were or higher (its deep probabilities are over-confident); 0.25 lost tokens.

    Returns ``(tree, drafted, origin)``: the tree to verify, the candidate tree the draft was
    fed, and for each tree node its index in ``drafted``.
    """
    drafted, order, _ = ranked_candidates(root_token, draft_fn, budget, eos_ids, width,
                                          max_depth, min_value)
    tree, origin = chosen_tree(drafted, sorted(order))
    return tree, drafted, origin


def interpolate_cost(costs: dict[int, float], n: int) -> float:
    """Seconds of a pass over ``n`` tokens, linear between the measured sizes of ``costs``
    (``{tokens: seconds}``) and extended along the last segment beyond them."""
    sizes = sorted(costs)
    if n <= sizes[0] or len(sizes) == 1:
        return costs[sizes[0]]
    for lo, hi in zip(sizes, sizes[1:]):
        if n <= hi:
            return costs[lo] + (costs[hi] - costs[lo]) * (n - lo) / (hi - lo)
    lo, hi = sizes[-2], sizes[-1]
    return costs[hi] + (costs[hi] - costs[lo]) * (n - hi) / (hi - lo)


def monotone_costs(costs: dict[int, float]) -> dict[int, float]:
    """The non-decreasing least-squares fit of measured pass costs ``{tokens: seconds}``: a pass
    over more tokens never costs less, while measured medians still wobble by a few percent."""
    sizes = sorted(int(n) for n in costs)
    return dict(zip(sizes, _isotonic([float(costs[n]) for n in sizes], [1.0] * len(sizes))))


class TreeSizer:
    """The size of each greedy DySpec tree, chosen per step for the most expected tokens per
    second on this machine (project policy: DySpec fixes the budget and leaves hardware-aware
    sizing to future work; ``--budget auto``).

    Of the ranked candidates (most probable first) the tree keeps the first ``k`` that maximise

        (1 + scale * sum of their path probabilities) / (target(k + g + 1) + draft)

    where ``target(n)`` is the measured target pass over ``n`` tokens (the root included;
    the non-decreasing fit of the measured costs, interpolated),
    ``g`` the prompt-lookup tokens grafted besides them, and ``draft`` the mean drafting time of
    the finished steps. ``scale`` corrects the draft's confidence: it is learnt online as
    accepted candidates over predicted ones (both starting at ``prior``), from finished steps
    only. A confident step thus verifies a bigger tree than an uncertain one. Greedy output
    does not depend on the tree, so it stays exact. With the SmolLM2 EAGLE head, candidates of
    budget 16 and 2 threads, this ran 1.47x ``ar`` on wiki-en prompts (2.67 tokens per call,
    trees of 10.9 nodes on average) against 1.40x at the fixed budget 8, and 1.20x against
    1.17x on chat prompts.
    """

    def __init__(self, target_costs: dict[int, float], prior: float = 4.0) -> None:
        if not target_costs:
            raise ValueError("no target costs")
        self.target_costs = monotone_costs(target_costs)
        self.accepted = self.predicted = prior
        self.draft_seconds = 0.0
        self.steps = 0

    @property
    def scale(self) -> float:
        return self.accepted / self.predicted

    def choose(self, values: Sequence[float], chain_ranks: Sequence[int] = ()) -> int:
        """How many of the candidates (path probabilities ``values``, descending) to keep, at
        least one. ``chain_ranks[j]``: the rank among the candidates of the node holding the
        ``j``-th token of the grafted lookup chain (any number ``>= len(values)`` when it is not
        a candidate); the chain tokens outside the kept candidates cost a tree slot each."""
        best_k, best_rate, gain = 1, -1.0, 0.0
        prefix_max, reach = [], -1
        for r in chain_ranks:
            reach = max(reach, r)
            prefix_max.append(reach)
        for k, v in enumerate(values, 1):
            gain += v
            grafted = sum(1 for m in prefix_max if m >= k)
            rate = (1 + self.scale * gain) / self._seconds(k + grafted)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def _seconds(self, drafted: int) -> float:
        return interpolate_cost(self.target_costs, drafted + 1) + self.draft_seconds

    def observe(self, predicted: float, accepted: int, draft_seconds: float) -> None:
        """A finished step: the kept candidates' path probabilities summed, how many of them
        verification accepted, and the step's drafting time."""
        self.predicted += predicted
        self.accepted += accepted
        self.steps += 1
        self.draft_seconds += (draft_seconds - self.draft_seconds) / self.steps


def layered_heap_tree(root_token: int, draft_fn: DraftFn, budget: int,
                      eos_ids: Sequence[int] = (), generator: torch.Generator | None = None,
                      deterministic: bool = False, width: int = 8, max_depth: int = 16,
                      min_value: float = 0.1, calibration: Calibration | None = None
                      ) -> tuple[DraftTree, DraftTree, list[int]]:
    """DySpec's heap tree (Alg. 1), built layer by layer with one draft call per layer.

    Each slot ("draw one more child at node ``i``") has a value known before the draw: ``v_i``,
    which every drawn child lowers by its share (the module docstring). The heap construction
    takes the ``budget`` slots of highest value. Slot values only fall along the tree (a
    child's slots are worth at most its parent's slot, a node's next slot at most its last), so
    drafting layer by layer and keeping every slot that still beats the ``budget``-th best seen
    so far, then taking the best ``budget``, gives the same tree as the heap for the same
    draws: a slot's rank depends only on slots that do not depend on its own draw, which is
    what keeps sampled verification exact. The difference from :func:`threshold_tree`: slots
    compete across nodes and layers, so a confident deep path wins over an unlikely sibling,
    and the budget is spent where the heap would spend it, in ``depth`` draft calls instead of
    one per expanded node. ``width`` bounds the children drawn at a node, and a node whose
    value is below ``min_value`` is not expanded (as in :func:`ranked_tree`).

    Returns ``(tree, drafted, origin)`` as :func:`ranked_tree` does: the tree to verify, the
    tree the draft was fed, and each tree node's index in ``drafted``.
    """
    drafted = DraftTree.root(root_token)
    slot = [float("inf")]  # the value of the slot each node was drawn in
    value = [1.0]  # each node's own value: its first slot's
    best: list[float] = []  # the values of the budget best slots, a min-heap
    frontier = [0]
    for _ in range(max_depth):
        frontier = [c for c in frontier if value[c] >= min_value
                    and (len(best) < budget or value[c] > best[0])]
        if not frontier:
            break
        probs = draft_fn(drafted, frontier)
        added = []
        for node, dist in zip(frontier, probs):
            drafted.draft_probs[node] = dist
            v, left = value[node], 1.0
            for y in race_order(dist, generator, min(width, budget), deterministic):
                if left <= 0 or (len(best) >= budget and v <= best[0]):
                    break  # this slot and the node's later ones cannot make the budget
                child, accept, left = _add_drawn(drafted, node, y, left, calibration)
                slot.append(v)
                value.append(v * accept)
                _keep_best(best, v, budget)
                v *= 1 - accept
                if y not in eos_ids:
                    added.append(child)
        frontier = added
    # increasing indices keep earlier siblings first, in the order they were drawn
    chosen = sorted(sorted(range(1, len(drafted)), key=lambda i: -slot[i])[:budget])
    tree, origin = chosen_tree(drafted, chosen)
    return tree, drafted, origin


def lookup_chain(context: Sequence[int], length: int, ngram: int = 3) -> list[int]:
    """Prompt-lookup drafts: up to ``length`` tokens that followed an earlier occurrence of the
    last ``ngram`` (down to 1) tokens of ``context`` (transformers' prompt lookup decoding,
    ``PromptLookupCandidateGenerator``, which takes the leftmost match). Free to draft, and
    right where a continuation repeats its prompt or itself."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    if length < 1 or len(context) < 2:
        return []
    finder = PromptLookupCandidateGenerator(num_output_tokens=length, max_matching_ngram_size=ngram,
                                            max_length=len(context) + length + 1)
    ids = torch.tensor([list(context)], dtype=torch.long)
    out, _ = finder.get_candidates(ids)
    return out[0, len(context):].tolist()


def graft_chain(tree: DraftTree, drafted: DraftTree, origin: list[int], chain: Sequence[int],
                eos_ids: Sequence[int] = ()) -> int:
    """Add the path ``chain`` below the root of ``tree`` (and of ``drafted``, ``origin``
    mapping the one to the other as :func:`ranked_tree` returns them), reusing the nodes that
    already hold its first tokens; nothing is grafted below an EOS. Returns the nodes added."""
    node, added = 0, 0
    for y in chain:
        child = next((c for c in tree.children[node] if tree.tokens[c] == y), None)
        if child is None:
            origin.append(drafted.add(origin[node], y))
            child = tree.add(node, y)
            added += 1
        node = child
        if y in eos_ids:
            break
    return added


def chain_tree(root_token: int, draft_fn: DraftFn, length: int, eos_ids: Sequence[int] = (),
               generator: torch.Generator | None = None,
               deterministic: bool = False) -> DraftTree:
    """Classic speculative sampling: ``length`` tokens drawn one after another from the draft
    (a tree with one child per node)."""
    tree = DraftTree.root(root_token)
    node = 0
    for _ in range(length):
        dist = draft_fn(tree, [node])[0]
        tree.draft_probs[node] = dist
        if deterministic:
            y = int(dist.argmax())
        else:
            y = sample_index(dist, generator)
        node = tree.add(node, y)
        if y in eos_ids:
            break
    return tree


def static_shape(acceptance: Sequence[float], budget: int, max_depth: int = 16) -> list[int]:
    """Sequoia's tree for ``budget`` drafted nodes: the parents list (node 0 the root).

    ``acceptance[r]`` is the measured probability that the draft's ``r``-th sample (without
    replacement) at a node is the one the target accepts. A node reached through child ranks
    ``r1..rd`` is used with probability ``prod acceptance[ri]`` (Sequoia's model), and the
    expected accepted length is the sum of that score over the tree. Because a child never
    scores above its parent, nor a later sibling above an earlier one once ``acceptance`` is
    sorted, the ``budget`` best-scoring positions form a connected tree and best-first
    expansion finds the maximum that Sequoia's dynamic programme computes (without the depth
    bound below ``max_depth``). Children are listed in rank order and nodes layer by layer.
    """
    acc = sorted((float(a) for a in acceptance if a > 0), reverse=True)
    if not acc:
        raise ValueError("the acceptance vector has no positive entry")
    # pending slots: (-score, counter, parent slot id, rank); slot 0 is the root
    heap = [(-acc[0], 1, 0, 0)]
    chosen: list[tuple[int, int, int]] = []  # (slot id, parent slot id, rank)
    depth = {0: 0}
    counter = 2
    while heap and len(chosen) < budget:
        neg, slot, parent, rank = heapq.heappop(heap)
        chosen.append((slot, parent, rank))
        depth[slot] = depth[parent] + 1
        if rank + 1 < len(acc):  # the next sibling
            heapq.heappush(heap, (neg / acc[rank] * acc[rank + 1], counter, parent, rank + 1))
            counter += 1
        if depth[slot] < max_depth:  # the first child
            heapq.heappush(heap, (neg * acc[0], counter, slot, 0))
            counter += 1
    chosen.sort(key=lambda c: (depth[c[0]], c[1], c[2]))
    index = {0: 0}
    parents = [-1]
    for slot, parent, _ in chosen:
        index[slot] = len(parents)
        parents.append(index[parent])
    return parents


def expected_accepted(acceptance: Sequence[float], parents: Sequence[int]) -> float:
    """Sequoia's expected number of accepted drafted tokens for a tree shape."""
    acc = sorted((float(a) for a in acceptance), reverse=True)
    score = [1.0] * len(parents)
    rank = [0] * len(parents)
    seen: dict[int, int] = {}
    for i in range(1, len(parents)):
        rank[i] = seen.get(parents[i], 0)
        seen[parents[i]] = rank[i] + 1
        score[i] = score[parents[i]] * (acc[rank[i]] if rank[i] < len(acc) else 0.0)
    return sum(score[1:])


def static_tree(root_token: int, draft_fn: DraftFn, shape: Sequence[int],
                eos_ids: Sequence[int] = (), generator: torch.Generator | None = None,
                deterministic: bool = False) -> DraftTree:
    """Fill a fixed tree ``shape`` (a parents list from :func:`static_shape`) with draft
    tokens, layer by layer: each node's children are its draft's first samples drawn without
    replacement. One draft call per layer. Nodes under an EOS are left out."""
    want: dict[int, int] = {}
    for parent in shape[1:]:
        want[parent] = want.get(parent, 0) + 1
    tree = DraftTree.root(root_token)
    frontier = [(0, 0)]  # (shape node, tree node)
    while frontier:
        expand = [(s, t) for s, t in frontier if want.get(s)]
        if not expand:
            break
        probs = draft_fn(tree, [t for _, t in expand])
        kids = {s: [i for i in range(1, len(shape)) if shape[i] == s] for s, _ in expand}
        frontier = []
        for (s, t), dist in zip(expand, probs):
            tree.draft_probs[t] = dist
            for shape_child, y in zip(kids[s], race_order(dist, generator, want[s],
                                                          deterministic)):
                child = tree.add(t, y)
                if y not in eos_ids:
                    frontier.append((shape_child, child))
    _drop_unused_draft_probs(tree)
    return tree


def _drop_unused_draft_probs(tree: DraftTree) -> None:
    for node in [n for n in tree.draft_probs if not tree.children[n]]:
        del tree.draft_probs[node]
