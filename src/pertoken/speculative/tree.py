"""Verify a draft-token tree in one forward pass of a stock transformers 5.x causal LM
(spec §1.4, §2), and compact the KV cache to the accepted path.

A tree is given by ``parents``: node 0 is the root (the last committed token, not yet cached),
and ``parents[i] < i`` for every other node. Node ``i`` sits at depth ``depth(i)`` and gets the
position ``P + depth(i)``, where ``P`` is the number of cached tokens; it attends to the cached
prefix, its ancestors and itself, through a 4D *additive float* mask in the model dtype (a bool
mask is silently added by eager attention, so it is never used here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def depths(parents: Sequence[int]) -> list[int]:
    """Depth of every node (the root, node 0, has depth 0)."""
    out = [0] * len(parents)
    for i in range(1, len(parents)):
        if not 0 <= parents[i] < i:
            raise ValueError(f"node {i} has parent {parents[i]}: parents must precede children")
        out[i] = out[parents[i]] + 1
    return out


def ancestors_matrix(parents: Sequence[int]) -> torch.Tensor:
    """``A[i, j]`` is True when node ``j`` is node ``i`` or one of its ancestors."""
    n = len(parents)
    visible = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        visible[i] |= visible[parents[i]]
    return visible


GQA_SDPA = "pertoken_gqa_sdpa"
"""The attention implementation :func:`use_gqa_attention` registers with transformers."""


def _gqa_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        **kwargs):
    """transformers' ``sdpa`` attention, except on CPU for a masked pass of several queries over
    grouped key/value heads (a tree pass): there SDPA runs its own grouped-query mode
    (``enable_gqa``) instead of transformers first copying every cached key and value once per
    query group (``repeat_kv``; a SmolLM2 9-token pass over 400 cached tokens at one thread
    took 118 ms instead of 137). The same arithmetic, so the same outputs (tested)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (attention_mask is not None and query.shape[2] > 1 and query.device.type == "cpu"
            and getattr(module, "num_key_value_groups", 1) > 1
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions", False)):
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def use_gqa_attention(model):
    """Switch a model (or an EAGLE head) that runs transformers' ``sdpa`` attention to
    :data:`GQA_SDPA` (registered with transformers' ``AttentionInterface``, with the ``sdpa``
    mask format), in place; returns it. Other implementations are left alone."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return model
    AttentionInterface.register(GQA_SDPA, _gqa_sdpa_attention)
    AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(GQA_SDPA)
    else:  # a bare module holding transformers layers that read this config
        config._attn_implementation = GQA_SDPA
    return model


def tree_attention_mask(parents: Sequence[int], prefix_length: int,
                        dtype: torch.dtype, start: int = 0) -> torch.Tensor:
    """The ``(1, 1, N - start, P + N)`` additive mask of nodes ``start..N-1``: 0 where a node
    may attend (the prefix, its ancestors, itself), ``finfo.min`` elsewhere."""
    if not dtype.is_floating_point:
        raise TypeError("tree masks are additive float masks, in the model's dtype")
    n = len(parents)
    mask = torch.zeros(n - start, prefix_length + n, dtype=dtype)
    mask[:, prefix_length:].masked_fill_(~ancestors_matrix(parents)[start:],
                                         torch.finfo(dtype).min)
    return mask[None, None]


def tree_position_ids(parents: Sequence[int], prefix_length: int, start: int = 0) -> torch.Tensor:
    """``(1, N - start)`` positions ``P + depth`` of nodes ``start..N-1``."""
    return torch.tensor([[prefix_length + d for d in depths(parents)[start:]]], dtype=torch.long)


@torch.inference_mode()
def tree_forward(model, cache, tokens: Sequence[int], parents: Sequence[int], start: int = 0,
                 keep: Sequence[int] | None = None) -> torch.Tensor:
    """Logits of tree nodes, appending nodes ``start..N-1`` to ``cache``.

    ``tokens[i]`` is node ``i``'s token; ``cache`` holds the committed prefix followed by nodes
    ``0..start-1`` (a transformers ``DynamicCache``). Returns the logits ``(len(keep), vocab)``
    of the nodes ``keep`` (all new nodes by default; each must be ``>= start``), each equal to
    those of decoding its path one token at a time.
    """
    if len(tokens) != len(parents):
        raise ValueError("one parent per token")
    prefix = cache.get_seq_length() - start
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(tokens[start:])], dtype=torch.long, device=device)
    rows = 0 if keep is None else torch.tensor([i - start for i in keep], dtype=torch.long,
                                               device=device)
    out = model(input_ids=input_ids,
                attention_mask=tree_attention_mask(parents, prefix, dtype, start).to(device),
                position_ids=tree_position_ids(parents, prefix, start).to(device),
                cache=cache, use_cache=True, logits_to_keep=rows)
    return out.logits[0]


def compact_cache(cache, keep: torch.Tensor | Sequence[int]) -> None:
    """Keep only the cache positions ``keep`` (in order) in every layer, in place.

    After a tree pass over a prefix of ``P`` tokens, ``keep = [0..P) + [P + i for the root and
    the accepted nodes]``; their RoPE positions already equal their final positions.
    """
    keep = torch.as_tensor(keep, dtype=torch.long)
    n = keep.numel()
    if bool((keep == torch.arange(n)).all()):  # a prefix (plain decoding, a whole chain): a view
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
        return
    for layer in cache.layers:
        index = keep.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)


def accepted_keep(prefix_length: int, path: Sequence[int]) -> torch.Tensor:
    """Cache positions to keep after accepting ``path`` (tree node indices, root first)."""
    return torch.cat([torch.arange(prefix_length),
                      torch.tensor([prefix_length + i for i in path], dtype=torch.long)])
