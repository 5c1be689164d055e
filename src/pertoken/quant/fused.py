"""Fused blocks around the integer linears of a Llama-family decoder layer, for speed.

With the compiled kernels on (:func:`pertoken.quant.kernels.use_compiled_kernels`):

- an RMSNorm that feeds a static group (``input_layernorm`` -> q/k/v,
  ``post_attention_layernorm`` -> gate/up) computes its output and the group's activation codes
  in one compiled loop, and hands the codes to the group (which then skips its quantizer);
- the MLP runs gate/up as one oneDNN GEMM, SwiGLU's product and the per-token quantizer of
  ``down_proj``'s input as one compiled loop, and ``down_proj`` on those codes.

Both compute the same formulas as the unfused modules (HF's RMSNorm and ``LlamaMLP``, then
the quantizers), so outputs agree to float rounding. The original forwards run whenever the
compiled kernels are off, the inputs are not float32 CPU tensors, or the GEMM backend is not
oneDNN (the MLP). Hand-written glue: the fusion itself is inductor's.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from pertoken.quant import kernels
from pertoken.quant.qlinear import QuantLinear, _onednn_weights, gemm_backend


def _is_rms_norm(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(getattr(module, "weight", None), torch.Tensor))


def _norm_forward(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    group = norm._pertoken_group
    if not (kernels.compiled_kernels_on() and x.dtype == torch.float32 and not x.is_cuda
            and norm.weight.dtype == torch.float32):
        return type(norm).forward(norm, x)
    lead: QuantLinear = group.layers[0]
    y, codes = kernels.rms_norm_static_codes(
        x.reshape(-1, x.shape[-1]), norm.weight, norm.variance_epsilon, lead.inv_scale,
        lead.a_bits, lead.shift if lead.shift.numel() else None)
    out = y.view(x.shape)
    group.prime(out, codes)
    return out


def _mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, down = mlp.gate_proj, mlp.down_proj
    group = gate.shared
    if not (kernels.compiled_kernels_on() and x.dtype == torch.float32
            and gemm_backend(x.device, x.numel() // x.shape[-1]) == "onednn"):
        return type(mlp).forward(mlp, x)
    flat = x.reshape(-1, gate.in_features)
    gate_up = _onednn_weights(group, group.layers)(*gate.input_codes(x, flat))
    codes, scale = kernels.silu_mul_per_token_codes(
        gate_up, down.inv_scale if down.inv_scale.numel() else None, down.a_bits)
    y = _onednn_weights(down, [down])(codes, scale)
    return y.view(*x.shape[:-1], down.out_features)


def link_fused_blocks(model: nn.Module) -> int:
    """Install the fused forwards on every Llama-family decoder layer whose groups are linked
    (:func:`pertoken.quant.qlinear.link_shared_codes` first); returns how many modules got
    one. Only those instances change, not their classes."""
    fused = 0
    for layer in model.modules():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            continue
        pairs = [(getattr(layer, "input_layernorm", None), getattr(attn, "q_proj", None)),
                 (getattr(layer, "post_attention_layernorm", None),
                  getattr(mlp, "gate_proj", None))]
        for norm, first in pairs:
            if (norm is not None and _is_rms_norm(norm) and isinstance(first, QuantLinear)
                    and first.shared is not None and first.act == "static"):
                norm._pertoken_group = first.shared
                norm.forward = types.MethodType(_norm_forward, norm)
                fused += 1
        gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
        act = getattr(mlp, "act_fn", None)
        if (isinstance(gate, QuantLinear) and isinstance(up, QuantLinear)
                and isinstance(down, QuantLinear) and gate.shared is not None
                and gate.shared.layers == [gate, up] and down.act == "per-token"
                and down.shared is None
                and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation")):
            mlp.forward = types.MethodType(_mlp_forward, mlp)
            fused += 1
    return fused
