"""Fused blocks around the integer linears of a Llama-family decoder layer, for speed.

With the compiled kernels on (:func:`pertoken.quant.kernels.use_compiled_kernels`) and enough
tokens for oneDNN's GEMM (a prefill):

- a whole ``LlamaDecoderLayer`` whose linears are all quantized (q/k/v and gate/up as static
  groups, o_proj and down_proj per token) runs as two compiled graphs around the KV cache's
  update (:func:`pertoken.quant.kernels.layer_qkv` and :func:`~pertoken.quant.kernels.layer_rest`):
  the input RMSNorm and the q/k/v codes in one loop; q/k/v as one GEMM; the head split and the
  rotary embedding in one loop that writes the contiguous heads SDPA runs fastest on; then
  causal SDPA (with two blocks of query rows or more, blockwise between the two graphs:
  :func:`pertoken.quant.kernels.causal_attention`); o_proj's per-token codes read straight
  from the heads; o_proj's GEMM; the residual connection, the post-attention RMSNorm and the
  gate/up codes in one loop; gate/up as one GEMM; SwiGLU's product and down_proj's codes in
  one loop; down_proj's GEMM; its token scales and the residual connection in one loop.
  Codes go to oneDNN as its unsigned bytes directly;
  asymmetric weights' zero-point terms are subtracted in the loop that reads each GEMM's
  output, from row sums the quantizer before it computed. With an attention mask, a cache
  with more keys than queries or another attention implementation, HF's attention runs
  between the two graphs. The second graph also computes the next layer's q/k/v from the
  output, which that layer takes when it gets that very output (no forward hooks on either
  layer): one graph fewer a layer. Forward hooks on the layer's submodules do not fire on
  this path (the layer's own do);
- elsewhere, an RMSNorm that feeds a static group computes its output and the group's codes in
  one loop and hands the codes to the group, and the MLP runs gate/up as one GEMM, then SwiGLU
  and ``down_proj``'s quantizer as one loop.

All compute the formulas of the unfused modules (HF's RMSNorm, rotary embedding, attention
and ``LlamaMLP``, then the quantizers), so outputs agree to float rounding. The original
forwards run whenever the compiled kernels are off, the inputs are not float32 CPU tensors,
the GEMM backend is not oneDNN (one-token decoding) or attention weights are asked for.
Hand-written glue: the fusion itself is inductor's.
"""

from __future__ import annotations

import sys
import types
import weakref

import torch
from torch import nn

from pertoken.quant import kernels
from pertoken.quant.qlinear import QuantLinear, _onednn_weights, gemm_backend


def _is_rms_norm(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(getattr(module, "weight", None), torch.Tensor))


