"""Tiny EAGLE heads for the tests: one nudged off its initialisation, and one saved beside its
saved target, as the CLI loads them."""

import random

import torch

from pertoken.models import tiny_llama
from pertoken.speculative.eagle import EagleHead


def nudged_head(target, seed: int) -> EagleHead:
    """A head over the odd token ids from 3, its parameters moved by ``0.3 * randn`` so that it
    drafts something other than its initialisation."""
    torch.manual_seed(seed)
    head = EagleHead(target, torch.arange(3, target.config.vocab_size, 2)).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return head


def saved_pair(folder, head_seed: int):
    """``(target, head)``: a tiny target saved with its tokenizer in ``folder/target`` and
    :func:`nudged_head` saved in ``folder/head``."""
    target, tokenizer = tiny_llama(seed=31, num_hidden_layers=2, hidden_size=32,
                                   intermediate_size=64)
    target.save_pretrained(folder / "target")
    tokenizer.save_pretrained(folder / "target")
    head = nudged_head(target, head_seed)
    head.save(folder / "head", {"target": "tiny"})
    return target, head


def random_prompts(seed: int, count: int = 4):
    """``count`` prompts of 1-9 token ids in [4, 260), drawn from ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [[rng.randrange(4, 260) for _ in range(rng.randrange(1, 10))] for _ in range(count)]
