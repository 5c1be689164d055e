"""Half-precision drafts: the draft side of speculative decoding on float16 weights.

Verification keeps the output law the target's whatever the draft proposes, so the draft's
arithmetic may be approximate; only its acceptance rate matters. On a CPU a draft call over a
few tokens is bound by reading the draft's float32 weights: on SmolLM2's EAGLE head three
quarters of a 4 ms call are its nine matrix products. fbgemm's float16 linear
(``torch.ao.nn.quantized.dynamic.Linear`` with ``dtype=torch.float16``: weights stored in
float16, float32 inputs, outputs and accumulation) reads half the bytes; measured at one
thread, 1 to 9 rows through the head's 8192 x 576 vocabulary projection take 0.49-0.71 ms
instead of 0.72-1.21 ms, a whole head call 3.3 ms instead of 4.4 ms, at a relative output
error of 2e-4 (the rounding of the weights).

Int8 was measured and left out: fbgemm's dynamic int8 linear quantizes each call's input per
tensor to 7 bits, and SmolLM2's features have outlier channels (a channel maximum of 48 against
a median of 2.8): with only the LM head on it the target's top-1 agreed with float32's on 90%
of wiki-en tokens, with every linear on it on 48%.

Only the swap is written here; the kernels are torch's (fbgemm). Float32 CPU models only;
anything else is left as it is (the CLI loads a draft in float32 for it, beside a bfloat16
target too: ``pertoken.speculative.cli._draft_dtype``). For inference: a swapped model's
``state_dict`` holds packed parameters, so save before converting.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

log = logging.getLogger(__name__)


def fp16_available() -> bool:
    """Whether torch here has fbgemm's float16 linear."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear  # noqa: F401
    except ImportError:  # torch.ao.nn.quantized may leave a future torch
        return False
    return bool({"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines))


def fp16_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """A module computing ``x @ weight.T + bias`` in float32 with ``weight`` stored (and
    rounded) in float16."""
    from torch.ao.nn.quantized.dynamic import Linear

    out_features, in_features = weight.shape
    with warnings.catch_warnings():  # torch.ao's quantized modules announce their deprecation
        warnings.simplefilter("ignore")
        linear = Linear(in_features, out_features, bias_=bias is not None, dtype=torch.float16)
        linear.set_weight_bias(weight.detach().float().contiguous(),
                               None if bias is None else bias.detach().float().contiguous())
    return linear


def fp16_draft(draft: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear`` of ``draft`` (a draft model, or an
    :class:`~pertoken.speculative.eagle.EagleHead`, whose vocabulary projection is swapped too)
    for :func:`fp16_linear`, in place; returns it. A no-op, logged, where the kernels are
    missing or the draft is not a float32 CPU model."""
    params = list(draft.parameters())
    if not (params and params[0].dtype == torch.float32 and params[0].device.type == "cpu"):
        log.info("float16 draft weights need a float32 CPU draft: the draft stays as it is")
        return draft
    if not fp16_available():
        log.warning("torch here has no fbgemm float16 linear: the draft stays in float32")
        return draft
    swaps = [(parent, name, child) for parent in draft.modules()
             for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in swaps:
        setattr(parent, name, fp16_linear(child.weight, child.bias))
    from pertoken.speculative.eagle import EagleHead

    if isinstance(draft, EagleHead):
        draft.use_vocab_projection(fp16_linear(draft.head_weight))
    log.info("draft on float16 weights (%d linears)", len(swaps))
    return draft


def has_fp16_linears(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())
