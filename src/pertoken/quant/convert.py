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
from pertoken.quant.fused import link_fused_blocks
from pertoken.quant.qlinear import QuantEmbedding, QuantLinear, link_shared_codes
from pertoken.quant.quantizers import QuantizedWeight, quantize_weight

log = logging.getLogger(__name__)

METHODS = ("outliertune", "smoothquant", "per-token", "per-tensor", "weight-only")
WEIGHT_QUANTIZERS = ("rtn_sym", "rtn_asym", "mse", "mse_sym", "gptq", "gptq_sym")


@dataclass
class QuantConfig:
    method: str = "outliertune"
    """``outliertune`` (static per-channel, folded), ``smoothquant`` (SmoothQuant's migration,
    then per-token), ``per-token`` (dynamic everywhere), ``per-tensor`` (one static scale per
    linear input) or ``weight-only``"""
    w_bits: int = 8
    a_bits: int = 8
    shift: bool = True
    """OutlierTune's symmetrizing shift (``False``: the ablation)"""
    shift_mode: str = "mean"
    """``mean`` of the per-sample mid-ranges, or the ``global`` mid-range"""
    weights: str = "rtn_asym"
    """weight rounding: ``rtn_sym``, ``rtn_asym``, ``mse`` (asymmetric, MSE-clipped),
    ``mse_sym``, ``gptq`` or ``gptq_sym`` (GPTQ on an MSE-clipped symmetric grid, so the GEMM
    needs no zero-point term; sequential over the decoder layers, on the calibration
    batches)"""
    smooth_alpha: float = 0.5
    """SmoothQuant's migration strength alpha"""
    dynamic_alpha: float | None = 0.6
    """OutlierTune only: also migrate the per-token inputs' channel outliers (``o_proj``,
    ``down_proj``) with SmoothQuant's factors at this alpha, folded exactly into the rows of the
    linear that produces them (``v_proj``, ``up_proj``). A pertoken addition (on SmolLM2 the
    ``down_proj`` input carries most of the W8A8 error); None keeps the spec's plain per-token
    inputs"""
    head: bool = False
    """also run the output head on integer kernels (W8A8, per-token codes, symmetric per-row
    weights); a tied input embedding then reads its rows from the head's codes"""

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose {', '.join(METHODS)}")
        for name in ("w_bits", "a_bits"):
            if getattr(self, name) not in (4, 6, 8):
                raise UserError(f"{name.replace('_', '-')} must be 4, 6 or 8, got "
                                f"{getattr(self, name)}")
        if self.weights not in WEIGHT_QUANTIZERS:
            raise UserError(f"unknown weight quantizer {self.weights!r}: choose "
                            f"{', '.join(WEIGHT_QUANTIZERS)}")
        if self.a_bits == 4 and self.method != "weight-only":
            raise UserError("4-bit activations are not supported: use --a-bits 6 or 8")
        for alpha in (self.smooth_alpha, self.dynamic_alpha):
            if alpha is not None and not 0 <= alpha <= 1:
                raise UserError(f"a migration alpha must be in [0, 1], got {alpha}")


@dataclass
class LinearGroup:
    """Linears that read the same input: ``static`` groups follow a norm (one shared scale and
    shift), ``dynamic`` ones read an attention or MLP product. ``feeder`` is the linear whose
    output rows scale that input channel by channel (``v_proj`` for the attention output,
    through grouped-query heads; ``up_proj`` through SwiGLU's product; OPT's ``fc1`` through
    ReLU), or None where no such fold is exact."""
    linears: list[str]
    kind: str
    feeder: str | None = None


def decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The decoder layers of a Llama-style (``model.layers``) or OPT-style
    (``model.decoder.layers``) causal LM, and their dotted path."""
    inner = getattr(model, "model", model)
    if hasattr(inner, "layers"):
        return inner.layers, "model.layers"
    if hasattr(inner, "decoder") and hasattr(inner.decoder, "layers"):
        return inner.decoder.layers, "model.decoder.layers"
    raise UserError(f"{type(model).__name__} is not a model family pertoken quant knows "
                    "(Llama-style or OPT-style decoder layers)")


def linear_groups(model: nn.Module) -> list[LinearGroup]:
    """The decoder's linear groups for Llama-family (RMSNorm, SwiGLU) and OPT-style models."""
    layers, prefix = decoder_layers(model)
    groups = []
    for i, layer in enumerate(layers):
        p = f"{prefix}.{i}"
        attn = layer.self_attn
        if hasattr(layer, "mlp") and hasattr(layer.mlp, "gate_proj") and hasattr(attn, "o_proj"):
            groups += [LinearGroup([f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")],
                                   "static"),
                       LinearGroup([f"{p}.self_attn.o_proj"], "dynamic", f"{p}.self_attn.v_proj"),
                       LinearGroup([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], "static"),
                       LinearGroup([f"{p}.mlp.down_proj"], "dynamic", f"{p}.mlp.up_proj")]
        elif hasattr(layer, "fc1") and hasattr(attn, "out_proj"):
            relu = getattr(model.config, "activation_function", "relu") == "relu"
            groups += [LinearGroup([f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")],
                                   "static"),
                       LinearGroup([f"{p}.self_attn.out_proj"], "dynamic",
                                   f"{p}.self_attn.v_proj"),
                       LinearGroup([f"{p}.fc1"], "static"),
                       LinearGroup([f"{p}.fc2"], "dynamic", f"{p}.fc1" if relu else None)]
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


def replace_linear(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule ``name`` (dotted path) of ``model`` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _centred(q: QuantizedWeight) -> QuantizedWeight:
    """Narrow asymmetric codes store ``codes - zero`` (no zero-point correction at run time)."""
    return q.centred() if q.zero is not None and q.bits <= 7 else q


def _weight(w: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    return _centred(quantize_weight(w, cfg.w_bits, cfg.weights))


@dataclass
class _Plan:
    """A linear's folded float weight and bias and its activation quantizer, before rounding."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    act: str
    inv_scale: torch.Tensor | None
    shift: torch.Tensor | None
    group: str
    """the group's first linear: linears of a group read one input and share one Hessian"""

    def build(self, weight: QuantizedWeight, cfg: QuantConfig) -> QuantLinear:
        linear = QuantLinear(weight, self.bias, self.act, cfg.a_bits, inv_scale=self.inv_scale,
                             shift=self.shift)
        linear.group = self.group
        return linear

    def gptq_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the folded weight multiplies: ``(x - shift) / scale`` for static activations,
        SmoothQuant's ``x / a``, or ``x`` itself."""
        x = x.float()
        if self.shift is not None:
            x = x - self.shift
        return x * self.inv_scale if self.inv_scale is not None else x


def quantize_head(model: nn.Module) -> QuantLinear:
    """Swap the output head for a W8A8 per-token :class:`QuantLinear` (symmetric per-row
    weights, so that a row is ``codes * step``). With tied embeddings the input embedding
    becomes a :class:`~pertoken.quant.qlinear.QuantEmbedding` over the same codes and the
    config is untied, so nothing float is kept for either (spec §1.1 leaves the head float;
    this is pertoken's option for speed: the 49k-row head is a large share of a forward)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise UserError(f"{type(model).__name__} has no linear output head to quantize")
    embedding = model.get_input_embeddings()
    tied = embedding is not None and embedding.weight is head.weight
    new = QuantLinear(quantize_weight(head.weight, 8, "rtn_sym"), head.bias, "per-token", 8)
    model.set_output_embeddings(new)
    if tied:
        model.set_input_embeddings(QuantEmbedding(new, embedding.weight.dtype))
        model.config.tie_word_embeddings = False
    return new


def _layer_inputs(model: nn.Module, layers: nn.ModuleList, batches) -> list[tuple]:
    """The first decoder layer's positional and keyword inputs for each calibration batch."""

    class _Stop(Exception):
        pass

    captured = []

    def grab(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            for ids in batches:
                try:
                    model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if not captured:
        raise UserError("the calibration set is empty")
    return captured


def _gptq_sequential(model: nn.Module, batches, plans: dict[str, _Plan], cfg: QuantConfig,
                     progress: bool) -> None:
    """GPTQ layer by layer (spec §1.5): each decoder layer's input Hessians are collected on
    the calibration batches as they come out of the already-quantized layers before it; its
    linears are rounded and swapped; its quantized outputs feed the next layer."""
    from tqdm.auto import tqdm

    from pertoken.quant.gptq import HessianAccumulator, gptq_quantize

    layers, prefix = decoder_layers(model)
    inputs = _layer_inputs(model, layers, batches)
    for i, layer in enumerate(tqdm(layers, desc="gptq", unit="layer", disable=not progress)):
        names = [n for n in plans if n.startswith(f"{prefix}.{i}.")]
        firsts = sorted({plans[n].group for n in names})
        hessians = {n: HessianAccumulator(plans[n].weight.shape[1]) for n in firsts}
        handles = []
        for name in firsts:
            def hook(_module, args, name=name):
                hessians[name].add(plans[name].gptq_input(args[0]))

            handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        try:
            with torch.inference_mode():
                for args, kwargs in inputs:
                    layer(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        for name in names:
            q = gptq_quantize(plans[name].weight, hessians[plans[name].group].hessian,
                              cfg.w_bits, symmetric=cfg.weights == "gptq_sym")
            replace_linear(model, name, plans[name].build(_centred(q), cfg))
        with torch.inference_mode():
            outputs = []
            for args, kwargs in inputs:
                out = layer(*args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                if args:
                    outputs.append(((out,) + tuple(args[1:]), kwargs))
                else:
                    outputs.append(((), {**kwargs, "hidden_states": out}))
        inputs = outputs


def _smoothing(absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel factors ``a_j = max|X_j|^alpha / max|W_:j|^(1 - alpha)`` over
    the group's weights; the input is divided by them and the weights multiplied."""
    w_max = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    a = absmax.float().clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return a.clamp(min=1e-5)


def migrate_dynamic_inputs(model: nn.Module, groups: list[LinearGroup],
                           absmax: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Divide each dynamic group's input channels by SmoothQuant's factors ``a`` and multiply
    its weight's columns by them, exactly: the division is folded into the rows (and bias) of
    the feeder linear. Through grouped-query attention one factor serves a key-value channel
    and every query head that reads it (the maximum over those heads). Returns the factors
    per group (by its first linear). The float model's outputs do not change."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    factors = {}
    with torch.no_grad():
        for group in groups:
            if group.kind != "dynamic" or group.feeder is None:
                continue
            name = group.linears[0]
            linear, feeder = model.get_submodule(name), model.get_submodule(group.feeder)
            a = _smoothing(absmax[name], [linear.weight], alpha)
            if feeder.out_features != linear.in_features:  # grouped-query attention
                head_dim = feeder.out_features // kv_heads
                a = a.view(kv_heads, heads // kv_heads, head_dim).amax(dim=1)
                per_feeder = a.reshape(-1)
                a = a[:, None, :].expand(kv_heads, heads // kv_heads, head_dim).reshape(-1)
            else:
                per_feeder = a
            linear.weight.mul_(a.to(linear.weight.dtype)[None, :])
            feeder.weight.div_(per_feeder.to(feeder.weight.dtype)[:, None])
            if feeder.bias is not None:
                feeder.bias.div_(per_feeder.to(feeder.bias.dtype))
            factors[name] = a
    return factors


def quantize_model(model: nn.Module, batches: Iterable[torch.Tensor], cfg: QuantConfig,
                   progress: bool = True) -> dict:
    """Calibrate on ``batches`` (unpadded token-id tensors) and replace every decoder linear of
    ``model`` by a :class:`~pertoken.quant.qlinear.QuantLinear`, in place. Returns per
    calibrated group its scales (OutlierTune's and per-tensor's static scales, SmoothQuant's
    factors) and shifts, for the saved config and diagnostics."""
    cfg.validate()
    batches = list(batches)
    groups = linear_groups(model)
    if cfg.method in ("outliertune", "smoothquant"):
        calibrated = [g for g in groups if g.kind == "static"]
    elif cfg.method == "per-tensor":
        calibrated = groups
    else:
        calibrated = []
    migrated = [g for g in groups if g.kind == "dynamic" and g.feeder is not None] \
        if cfg.method == "outliertune" and cfg.dynamic_alpha is not None else []
    observed = [g.linears[0] for g in calibrated + migrated]
    stats = observe_inputs(model, observed, batches, progress) if observed else {}
    # the norm-fed inputs are the same before and after the migration, which preserves every
    # layer's output, so one calibration pass serves both
    migration = migrate_dynamic_inputs(
        model, migrated, {g.linears[0]: stats[g.linears[0]].absmax for g in migrated},
        cfg.dynamic_alpha) if migrated else {}
    folded, plans = {}, {}
    for group in groups:
        scale = shift = None
        if group in calibrated:
            st = stats[group.linears[0]]
            if cfg.method == "outliertune":
                shift = st.shift(cfg.shift_mode) if cfg.shift else None
                scale = st.scale(cfg.a_bits, shift)
            elif cfg.method == "per-tensor":
                scale = st.scale(cfg.a_bits).max().expand(st.channels).clone()
            else:
                scale = _smoothing(st.absmax, [model.get_submodule(n).weight
                                               for n in group.linears], cfg.smooth_alpha)
            folded[group.linears[0]] = {"linears": group.linears, "scale": scale,
                                        "shift": shift, "tokens": st.tokens}
        elif group.linears[0] in migration:
            folded[group.linears[0]] = {"linears": group.linears, "feeder": group.feeder,
                                        "migration": migration[group.linears[0]],
                                        "tokens": stats[group.linears[0]].tokens}
        for name in group.linears:
            linear = model.get_submodule(name)
            if scale is not None:
                w, b = fold_channel_scales(linear.weight, linear.bias, scale, shift)
            else:
                w = linear.weight.detach().float()
                b = None if linear.bias is None else linear.bias.detach()
            if cfg.method == "weight-only":
                act = "none"
            elif scale is not None and cfg.method != "smoothquant":
                act = "static"
            else:
                act = "per-token"
            plans[name] = _Plan(w, b, act, None if scale is None else 1 / scale, shift,
                                group.linears[0])
    if cfg.weights in ("gptq", "gptq_sym"):
        _gptq_sequential(model, batches, plans, cfg, progress)
    else:
        for name, plan in plans.items():
            replace_linear(model, name, plan.build(_weight(plan.weight, cfg), cfg))
    link_shared_codes(model)
    link_fused_blocks(model)
    if cfg.head:
        quantize_head(model)
    log.info("%s W%dA%d: %d linears quantized (%d calibrated groups)", cfg.method, cfg.w_bits,
             cfg.a_bits, sum(len(g.linears) for g in groups), len(calibrated))
    return folded
