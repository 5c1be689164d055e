"""The decoding loop: plain autoregressive decoding (``ar``, the reference), classic speculative
sampling (``chain``: ``budget`` tokens drafted one after another), Sequoia's static tree
(``tree``) and DySpec (``dyspec``: the heap construction's tree built with one draft call per
layer, at temperature 0 the most probable draft paths, and the threshold tree when given a
threshold, or greedy with a calibration; ``dyspec-heap``: the heap construction with one draft
call per expanded node), each verified in one target pass per step.

Caches follow spec §1.4: ``P`` committed tokens are cached; the root (the last committed
token) is not, and is query 0 of the next tree pass. After verification the target cache keeps
the prefix, the root and the accepted nodes; so does the draft cache, which sees each tree node
once while the tree grows and is then fed whatever of the accepted path it has not seen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from pertoken.errors import UserError
from pertoken.speculative.draft_tree import (Calibration, TreeSizer, chain_tree, chosen_tree,
                                             graft_chain, heap_tree, layered_heap_tree,
                                             lookup_chain, ranked_candidates,
                                             static_shape, static_tree, threshold_tree)
from pertoken.speculative.eagle import EagleHead, EagleRunner, FeatureCapture
from pertoken.speculative.methods import METHODS
from pertoken.speculative.tree import accepted_keep, compact_cache, tree_forward
from pertoken.speculative.verify import DraftTree, verify_greedy, verify_sampling



DEFAULT_ACCEPTANCE = (0.55, 0.15, 0.07, 0.04, 0.025, 0.015, 0.01, 0.01)
"""Acceptance by draft rank used for the ``tree`` method when none was measured."""


@dataclass
class StepStats:
    """One target call."""

    tree_size: int
    accepted: int
    draft_seconds: float
    target_seconds: float
    path: tuple[int, ...] = ()
    """the accepted tree nodes (indices into the step's tree, root excluded)"""


@dataclass
class GenerateOutput:
    tokens: list[int]
    """the new tokens"""
    steps: list[StepStats] = field(default_factory=list)

    @property
    def tokens_per_call(self) -> float:
        return len(self.tokens) / max(len(self.steps), 1)


def warp(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Target probabilities after temperature, top-k and top-p (rows of ``logits``), in
    float64; the softmax itself runs in float32, as transformers' sampling does (a float64
    softmax over 49k logits costs about 1 ms a row here)."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1).double()
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


class _WarpedRows:
    """Rows of :func:`warp` computed when verification first reads them (it reads the root
    and the accepted nodes, not the whole tree)."""

    def __init__(self, logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
        self.logits, self.args, self.rows = logits, (temperature, top_k, top_p), {}

    def __getitem__(self, node: int) -> torch.Tensor:
        if node not in self.rows:
            self.rows[node] = warp(self.logits[node], *self.args)
        return self.rows[node]


def check_settings(temperature: float, top_p: float, budget: int, lookup: int = 0,
                   draft_temperature: float | None = None) -> None:
    """Raise :class:`UserError` for settings no method accepts."""
    if draft_temperature is not None and not draft_temperature > 0:
        raise UserError(f"draft temperature must be > 0, got {draft_temperature}")
    if lookup < 0:
        raise UserError(f"lookup must be >= 0, got {lookup}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"top-p must be in (0, 1], got {top_p}")
    if budget < 1:
        raise UserError(f"budget must be at least 1, got {budget}")


def _check(temperature, top_p, budget, lookup, target, draft, draft_temperature=None):
    check_settings(temperature, top_p, budget, lookup, draft_temperature)
    if draft is not None and draft.config.vocab_size != target.config.vocab_size:
        raise UserError("the draft and the target have different vocabularies "
                        f"({draft.config.vocab_size} vs {target.config.vocab_size})")


@torch.inference_mode()
def _prefill(model, ids: list[int]) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    if ids:
        model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
    return cache


class _DraftRunner:
    """The draft side of one step: feeds each tree node to the draft once (one forward per
    call, covering the nodes added since the last call, with a mask over the draft cache of
    prefix and earlier nodes) and computes draft probabilities only for the nodes asked for
    (every fed node for the heap, which may expand any node later). ``commit`` keeps the
    accepted path in the draft cache, as for the target, and feeds the part of it the draft
    has not seen yet."""

    def __init__(self, model, cache, temperature: float, every_node: bool) -> None:
        self.model, self.cache, self.temperature = model, cache, temperature
        self.every_node = every_node
        self.prefix = self.fed = 0
        self.probs: dict[int, torch.Tensor] = {}

    def start(self, prefix: int) -> None:
        self.prefix, self.fed, self.probs = prefix, 0, {}

    def __call__(self, tree, nodes) -> torch.Tensor:
        n = len(tree)
        if self.fed < n:
            wanted = set(nodes)
            keep = [i for i in range(self.fed, n) if self.every_node or i in wanted]
            logits = tree_forward(self.model, self.cache, tree.tokens, tree.parents,
                                  start=self.fed, keep=keep)
            probs = torch.softmax(logits.float() / self.temperature, -1)
            self.probs.update(zip(keep, probs))
            self.fed = n
        return torch.stack([self.probs[i] for i in nodes])

    def commit(self, tree, path: list[int]) -> None:
        """``path``: the root and the accepted nodes (increasing indices)."""
        compact_cache(self.cache, accepted_keep(self.prefix, [i for i in path if i < self.fed]))
        rest = [tree.tokens[i] for i in path if i >= self.fed]
        if rest:
            self.model(input_ids=torch.tensor([rest]), cache=self.cache, use_cache=True)


@torch.inference_mode()
def generate(target, draft, input_ids: list[int], method: str = "dyspec", budget: int = 8,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             max_new_tokens: int = 64, eos_token_id: int | list[int] | None = None,
             draft_temperature: float | None = None, seed: int = 0, threshold: float | None = None,
             calibration: Calibration | bool = False,
             tree_shape: list[int] | None = None, on_tokens=None,
             lookup: int = 4, tree_costs: dict[int, float] | TreeSizer | None = None
             ) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` after ``input_ids`` with ``method``.

    ``draft`` is a causal LM with the target's vocabulary or an
    :class:`~pertoken.speculative.eagle.EagleHead` loaded for this target (it then reads the
    target's features, captured from each verification pass). Greedy when
    ``temperature == 0``; otherwise the output law is the target's after
    temperature, top-k and top-p. The DySpec tree holds at most ``budget`` drafted tokens and
    grows while a slot's value, its draft path probability, exceeds ``threshold`` (default
    ``1 / (budget + 1)``); greedy DySpec without a ``threshold`` or ``calibration`` keeps the
    ``budget`` most probable draft paths instead
    (:func:`~pertoken.speculative.draft_tree.ranked_tree`: 1.96 tokens per call against 1.75
    for the threshold tree on wiki-en prompts with the SmolLM2 EAGLE head), and sampling
    DySpec without a ``threshold`` builds the heap construction's tree layer by layer
    (:func:`~pertoken.speculative.draft_tree.layered_heap_tree`). With
    ``calibration`` (``True``, or a :class:`Calibration` to keep across calls) the drafts'
    shares are first mapped to acceptance rates learnt online from the verified steps (and
    greedy DySpec then grows the threshold tree, whose default threshold adapts after every
    step so that trees fill the budget); only past steps decide either, so the output law is
    unchanged (measured on SmolLM2: at T=1 more tokens per call than the raw shares, no faster;
    hence off by default). The ``tree``
    method fills the fixed ``tree_shape`` (a parents list, see
    :func:`~pertoken.speculative.draft_tree.static_shape`; by default the shape for
    :data:`DEFAULT_ACCEPTANCE`). At temperature 0 the drafts are the draft's most likely tokens
    rather than samples (greedy exactness does not depend on them). ``draft_temperature``
    sharpens or flattens the draft's probabilities before they shape the tree and the drafts;
    by default 1.0 for an EAGLE head and 0.6 for a draft LM, the values that gave the most
    tokens per call on SmolLM2 (an EAGLE head at 0.6 grew deep, narrow trees and lost
    0.1 tokens/call on chat prompts). ``on_tokens``, if given, is called with the list of
    tokens each step emits (for streaming). Greedy DySpec also grafts up to ``lookup``
    prompt-lookup tokens (:func:`~pertoken.speculative.draft_tree.lookup_chain`: what followed
    an earlier occurrence of the context's last tokens) into each tree, out of its budget: on
    SmolLM2 with the EAGLE head, 2.15 tokens per call instead of 1.98 on wiki-en prompts at
    budget 8 and 1.77 instead of 1.73 on chat prompts. With ``tree_costs`` (the target's
    seconds per tree pass by tokens in it, or a
    :class:`~pertoken.speculative.draft_tree.TreeSizer` to keep across calls) greedy DySpec
    keeps, of its ranked drafts, the count with the most expected tokens per second, up to
    ``budget`` nodes (sampling and the other methods ignore it: at T=1 a stopping rule on the
    heap's slot values, exact but over-estimating what the last slots bring, grew trees of 12
    nodes and ran 1.02x ``ar`` against 1.08x at the fixed budget 8 on SmolLM2).
    """
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    _check(temperature, top_p, budget, lookup, target, draft if method != "ar" else None,
           draft_temperature)
    if not input_ids:
        raise UserError("the prompt is empty")
    if method == "tree":
        tree_shape = list(tree_shape or static_shape(DEFAULT_ACCEPTANCE, budget))
        if len(tree_shape) - 1 > budget:
            raise UserError(f"the tree shape has {len(tree_shape) - 1} nodes, over the budget {budget}")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    greedy = temperature == 0
    prefix = list(input_ids[:-1])
    root = input_ids[-1]
    eagle = method != "ar" and isinstance(draft, EagleHead)
    if draft_temperature is None:
        draft_temperature = 1.0 if eagle else 0.6
    capture = FeatureCapture(target, draft.feature_layers) if eagle else None
    try:
        target_cache = _prefill(target, prefix)
        if method == "ar":
            runner = None
        elif eagle:
            runner = EagleRunner(draft, draft_temperature, every_node=method == "dyspec-heap")
            runner.prefill(prefix, capture.value[0] if prefix else None)
        else:
            runner = _DraftRunner(draft, _prefill(draft, prefix), draft_temperature,
                                  every_node=method == "dyspec-heap")
        return _loop(target, target_cache, runner, capture, method, root, budget, temperature, top_k, top_p,
                     max_new_tokens, eos, greedy, seed, threshold, calibration, tree_shape,
                     on_tokens, list(input_ids), lookup, tree_costs)
    finally:
        if capture is not None:
            capture.close()


def _loop(target, target_cache, runner, capture, method, root, budget, temperature, top_k, top_p,
          max_new_tokens, eos, greedy, seed, threshold, calibration, tree_shape, on_tokens,
          context, lookup, tree_costs):
    verify_gen = torch.Generator().manual_seed(seed)
    draft_gen = torch.Generator().manual_seed(seed + 1)
    out = GenerateOutput(tokens=[])
    dynamic = method in ("dyspec", "dyspec-heap")
    if calibration is True:
        calibration = Calibration() if dynamic else None
    elif calibration is False or not dynamic:
        calibration = None
    level = threshold if threshold is not None else 1.0 / (budget + 1)
    sizer = (tree_costs if isinstance(tree_costs, TreeSizer) or tree_costs is None
             else TreeSizer(tree_costs))
    while len(out.tokens) < max_new_tokens:
        p = target_cache.get_seq_length()
        start = time.perf_counter()
        drafted = origin = None  # the drafted tree, when a tree is chosen among more drafts
        sized = None  # (kept drafts' summed values, the tree index where grafted nodes start)
        if method == "ar":
            tree = DraftTree.root(root)
        elif method == "dyspec" and greedy and calibration is None and threshold is None:
            runner.start(p)
            chain = lookup_chain(context, min(lookup, budget - 1))
            drafted, order, values = ranked_candidates(root, runner, budget - len(chain),
                                                       eos_ids=tuple(eos))
            k = (len(order) if sizer is None  # ranked_tree's: every candidate
                 else sizer.choose(values, _chain_ranks(drafted, order, chain, eos)))
            tree, origin = chosen_tree(drafted, sorted(order[:k]))
            if sizer is not None:
                sized = (sum(values[:k]), len(tree))
            graft_chain(tree, drafted, origin, chain, tuple(eos))
        elif method == "dyspec" and threshold is None and not greedy:
            runner.start(p)
            tree, drafted, origin = layered_heap_tree(root, runner, budget, eos_ids=tuple(eos),
                                                      generator=draft_gen, calibration=calibration)
        else:
            runner.start(p)
            common = dict(eos_ids=tuple(eos), generator=draft_gen, deterministic=greedy)
            if method == "chain":
                tree = chain_tree(root, runner, budget, **common)
            elif method == "dyspec-heap":
                tree = heap_tree(root, runner, budget, calibration=calibration, **common)
            elif method == "tree":
                tree = static_tree(root, runner, tree_shape, **common)
            else:
                tree = threshold_tree(root, runner, threshold=level, budget=budget,
                                      calibration=calibration, **common)
                if threshold is None and calibration is not None:  # fill the budget
                    level = min(1.0, level * 1.15) if len(tree) - 1 >= budget else level / 1.15
        draft_seconds = time.perf_counter() - start
        start = time.perf_counter()
        logits = tree_forward(target, target_cache, tree.tokens, tree.parents)
        if greedy:
            accepted, token = verify_greedy(tree, logits)
        else:
            accepted, token = verify_sampling(tree, _WarpedRows(logits, temperature, top_k, top_p),
                                              verify_gen)
        target_seconds = time.perf_counter() - start
        if calibration is not None:
            calibration.observe(tree, accepted)
        compact_cache(target_cache, accepted_keep(p, [0] + accepted))
        new = [tree.tokens[i] for i in accepted] + [token]
        if runner is not None:
            start = time.perf_counter()
            path = [0] + accepted
            fed = path if drafted is None else [origin[i] for i in path]
            if capture is not None:
                runner.commit(tree if drafted is None else drafted, fed, capture.value[0, path])
            else:
                runner.commit(tree if drafted is None else drafted, fed)
            draft_seconds += time.perf_counter() - start
        if sized is not None:
            sizer.observe(sized[0], sum(1 for i in accepted if i < sized[1]), draft_seconds)
        out.steps.append(StepStats(len(tree) - 1, len(accepted), draft_seconds, target_seconds,
                                   tuple(accepted)))
        emitted = []
        for t in new:
            emitted.append(t)
            if t in eos or len(out.tokens) + len(emitted) >= max_new_tokens:
                break
        out.tokens.extend(emitted)
        context.extend(emitted)  # the prompt and the output so far: what prompt lookup reads
        if on_tokens is not None:
            on_tokens(emitted)
        if len(emitted) < len(new) or emitted[-1] in eos or len(out.tokens) >= max_new_tokens:
            return out
        root = token
    return out


def _chain_ranks(drafted: DraftTree, order: list[int], chain: list[int], eos) -> list[int]:
    """For each token the lookup chain would graft (up to its first EOS), the rank among the
    candidates ``order`` of the drafted node holding it (``len(order)`` when there is none)."""
    rank = {node: r for r, node in enumerate(order)}
    ranks, node = [], 0
    for y in chain:
        child = None if node is None else next(
            (c for c in drafted.children[node] if drafted.tokens[c] == y), None)
        ranks.append(rank.get(child, len(order)))
        node = child
        if y in eos:
            break
    return ranks
