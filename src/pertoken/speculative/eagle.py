"""An EAGLE-style draft head: one decoder layer that reads the target's own features.

EAGLE (Li et al., 2024) drafts with the target's last hidden state ("feature") rather than
with a separate small language model: the head takes, at each position, the embedding of the
token there and the target's feature of the position before it, runs one decoder layer and
outputs a predicted feature for the position, whose logits give the next draft token. Deeper
tree nodes read the head's own predicted features.

Our head differs from the paper in one place, for cost on a small target: the logits cover a
fixed subset of the vocabulary (the tokens the target emits most often, found on the training
data) through the matching rows of the target's own LM head. SmolLM2-135M's full 49152 x 576
head alone is a fifth of the target's per-token work; a 8192-row subset is a thirtieth. Tokens
outside the subset are never drafted, which costs acceptance only where the target would have
emitted one, and the output law is untouched (verification is exact for any draft).

The head shares the target's input embedding and LM head (they are not saved with it), so a
saved head is a few megabytes and loads only beside its target. Written by hand: transformers
has no EAGLE head; the decoder layer and rotary embedding are transformers' Llama modules.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pertoken.atomic import atomic_path, write_json_atomic
from pertoken.errors import UserError
from pertoken.speculative.tree import compact_cache, tree_attention_mask, tree_position_ids

log = logging.getLogger(__name__)

CONFIG_NAME = "pertoken-eagle.json"
WEIGHTS_NAME = "eagle.safetensors"


class FeatureCapture:
    """Keeps the target's features of every forward, through forward hooks: the output of its
    final norm (what its LM head reads), after the outputs of the decoder layers
    ``layers``, each RMS-normalised without a weight (residual streams carry channels hundreds
    of times the typical size; normalised, all parts share one scale), concatenated in that
    order: ``value`` is ``(batch, tokens, hidden * (len(layers) + 1))``."""

    def __init__(self, target, layers: Sequence[int] = ()) -> None:
        self.value: torch.Tensor | None = None
        self.layers = tuple(layers)
        self.parts: dict[int, torch.Tensor] = {}
        self.eps = float(getattr(target.config, "rms_norm_eps", 1e-6))
        blocks = decoder_layers(target) if self.layers else []
        self.handles = [blocks[i].register_forward_hook(self._layer_hook(i)) for i in self.layers]
        self.handles.append(final_norm(target).register_forward_hook(self._hook))

    def _layer_hook(self, index: int):
        def hook(module, inputs, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            self.parts[index] = nn.functional.rms_norm(hidden, (hidden.shape[-1],), eps=self.eps)
        return hook

    def _hook(self, module, inputs, output) -> None:
        if self.layers:
            output = torch.cat([self.parts.pop(i).to(output.dtype) for i in self.layers]
                               + [output], dim=-1)
        self.value = output

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _model_part(target, name: str):
    part = getattr(getattr(target, "model", None), name, None)
    if part is None:
        raise UserError(f"{type(target).__name__} has no model.{name}: the EAGLE head supports "
                        "Llama-family models")
    return part


def decoder_layers(target) -> nn.ModuleList:
    return _model_part(target, "layers")


def check_feature_layers(target, layers: Sequence[int]) -> tuple[int, ...]:
    """``layers`` as a tuple, checked against the target's depth (each a decoder layer index
    before the last, in increasing order)."""
    count = target.config.num_hidden_layers
    layers = tuple(int(i) for i in layers)
    if any(not 0 <= i < count - 1 for i in layers) or list(layers) != sorted(set(layers)):
        raise UserError(f"feature layers must be increasing decoder layer indices from 0 to "
                        f"{count - 2} (the last layer's output is the final feature), got "
                        f"{','.join(map(str, layers))}")
    return layers


def final_norm(target) -> nn.Module:
    return _model_part(target, "norm")


class EagleHead(nn.Module):
    """``forward(input_ids, features, ...)`` -> ``(predicted features, logits over vocab)``.

    ``vocab`` (a LongTensor) lists the draftable token ids; ``logits[..., j]`` is token
    ``vocab[j]``'s. ``target`` provides the embedding and LM head rows (bound, not copied into
    the saved weights).

    With ``feature_layers`` the features are :class:`FeatureCapture`'s concatenation: the
    normalised outputs of those decoder layers, then the final feature (EAGLE-3's point:
    lower layers keep what the last one has already spent on the next token). The head then
    also predicts those parts, through ``aux`` from its output, so that deeper tree nodes read
    a full predicted feature; logits come from the final part alone, as without them."""

    def __init__(self, target, vocab: torch.Tensor, feature_layers: Sequence[int] = ()) -> None:
        from transformers.models.llama.modeling_llama import (LlamaDecoderLayer,
                                                              LlamaRotaryEmbedding)

        super().__init__()
        cfg = target.config.__class__.from_dict(target.config.to_dict())
        cfg.num_hidden_layers = 1
        cfg._attn_implementation = "sdpa"
        self.config = cfg
        width = cfg.hidden_size
        self.feature_layers = check_feature_layers(target, feature_layers)
        extra = width * len(self.feature_layers)
        self.feature_size = width + extra
        self.fc = nn.Linear(width + self.feature_size, width, bias=False)
        self.aux = nn.Linear(width, extra, bias=False) if extra else None
        self.layer = LlamaDecoderLayer(cfg, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(cfg)
        self.register_buffer("vocab", vocab.long().clone(), persistent=False)
        self._bind(target)

    def _bind(self, target) -> None:
        # kept outside the module's parameters: they are the target's, frozen and not saved
        object.__setattr__(self, "embed", target.get_input_embeddings())
        weight = target.get_output_embeddings().weight
        object.__setattr__(self, "head_weight", weight.detach()[self.vocab].contiguous())

    def to(self, *args, **kwargs):  # the bound head rows follow the module's dtype
        out = super().to(*args, **kwargs)
        object.__setattr__(self, "head_weight", self.head_weight.to(*args, **kwargs))
        return out

    def small_batch_layout(self) -> "EagleHead":
        """:func:`pertoken.models.small_batch_layout` for the head, its bound LM-head rows
        included (a no-op but in float32 and bf16 on CPU; the rows are laid out in float32
        only)."""
        from pertoken.models import small_batch_layout

        small_batch_layout(self)
        if self.head_weight.dtype == torch.float32 and self.head_weight.device.type == "cpu":
            object.__setattr__(self, "head_weight", self.head_weight.t().contiguous().t())
        return self

    @property
    def dtype(self) -> torch.dtype:  # the norm's: the linears may be fbgemm modules
        return self.layer.input_layernorm.weight.dtype

    def use_vocab_projection(self, linear: nn.Module) -> None:
        """Project onto the draft vocabulary with ``linear`` (a float16 copy of the bound
        LM-head rows, from :func:`pertoken.speculative.fp16.fp16_draft`) instead of the rows."""
        object.__setattr__(self, "vocab_projection", linear)

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor,
                position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache=None,
                rows: torch.Tensor | None = None):
        embeds = self.embed(input_ids).to(self.dtype)
        x = self.fc(torch.cat([embeds, features.to(self.dtype)], dim=-1))
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + input_ids.shape[1],
                                        device=input_ids.device).unsqueeze(0)
        x = self.layer(x, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                       use_cache=cache is not None,
                       position_embeddings=self.rotary(x, position_ids))
        if isinstance(x, tuple):
            x = x[0]
        predicted = x if self.aux is None else torch.cat([self.aux(x), x], dim=-1)
        out = x if rows is None else x[:, rows]
        projection = self.__dict__.get("vocab_projection")
        if projection is not None:
            return predicted, projection(out)
        return predicted, out @ self.head_weight.to(out.dtype).T

    def save(self, out: str | Path, info: dict) -> None:
        from safetensors.torch import save_file

        if "vocab_projection" in self.__dict__:
            raise RuntimeError("a float16 head cannot be saved: save it before fp16_draft")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        state["vocab"] = self.vocab.cpu().clone()
        with atomic_path(out / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp))
        write_json_atomic(out / CONFIG_NAME, {
            "kind": "eagle-head", **info, "hidden_size": self.config.hidden_size,
            "feature_layers": list(self.feature_layers),
            "target_vocab_size": self.config.vocab_size, "draft_vocab_size": int(self.vocab.numel())})


def vocab_by_frequency(tokens: torch.Tensor, vocab_size: int, size: int,
                       always: list[int] = ()) -> torch.Tensor:
    """The draftable vocabulary: the ids in ``always`` (EOS and the like) and the most frequent
    ids of ``tokens`` (ties to the smaller id), ``size`` in all, in increasing order."""
    counts = torch.bincount(torch.as_tensor(tokens).reshape(-1).long(), minlength=vocab_size)
    counts = counts.double()
    for token in always:
        counts[token] = float("inf")
    order = torch.sort(-counts, stable=True).indices
    return torch.sort(order[: min(size, vocab_size)]).values


def is_eagle(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).exists()


def head_info(path: str | Path, target=None) -> dict:
    """The settings saved with the EAGLE head in ``path`` (:meth:`EagleHead.save`'s
    ``CONFIG_NAME``), checked against ``target`` when one is given."""
    path = Path(path)
    if not is_eagle(path):
        raise UserError(f"{path} is not an EAGLE head folder (no {CONFIG_NAME})")
    info = json.loads((path / CONFIG_NAME).read_text())
    if target is not None and (info.get("hidden_size") != target.config.hidden_size
                               or info.get("target_vocab_size") != target.config.vocab_size):
        raise UserError(f"the EAGLE head in {path} was trained for another target")
    return info


def load_eagle(path: str | Path, target, dtype: torch.dtype | None = None) -> EagleHead:
    """Load a head saved by :meth:`EagleHead.save` beside ``target`` (its embedding and LM
    head are bound), in ``dtype``: the target's by default. The saved weights are float32,
    so a float32 head over a bfloat16 target holds them unrounded (the bound LM-head rows
    are the target's, cast)."""
    from safetensors.torch import load_file

    info = head_info(path, target)
    state = load_file(str(Path(path) / WEIGHTS_NAME))
    vocab = state.pop("vocab")
    head = EagleHead(target, vocab, info.get("feature_layers", ()))
    head.load_state_dict(state)
    return head.to(dtype or next(target.parameters()).dtype).eval()


class EagleRunner:
    """The draft side of one step for an :class:`EagleHead` (the interface of
    ``generate._DraftRunner``).

    Head position ``t`` reads token ``t`` and the target's feature at ``t - 1``. The head cache
    holds the committed prefix read with the target's true features; a tree node's children
    read the head's predicted feature of the node. After verification the cache keeps the
    prefix and the root; the accepted nodes, which were read with predicted features, wait
    (``pending``) and are read again with the target's features, in the same forward as the
    next root."""

    def __init__(self, head: EagleHead, temperature: float, every_node: bool) -> None:
        from transformers import DynamicCache

        self.head, self.temperature, self.every_node = head, temperature, every_node
        self.cache = DynamicCache()
        self.vocab_size = head.config.vocab_size
        self.pending_tokens: list[int] = []
        self.pending_features = torch.zeros(0, head.feature_size, dtype=head.dtype)
        self.last_feature = torch.zeros(1, head.feature_size, dtype=head.dtype)
        self.prefix = self.fed = 0
        self.probs: dict[int, torch.Tensor] = {}
        self.predicted: dict[int, torch.Tensor] = {}

    def prefill(self, tokens: list[int], features: torch.Tensor | None) -> None:
        """Read the prompt's prefix (all but its last token) with the target's ``features``
        of it (``(len(tokens), hidden)``)."""
        if not tokens:
            return
        feats = torch.cat([torch.zeros_like(self.last_feature), features[:-1].to(self.head.dtype)])
        self.head(torch.tensor([tokens]), feats[None], cache=self.cache)
        self.last_feature = features[-1:].to(self.head.dtype)

    def start(self, prefix: int) -> None:
        self.prefix, self.fed, self.probs, self.predicted = prefix, 0, {}, {}

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        sub = torch.softmax(logits.float() / self.temperature, -1)
        full = torch.zeros(sub.shape[0], self.vocab_size, dtype=sub.dtype)
        return full.index_copy_(1, self.head.vocab, sub)

    def __call__(self, tree, nodes) -> torch.Tensor:
        n = len(tree)
        if self.fed == 0:  # the pending accepted tokens and the root, a chain after the cache
            tokens = self.pending_tokens + [tree.tokens[0]]
            feats = torch.cat([self.pending_features, self.last_feature])
            chain = list(range(-1, len(tokens) - 1))
            past = self.cache.get_seq_length()
            g, logits = self.head(torch.tensor([tokens]), feats[None],
                                  position_ids=tree_position_ids(chain, past),
                                  attention_mask=tree_attention_mask(chain, past, self.head.dtype),
                                  cache=self.cache, rows=torch.tensor([len(tokens) - 1]))
            self.predicted[0] = g[0, -1]
            self.probs[0] = self._probs(logits[0])[0]
            self.pending_tokens = []
            self.fed = 1
        if self.fed < n:
            wanted = set(nodes)
            new = list(range(self.fed, n))
            keep = [i for i in new if self.every_node or i in wanted]
            feats = torch.stack([self.predicted[tree.parents[i]] for i in new])
            g, logits = self.head(torch.tensor([tree.tokens[self.fed:]]), feats[None],
                                  position_ids=tree_position_ids(tree.parents, self.prefix, self.fed),
                                  attention_mask=tree_attention_mask(tree.parents, self.prefix,
                                                                     self.head.dtype, self.fed),
                                  cache=self.cache,
                                  rows=torch.tensor([i - self.fed for i in keep]))
            self.predicted.update(zip(new, g[0]))
            self.probs.update(zip(keep, self._probs(logits[0])))
            self.fed = n
        return torch.stack([self.probs[i] for i in nodes])

    def commit(self, tree, path: list[int], features: torch.Tensor) -> None:
        """``path``: the root and the accepted nodes; ``features``: the target's features of
        them (``(len(path), hidden)``)."""
        compact_cache(self.cache, torch.arange(self.prefix + 1))
        features = features.to(self.head.dtype)
        self.pending_tokens = [tree.tokens[i] for i in path[1:]]
        self.pending_features = features[:-1]
        self.last_feature = features[-1:]


@torch.inference_mode()
def head_decode_seconds(head: EagleHead, context: int = 256, repeats: int = 7) -> float:
    """Median seconds of one single-token head call over a ``context``-token cache."""
    import statistics
    import time

    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    width = head.feature_size
    ids = torch.randint(0, head.config.vocab_size, (1, context + 1), generator=g)
    feats = torch.randn(1, context + 1, width, generator=g).to(head.dtype)
    times = []
    for _ in range(repeats + 1):
        cache = DynamicCache()
        head(ids[:, :context], feats[:, :context], cache=cache)
        start = time.perf_counter()
        head(ids[:, context:], feats[:, context:], cache=cache)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])
