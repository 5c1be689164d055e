"""Calibrate a model and swap its decoder linears for integer ones (OutlierTune spec §1).

Placement (spec §1.1): the linears fed by a norm share one static per-channel activation scale
per norm (Llama ``q/k/v`` and ``gate/up``; OPT ``q/k/v`` and ``fc1``), with the scale folded
into their weights and an optional symmetrizing shift folded into a bias; the inputs of
``o_proj``/``down_proj`` (OPT ``out_proj``/``fc2``) are quantized per token at run time. The
embedding, the norms and the (tied) head are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pertoken.errors import UserError
from pertoken.quant.observers import observe_inputs
from pertoken.quant.qlinear import QuantLinear
from pertoken.quant.quantizers import QuantizedWeight, quantize_weight

log = logging.getLogger(__name__)

METHODS = ("outliertune", "per-token")


@dataclass
class QuantConfig:
    method: str = "outliertune"
    """``outliertune`` (static per-channel, folded) or ``per-token`` (dynamic everywhere)"""
    w_bits: int = 8
    a_bits: int = 8
    shift: bool = True
    """OutlierTune's symmetrizing shift (``False``: the ablation)"""
    shift_mode: str = "mean"
    """``mean`` of the per-sample mid-ranges, or the ``global`` mid-range"""
    weights: str = "rtn_asym"
    """weight rounding: ``rtn_sym``, ``rtn_asym`` or ``mse``"""

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose {', '.join(METHODS)}")
        for name in ("w_bits", "a_bits"):
            if getattr(self, name) not in (4, 6, 8):
                raise UserError(f"{name.replace('_', '-')} must be 4, 6 or 8, got "
                                f"{getattr(self, name)}")
        if self.a_bits == 4:
            raise UserError("4-bit activations are not supported: use --a-bits 6 or 8")


@dataclass
class LinearGroup:
    """Linears that read the same input: ``static`` groups follow a norm (one shared scale and
    shift), ``dynamic`` ones read an attention or MLP product."""
    linears: list[str]
    kind: str


def linear_groups(model: nn.Module) -> list[LinearGroup]:
    """The decoder's linear groups for Llama-family (RMSNorm, SwiGLU) and OPT-style models."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    prefix = "model.layers"
    if layers is None and hasattr(inner, "decoder"):
        layers, prefix = inner.decoder.layers, "model.decoder.layers"
    if layers is None:
        raise UserError(f"{type(model).__name__} is not a model family pertoken quant knows "
                        "(Llama-style or OPT-style decoder layers)")
    groups = []
    for i, layer in enumerate(layers):
        p = f"{prefix}.{i}"
        attn = layer.self_attn
        if hasattr(layer, "mlp") and hasattr(layer.mlp, "gate_proj") and hasattr(attn, "o_proj"):
            groups += [LinearGroup([f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")],
                                   "static"),
                       LinearGroup([f"{p}.self_attn.o_proj"], "dynamic"),
                       LinearGroup([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], "static"),
                       LinearGroup([f"{p}.mlp.down_proj"], "dynamic")]
        elif hasattr(layer, "fc1") and hasattr(attn, "out_proj"):
            groups += [LinearGroup([f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")],
                                   "static"),
                       LinearGroup([f"{p}.self_attn.out_proj"], "dynamic"),
                       LinearGroup([f"{p}.fc1"], "static"),
                       LinearGroup([f"{p}.fc2"], "dynamic")]
        else:
            raise UserError(f"decoder layer {i} of {type(model).__name__} has neither Llama "
                            "(q/k/v/o_proj, gate/up/down_proj) nor OPT (fc1/fc2) linears")
    return groups


def fold_channel_scales(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                        shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Spec §1.3-1.4: with ``u = (x - shift) / scale``, ``W x + b = W' u + b'`` for
    ``W' = W diag(scale)`` and ``b' = b + W shift`` (computed with the original ``W``)."""
    w = weight.detach().float()
    folded = w * scale.float()[None, :]
    if shift is None:
        return folded, None if bias is None else bias.detach().float()
    b = w @ shift.float()
    return folded, b if bias is None else bias.detach().float() + b


def _weight(w: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    q = quantize_weight(w, cfg.w_bits, cfg.weights)
    return q.centred() if q.zero is not None and cfg.w_bits <= 7 else q


def quantize_model(model: nn.Module, batches: Iterable[torch.Tensor], cfg: QuantConfig,
                   progress: bool = True) -> dict:
    """Calibrate on ``batches`` (unpadded token-id tensors) and replace every decoder linear of
    ``model`` by a :class:`~pertoken.quant.qlinear.QuantLinear`, in place. Returns what was
    done: per static group its scales and shifts (for the saved config and diagnostics)."""
    cfg.validate()
    groups = linear_groups(model)
    static = [g for g in groups if g.kind == "static"] if cfg.method == "outliertune" else []
    stats = observe_inputs(model, [g.linears[0] for g in static], batches, progress) \
        if static else {}
    folded = {}
    for group in groups:
        if group in static:
            st = stats[group.linears[0]]
            shift = st.shift(cfg.shift_mode) if cfg.shift else None
            scale = st.scale(cfg.a_bits, shift)
            folded[group.linears[0]] = {"linears": group.linears, "scale": scale, "shift": shift,
                                        "tokens": st.tokens}
        for name in group.linears:
            linear = model.get_submodule(name)
            bias = linear.bias
            if group in static:
                w, b = fold_channel_scales(linear.weight, bias, scale, shift)
                new = QuantLinear(_weight(w, cfg), b, "static", cfg.a_bits,
                                  inv_scale=1 / scale, shift=shift)
            else:
                new = QuantLinear(_weight(linear.weight.detach().float(), cfg),
                                  None if bias is None else bias.detach(), "per-token",
                                  cfg.a_bits)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    log.info("%s W%dA%d: %d linears on integer kernels (%d static groups)", cfg.method,
             cfg.w_bits, cfg.a_bits, sum(len(g.linears) for g in groups), len(static))
    return folded