def _norm_forward(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    group = norm._pertoken_group
    if not (kernels.compiled_kernels_on(x.numel() // x.shape[-1]) and x.dtype == torch.float32
            and not x.is_cuda and norm.weight.dtype == torch.float32):
        return type(norm).forward(norm, x)
    lead: QuantLinear = group.layers[0]
    flat = x.reshape(-1, x.shape[-1])
    y, codes = kernels.rms_norm_static_codes(
        flat, norm.weight, norm.variance_epsilon, lead.inv_scale, lead.a_bits,
        lead.shift if lead.shift.numel() else None,
        unsigned=gemm_backend(x.device, flat.shape[0]) == "onednn")
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
    gate_up = _onednn_weights(group, group.layers)(*gate.input_codes(x, flat, True))
    codes, scale = kernels.silu_mul_per_token_codes(
        gate_up, down.inv_scale if down.inv_scale.numel() else None, down.a_bits, unsigned=True)
    y = _onednn_weights(down, [down])(codes, scale)
    return y.view(*x.shape[:-1], down.out_features)


def _optional(t: torch.Tensor) -> torch.Tensor | None:
    return t if t.numel() else None


def _layer_forward(layer: nn.Module, hidden_states: torch.Tensor,
                   attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, cache=None,
                   use_cache: bool | None = False,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                   **kwargs):
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    x = hidden_states
    stash = vars(layer).pop("_pertoken_stash", None)
    if not (kernels.compiled_kernels_on(x.numel() // x.shape[-1])
            and x.dtype == torch.float32 and x.dim() == 3
            and position_embeddings is not None and not kwargs.get("output_attentions")
            and gemm_backend(x.device, x.shape[0] * x.shape[1]) == "onednn"):
        return type(layer).forward(layer, hidden_states, attention_mask=attention_mask,
                                   position_ids=position_ids, cache=cache, use_cache=use_cache,
                                   position_embeddings=position_embeddings, **kwargs)
    attn = layer.self_attn
    if (stash is not None and stash[0] is hidden_states and stash[1] is position_embeddings
            and _hookless(layer)):
        query, key, value = stash[2:]  # computed by the layer before, from this very input
    else:
        query, key, value = kernels.layer_qkv(x, _qkv_args(layer), *position_embeddings)
    attn_kwargs = {"position_ids": position_ids, "use_cache": use_cache, **kwargs}
    if cache is not None:
        key, value = cache.update(key, value, attn.layer_idx, kwargs=attn_kwargs)
    if (attention_mask is None and attn.config._attn_implementation == "sdpa"
            and query.shape[2] == key.shape[2]):
        if kernels.attends_in_blocks(query.shape[2]):
            out = kernels.causal_attention(query, key, value, attn.scaling)  # between graphs
        else:
            out = (query, key, value)  # causal SDPA inside the compiled kernel
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                       attn._pertoken_eager)
        out, _ = attend(attn, query, key, value, attention_mask, dropout=0.0,
                        scaling=attn.scaling, **attn_kwargs)
        out = out.transpose(1, 2)  # HF returns (batch, tokens, heads, dim)
    following = vars(layer).get("_pertoken_next")
    following = following() if following is not None else None
    if following is None or not (_hookless(layer) and _hookless(following)):
        return kernels.layer_rest(x, out, _rest_args(layer), attn.scaling)
    # The next layer's q/k/v from this layer's output in the same graph, handed over for its
    # call, which takes them if that output reaches it untouched (no hooks in between).
    y, *qkv = kernels.layer_rest(x, out, _rest_args(layer), attn.scaling, _qkv_args(following),
                                 *position_embeddings)
    vars(following)["_pertoken_stash"] = (y, position_embeddings, *qkv)
    return y


def _qkv_args(layer: nn.Module) -> tuple:
    """:func:`pertoken.quant.kernels.layer_qkv`'s ``qkv`` argument for ``layer``."""
    attn, norm = layer.self_attn, layer.input_layernorm
    group = attn.q_proj.shared
    first = group.layers[0]
    return (norm.weight, norm.variance_epsilon, first.inv_scale, _optional(first.shift),
            first.a_bits, _onednn_weights(group, group.layers).tensors(),
            attn.config.num_attention_heads, attn.config.num_key_value_heads)


def _rest_args(layer: nn.Module) -> tuple:
    """:func:`pertoken.quant.kernels.layer_rest`'s ``rest`` argument for ``layer``."""
    o_proj, mlp, norm = layer.self_attn.o_proj, layer.mlp, layer.post_attention_layernorm
    group, down = mlp.gate_proj.shared, mlp.down_proj
    gate = group.layers[0]
    return (_onednn_weights(o_proj, [o_proj]).tensors(), _optional(o_proj.inv_scale),
            _optional(o_proj.bias), o_proj.a_bits, norm.weight, norm.variance_epsilon,
            gate.inv_scale, _optional(gate.shift), gate.a_bits,
            _onednn_weights(group, group.layers).tensors(), _optional(down.inv_scale),
            down.a_bits, _onednn_weights(down, [down]).tensors(), _optional(down.bias))


def _hookless(layer: nn.Module) -> bool:
    """Whether no forward hook can change ``layer``'s input or output (its own or global)."""
    from torch.nn.modules import module

    return not (layer._forward_hooks or layer._forward_pre_hooks
                or module._global_forward_hooks or module._global_forward_pre_hooks)


def _fusable_layer(layer: nn.Module):
    """The eager attention function of ``layer``'s modeling module if ``layer`` is a Llama
    decoder layer whose whole forward can run fused (RMSNorms, q/k/v and gate/up as linked
    static groups, o_proj and down_proj per-token, SiLU, and the attention's own fields: no
    extra submodules such as q/k norms), else None."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if type(attn).__name__ != "LlamaAttention" or mlp is None:
        return None
    norms = (getattr(layer, "input_layernorm", None),
             getattr(layer, "post_attention_layernorm", None))
    q, k, v, o = (getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    eager = getattr(sys.modules.get(type(attn).__module__), "eager_attention_forward", None)
    fusable = (all(n is not None and _is_rms_norm(n) for n in norms) and _fusable_mlp(mlp)
               and all(isinstance(m, QuantLinear) for m in (q, k, v, o))
               and q.act == mlp.gate_proj.act == "static" and o.act == "per-token"
               and q.shared is not None and q.shared.layers == [q, k, v] and o.shared is None
               and {n for n, _ in attn.named_children()}
                   == {"q_proj", "k_proj", "v_proj", "o_proj"}
               and hasattr(attn, "config") and hasattr(attn, "scaling"))
    return eager if fusable else None


def _fusable_mlp(mlp: nn.Module) -> bool:
    """Whether ``mlp`` is a SwiGLU MLP whose gate/up are one linked group and whose down_proj
    quantizes per token: what :func:`_mlp_forward` (and the fused layer) run."""
    gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    act = getattr(mlp, "act_fn", None)
    return (isinstance(gate, QuantLinear) and isinstance(up, QuantLinear)
            and isinstance(down, QuantLinear) and gate.shared is not None
            and gate.shared.layers == [gate, up] and down.act == "per-token"
            and down.shared is None
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"))


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
        eager = _fusable_layer(layer)
        if eager is not None:
            attn._pertoken_eager = eager
            layer.forward = types.MethodType(_layer_forward, layer)
            fused += 1
        if _fusable_mlp(mlp):
            mlp.forward = types.MethodType(_mlp_forward, mlp)
            fused += 1
    for stack in model.modules():  # a fused layer computes the q/k/v of the one it feeds
        if isinstance(stack, nn.ModuleList):
            for layer, following in zip(stack, stack[1:]):
                if _runs_fused(layer) and _runs_fused(following):
                    layer._pertoken_next = weakref.ref(following)
    return fused


def _runs_fused(layer: nn.Module) -> bool:
    forward = vars(layer).get("forward")
    return getattr(forward, "__func__", None) is _layer_forward
