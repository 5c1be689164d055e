"""Exact verification of a draft tree (spec §1.3, DySpec App. A.3 / Alg. 3, as Sequoia does it).

Sampling: at node ``u`` with target distribution ``R = T(.|u)`` and the draft distribution
``Dq = D(.|u)`` that ``u``'s children were drawn from (without replacement, in order), each child
``y`` is tried in sampling order and accepted when ``U * Dq[y] <= R[y]``; on rejection the
target becomes the residual ``norm(max(R - Dq, 0))`` and ``y`` is removed from ``Dq``. When no
child is accepted, a token is drawn from the current ``R`` and the step ends. The output law is
exactly ``T`` (Leviathan et al.; SpecTr/Sequoia for trees drawn without replacement).

Greedy: descend to the child equal to ``argmax T(.|u)``; otherwise emit that argmax and stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    """A draft tree. Node 0 is the root (the last committed token)."""

    tokens: list[int]
    parents: list[int]
    children: list[list[int]] = field(default_factory=list)
    """children of each node, in the order they were sampled"""
    draft_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    """for each node with children: the draft distribution they were drawn from"""
    shares: dict[int, float] = field(default_factory=dict)
    """for each drafted node: its probability under the (renormalised) draft it was drawn from"""

    @classmethod
    def root(cls, token: int) -> "DraftTree":
        return cls(tokens=[token], parents=[-1], children=[[]])

    def add(self, parent: int, token: int) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.children.append([])
        self.children[parent].append(len(self.tokens) - 1)
        return len(self.tokens) - 1

    def __len__(self) -> int:
        return len(self.tokens)


def sample_index(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One draw from the non-negative weights ``probs`` (a 1-D row, not necessarily
    normalised): the inverse of their float64 cumulative sum at a uniform draw. Written here
    because ``torch.multinomial`` takes 0.9 ms on a 49,152-token row on a 2-core CPU, this
    0.05 ms; a token of zero weight is never drawn."""
    cdf = torch.cumsum(probs.double(), 0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)


def residual(target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """``norm(max(target - draft, 0))``; falls back to ``target`` if float error empties it."""
    rest = (target - draft).clamp_min(0)
    total = rest.sum()
    return rest / total if total > 0 else target


def without(draft: torch.Tensor, token: int) -> torch.Tensor:
    """The draft distribution with ``token`` removed and the rest renormalised (or all zero)."""
    rest = draft.clone()
    rest[token] = 0
    total = rest.sum()
    return rest / total if total > 0 else rest


def verify_sampling(tree: DraftTree, target_probs: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Recursive rejection sampling down ``tree``.

    Args:
        target_probs: ``(N, V)`` (or anything indexed by node), row ``i`` the (warped) target
            distribution after node ``i``.
    Returns:
        ``(accepted, token)``: accepted node indices below the root, in order, and the token
        drawn at the end (the correction, or the bonus token at a leaf).
    """
    accepted: list[int] = []
    node = 0
    while True:
        target = target_probs[node]
        kids = tree.children[node]
        if kids:
            draft = tree.draft_probs[node]
            moved = False
            for child in kids:
                y = tree.tokens[child]
                u = torch.rand((), generator=generator, dtype=target.dtype)
                if u * draft[y] <= target[y]:
                    accepted.append(child)
                    node = child
                    moved = True
                    break
                target = residual(target, draft)
                draft = without(draft, y)
                if draft.sum() <= 0:
                    break
            if moved:
                continue
        token = sample_index(target, generator)
        return accepted, token


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor) -> tuple[list[int], int]:
    """Greedy verification: follow children equal to the target's argmax."""
    accepted: list[int] = []
    node = 0
    while True:
        best = int(target_logits[node].argmax())
        match = next((c for c in tree.children[node] if tree.tokens[c] == best), None)
        if match is None:
            return accepted, best
        accepted.append(match)
        node = match
