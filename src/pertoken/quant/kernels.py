"""Fused versions of the elementwise work around the integer GEMM, compiled by
``torch.compile`` (inductor's C++ backend), for speed.

Eager torch runs an activation quantizer as four to six passes over the input (scale, round,
clamp, cast; a row maximum first for per-token codes) and the epilogue as two to four passes
over the output; at SmolLM2's width that costs about as much as the GEMM itself. Compiled, each
becomes one or two loops. The eager functions in :mod:`pertoken.quant.quantizers` and
:func:`pertoken.quant.qlinear.epilogue` stay the definition (and the default); the compiled
ones compute the same formulas, so codes agree except, rarely, by one at an exact rounding tie
(a fused multiply-add may round differently).

Off by default: compiling takes a minute or two the first time (one graph per quantizer and
epilogue variant, shared by every layer and token count), and it needs a C++ compiler. Turn it
on with :func:`use_compiled_kernels` or ``PERTOKEN_QUANT_COMPILE=1``.

Hand-written glue only: the fusion itself is inductor's.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch

from pertoken.quant.quantizers import EPS, code_range

log = logging.getLogger(__name__)

_state = {"on": os.environ.get("PERTOKEN_QUANT_COMPILE", "") == "1", "fns": {}}


def use_compiled_kernels(on: bool = True) -> bool:
    """Switch the compiled kernels on or off for every :class:`QuantLinear`; returns whether
    they are on (False when no C++ compiler is found)."""
    if on and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        log.warning("no C++ compiler found: quantized linears stay on eager kernels")
        on = False
    _state["on"] = on
    return on


MIN_ROWS = 16
"""below this many rows (one-token decoding) a compiled kernel's call overhead outweighs what
it saves, and the eager definitions run even with the compiled kernels on"""


def compiled_kernels_on(rows: int | None = None) -> bool:
    """Whether the compiled kernels are on (for ``rows`` rows, if given: see
    :data:`MIN_ROWS`)."""
    return _state["on"] and (rows is None or rows >= MIN_ROWS)


def _as_codes(u, unsigned: bool):
    """Rounded values in the code range as int8, or, for oneDNN, as the unsigned bytes
    ``code + 128``."""
    return (u + 128).to(torch.uint8) if unsigned else u.to(torch.int8)


def _static_rounded(x, inv_scale, shift, lo: int, hi: int):
    u = torch.addcmul(shift * -inv_scale, x, inv_scale) if shift is not None else x * inv_scale
    return u.clamp(lo, hi).round()


def _per_token_rounded(x, lo: int, hi: int):
    """Per-token codes (before the cast) and scales; the codes multiply by each row's
    reciprocal scale rather than divide by the scale (a division per element is the costliest
    step of the loop), which can move a value at an exact rounding tie by one code."""
    scale = x.abs().amax(dim=-1).clamp(min=EPS) / hi
    return (x * (1 / scale)[:, None]).clamp(lo, hi).round(), scale


def _static(x, inv_scale, shift, lo: int, hi: int, unsigned: bool = False):
    return _as_codes(_static_rounded(x, inv_scale, shift, lo, hi), unsigned)


def _per_token(x, lo: int, hi: int, unsigned: bool = False):
    u, scale = _per_token_rounded(x, lo, hi)
    return _as_codes(u, unsigned), scale


def _rms_norm(x, weight, eps: float):
    """Llama's RMSNorm (HF's ``LlamaRMSNorm`` on float32 input)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rms_norm_static(x, weight, eps: float, inv_scale, shift, lo: int, hi: int,
                     unsigned: bool = False):
    y = _rms_norm(x, weight, eps)
    return y, _static(y, inv_scale, shift, lo, hi, unsigned)


def _minus_zero_term(y, rowsum, zero_scale):
    """``y - rowsum ⊗ zero_scale``: an asymmetric weight's zero-point term, from the row sums
    of the codes (None: a symmetric weight)."""
    return y - rowsum[..., None] * zero_scale if rowsum is not None else y


def _row_sums(u, wanted: bool):
    """The row sums of the signed codes ``u`` (float, exact: far below 2^24), if wanted."""
    return u.sum(-1) if wanted else None


def _silu_mul_codes(gate_up, rowsum, zero_scale, inv_scale, lo: int, hi: int, unsigned: bool,
                    want_rowsum: bool):
    gate_up = _minus_zero_term(gate_up, rowsum, zero_scale)
    half = gate_up.shape[-1] // 2
    h = torch.nn.functional.silu(gate_up[:, :half]) * gate_up[:, half:]
    if inv_scale is not None:
        h = h * inv_scale
    u, scale = _per_token_rounded(h, lo, hi)
    return _as_codes(u, unsigned), scale, _row_sums(u, want_rowsum)


def _rope_qkv(qkv, rowsum, zero_scale, cos, sin, heads: int, kv_heads: int):
    batch, tokens, width = qkv.shape
    dim = width // (heads + 2 * kv_heads)
    qkv = _minus_zero_term(qkv, rowsum, zero_scale)
    x = qkv.view(batch, tokens, heads + 2 * kv_heads, dim).transpose(1, 2)
    c, s = cos[:, None], sin[:, None]
    half = dim // 2

    def rotated(t):  # t * cos + rotate_half(t) * sin, each half written out (no cat buffer)
        first, second = t[..., :half], t[..., half:]
        return torch.cat((first * c[..., :half] + -second * s[..., :half],
                          second * c[..., half:] + first * s[..., half:]), dim=-1)

    q = rotated(x[:, :heads]).contiguous()
    k = rotated(x[:, heads:heads + kv_heads]).contiguous()
    return q, k, x[:, heads + kv_heads:].contiguous()


def _rms_norm_codes(x, weight, eps: float, inv_scale, shift, lo: int, hi: int,
                    want_rowsum: bool):
    u = _static_rounded(_rms_norm(x, weight, eps), inv_scale, shift, lo, hi)
    return _as_codes(u, True), _row_sums(u, want_rowsum)


def _add_scaled(residual, y, rowsum, zero_scale, token_scale, bias):
    y = _minus_zero_term(y, rowsum, zero_scale) * token_scale[:, None]
    return residual + (y + bias if bias is not None else y)


def _add_rms_norm_codes(residual, y, rowsum, zero_scale, token_scale, bias, weight, eps: float,
                        inv_scale, shift, lo: int, hi: int, want_rowsum: bool):
    h = _add_scaled(residual, y, rowsum, zero_scale, token_scale, bias)
    return (h, *_rms_norm_codes(h, weight, eps, inv_scale, shift, lo, hi, want_rowsum))


def _heads_per_token(attn, inv_scale, lo: int, hi: int, want_rowsum: bool):
    batch, heads, tokens, dim = attn.shape
    x = attn.transpose(1, 2).reshape(batch * tokens, heads * dim)
    if inv_scale is not None:
        x = x * inv_scale
    u, scale = _per_token_rounded(x, lo, hi)
    return _as_codes(u, True), scale, _row_sums(u, want_rowsum)


def _epilogue(acc, token_scale, weight_scale, bias):
    y = acc.float()
    if token_scale is not None:
        y = y * token_scale[:, None]
    y = y * weight_scale
    return y + bias if bias is not None else y


def _compiled(name: str, fn, dynamic: bool | None = True):
    """``fn`` compiled once per process. ``dynamic=None`` leaves dynamo to make only the
    dimensions that change between calls symbolic (the token count), which keeps the widths
    constant and the loops over them vectorized; a kernel compiled so must be keyed by its
    widths (``name``) so that one graph never sees two."""
    fns = _state["fns"]
    if name not in fns:
        fns[name] = torch.compile(fn, dynamic=dynamic)
    return fns[name]


def static_codes(x: torch.Tensor, inv_scale: torch.Tensor, bits: int,
                 shift: torch.Tensor | None = None, unsigned: bool = False) -> torch.Tensor:
    """:func:`pertoken.quant.quantizers.static_codes`, fused (``unsigned``: as the bytes
    ``code + 128``)."""
    return _compiled("static", _static)(x, inv_scale, shift, *code_range(bits), unsigned)


def per_token_codes(x: torch.Tensor, bits: int,
                    unsigned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pertoken.quant.quantizers.per_token_codes`, fused (``unsigned``: as the bytes
    ``code + 128``)."""
    return _compiled("per_token", _per_token)(x, *code_range(bits), unsigned)


def rms_norm_static_codes(x: torch.Tensor, weight: torch.Tensor, eps: float,
                          inv_scale: torch.Tensor, bits: int,
                          shift: torch.Tensor | None = None, unsigned: bool = False):
    """A Llama RMSNorm of ``x`` (tokens, d) in float32 and the static codes of its output, in
    one fused pass: ``(y, static_codes(y, inv_scale, bits, shift))``; with ``unsigned`` the
    codes come as the bytes ``code + 128`` that oneDNN's GEMM reads."""
    return _compiled("rms_static", _rms_norm_static)(x, weight, eps, inv_scale, shift,
                                                     *code_range(bits), unsigned)


def silu_mul_per_token_codes(gate_up: torch.Tensor, inv_scale: torch.Tensor | None, bits: int,
                             unsigned: bool = False):
    """SwiGLU's product ``silu(gate) * up`` (times ``inv_scale``, SmoothQuant's migration) of
    the side-by-side ``[gate | up]`` outputs, quantized per token, fused:
    ``per_token_codes(silu(g) * u * inv_scale, bits)`` (``unsigned``: as the bytes
    ``code + 128``)."""
    silu_mul = _compiled(f"silu_mul_{gate_up.shape[-1]}", _silu_mul_codes, dynamic=None)
    codes, scale, _ = silu_mul(gate_up, None, None, inv_scale, *code_range(bits), unsigned,
                               False)
    return codes, scale


def _onednn_linear(codes, packed, scale, zeros, bias):
    return torch.ops.onednn.qlinear_pointwise(codes, 1.0, 128, packed, scale, zeros, bias,
                                              1.0, 0, torch.float32, "none", [], "")


def _onednn_linear_shape(codes, packed, scale, zeros, bias):
    return codes.new_empty((codes.shape[0], scale.shape[0]), dtype=torch.float32)


# oneDNN's int8 GEMM (``torch.ops.onednn.qlinear_pointwise``) on the bytes ``code + 128`` and
# a prepacked weight, in float32: ``(codes @ W^T) * scale + bias``, as an opaque op, so that a
# compiled graph can call it with the weight as an input (inductor's own lowering of the op
# wants the weight frozen into the graph as a constant). Defined with the plain operator
# registry rather than ``torch.library.custom_op``, whose wrapper costs ~0.1 ms a call.
_library = torch.library.Library("pertoken", "DEF")
_library.define("onednn_linear(Tensor codes, Tensor packed, Tensor scale, Tensor zeros, "
                "Tensor? bias) -> Tensor")
_library.impl("onednn_linear", _onednn_linear, "CompositeExplicitAutograd")
torch.library.register_fake("pertoken::onednn_linear", _onednn_linear_shape, lib=_library)
onednn_linear = torch.ops.pertoken.onednn_linear


def _gemm(codes, gemm, bias: bool = False):
    """``gemm`` (packed weight, scales, zeros, bias, zero-point scales: see
    :meth:`pertoken.quant.qlinear.OnednnWeights.tensors`) on ``codes``, its bias added only if
    ``bias``; the zero-point term is left to the caller."""
    packed, scale, zeros, gemm_bias, _ = gemm
    return onednn_linear(codes, packed, scale, zeros, gemm_bias if bias else None)


def _layer_qkv(x, weight, eps: float, inv_scale, shift, lo: int, hi: int, gemm, heads: int,
               kv_heads: int, cos, sin):
    batch, tokens, width = x.shape
    zero_scale = gemm[4]
    codes, rowsum = _rms_norm_codes(x.reshape(-1, width), weight, eps, inv_scale, shift, lo,
                                    hi, zero_scale is not None)
    qkv = _gemm(codes, gemm, bias=True).view(batch, tokens, -1)
    rowsum = rowsum.view(batch, tokens) if rowsum is not None else None
    return _rope_qkv(qkv, rowsum, zero_scale, cos, sin, heads, kv_heads)


def _layer_rest(x, attn, o_proj, o_inv_scale, o_bias, o_lo: int, o_hi: int, weight,
                eps: float, gate_inv_scale, gate_shift, gate_lo: int, gate_hi: int, gate_up,
                down_inv_scale, down_lo: int, down_hi: int, down, down_bias):
    flat = x.reshape(-1, x.shape[-1])
    codes, token_scale, rowsum = _heads_per_token(attn, o_inv_scale, o_lo, o_hi,
                                                  o_proj[4] is not None)
    h, codes, rowsum = _add_rms_norm_codes(
        flat, _gemm(codes, o_proj), rowsum, o_proj[4], token_scale, o_bias, weight, eps,
        gate_inv_scale, gate_shift, gate_lo, gate_hi, gate_up[4] is not None)
    codes, token_scale, rowsum = _silu_mul_codes(
        _gemm(codes, gate_up, bias=True), rowsum, gate_up[4], down_inv_scale, down_lo, down_hi,
        True, down[4] is not None)
    return _add_scaled(h, _gemm(codes, down), rowsum, down[4], token_scale,
                       down_bias).view(x.shape)


# Query rows per call of :func:`causal_attention` (0: one call).
ATTENTION_BLOCK = 64


def attends_in_blocks(tokens: int) -> bool:
    """Whether :func:`causal_attention` splits ``tokens`` queries into blocks (two blocks'
    worth or more); else it is one causal SDPA call."""
    return bool(ATTENTION_BLOCK) and tokens >= 2 * ATTENTION_BLOCK


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """Causal SDPA of ``q`` (batch, heads, T, dim) over ``k``, ``v`` (batch, kv_heads, T, dim)
    (grouped-query attention if fewer kv heads), as blocks of :data:`ATTENTION_BLOCK` query
    rows, each over the keys up to its last row with its rows of the causal mask: on this CPU,
    SDPA's kernel runs the blocks of a 512-token prefill 10-15% faster than the whole causal
    square (4-9% of a W8A8 prefill). The blocking is hand-written; the attention is PyTorch's
    SDPA."""
    tokens, block = q.shape[2], ATTENTION_BLOCK
    if not attends_in_blocks(tokens):
        return _sdpa(q, k, v, scaling)
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for start in range(0, tokens, block):
        end = min(start + block, tokens)
        # additive: -inf where key j lies after query start + i
        mask = torch.full((end - start, end), float("-inf"), dtype=q.dtype,
                          device=q.device).triu_(start + 1)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=mask, scale=scaling,
            enable_gqa=gqa))
    return torch.cat(outs, 2)


def _sdpa(q, k, v, scaling: float):
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])


def _layer_sdpa_rest(x, q, k, v, scaling: float, rest):
    return _layer_rest(x, _sdpa(q, k, v, scaling), *rest)


def _layer_attn_rest(x, attn, rest):
    return _layer_rest(x, attn, *rest)


# The same, then the next layer's attention inputs from the output: one graph fewer a layer.
def _layer_sdpa_rest_qkv(x, q, k, v, scaling: float, rest, next_qkv, cos, sin):
    out = _layer_rest(x, _sdpa(q, k, v, scaling), *rest)
    return (out, *_layer_qkv(out, *next_qkv, cos, sin))


def _layer_attn_rest_qkv(x, attn, rest, next_qkv, cos, sin):
    out = _layer_rest(x, attn, *rest)
    return (out, *_layer_qkv(out, *next_qkv, cos, sin))


# The parts of the fused decoder layer (:mod:`pertoken.quant.fused`), each one compiled graph
# around oneDNN's GEMMs (a function of its own for each variant: dynamo bounds the graphs one
# function may hold). A ``gemm`` is the tuple of
# :meth:`pertoken.quant.qlinear.OnednnWeights.tensors`; codes go to it as oneDNN's bytes
# ``code + 128``; an asymmetric weight's zero-point term ``rowsum(codes) ⊗ zero * step`` is
# subtracted in the loop that reads the GEMM's output, from row sums the quantizer before it
# computes on the way.
def _qkv_args(qkv: tuple) -> tuple:
    weight, eps, inv_scale, shift, bits, gemm, heads, kv_heads = qkv
    return (weight, eps, inv_scale, shift, *code_range(bits), gemm, heads, kv_heads)


def _qkv_widths(x: torch.Tensor, qkv: tuple) -> str:
    return f"{x.shape[-1]}_{qkv[5][1].shape[0]}_{qkv[6]}_{qkv[7]}"


def layer_qkv(x: torch.Tensor, qkv: tuple, cos: torch.Tensor, sin: torch.Tensor):
    """The attention inputs of a Llama decoder layer from its input ``x`` (batch, tokens, d):
    the input RMSNorm and its static codes, q/k/v as one GEMM, then the head split and the
    rotary embedding (``cos``, ``sin``: (batch, tokens, dim)) with the formulas of HF's
    ``apply_rotary_pos_emb``; ``(q, k, v)``, each a contiguous (batch, heads, tokens, dim)
    tensor (the layout SDPA runs fastest on). ``qkv`` is ``(norm weight, eps, inv_scale,
    shift or None, bits, gemm, heads, kv_heads)``: the norm's, the q/k/v group's quantizer's,
    its GEMM, and the attention's head counts."""
    return _compiled(f"layer_qkv_{_qkv_widths(x, qkv)}", _layer_qkv, dynamic=None)(
        x, *_qkv_args(qkv), cos, sin)


def layer_rest(x: torch.Tensor, attn: torch.Tensor | tuple, rest: tuple,
               scaling: float | None = None, next_qkv: tuple | None = None,
               cos: torch.Tensor | None = None, sin: torch.Tensor | None = None):
    """The rest of a Llama decoder layer with input ``x``: from the attention output ``attn``
    (batch, heads, tokens, dim), or from ``attn = (q, k, v)`` through causal SDPA
    (``scaling``) first, o_proj's per-token codes read straight from the heads and its GEMM,
    the residual connection, the post-attention RMSNorm and the gate/up codes, gate/up as one
    GEMM, SwiGLU's product and down_proj's per-token codes, down_proj's GEMM, and the second
    residual connection: the layer's output. ``rest`` is ``(o_proj gemm, o_proj inv_scale or
    None, o_proj bias or None, o_proj bits, norm weight, eps, gate inv_scale, gate shift or
    None, gate bits, gate/up gemm, down inv_scale or None, down bits, down gemm, down bias or
    None)``. With ``next_qkv`` (:func:`layer_qkv`'s argument for the next layer, and its
    ``cos``, ``sin``), ``(output, *layer_qkv(output, next_qkv, cos, sin))`` from one graph."""
    (o_gemm, o_inv, o_bias, o_bits, weight, eps, gate_inv, gate_shift, gate_bits, gate_up,
     down_inv, down_bits, down, down_bias) = rest
    rest = (o_gemm, o_inv, o_bias, *code_range(o_bits), weight, eps, gate_inv, gate_shift,
            *code_range(gate_bits), gate_up, down_inv, *code_range(down_bits), down, down_bias)
    sdpa = isinstance(attn, tuple)
    head = (*attn, scaling) if sdpa else (attn,)
    widths = f"{x.shape[-1]}_{gate_up[1].shape[0]}" + ("" if sdpa else f"_{attn.shape[1]}")
    if next_qkv is None:
        fn = _layer_sdpa_rest if sdpa else _layer_attn_rest
        return _compiled(f"{fn.__name__}_{widths}", fn, dynamic=None)(x, *head, rest)
    fn = _layer_sdpa_rest_qkv if sdpa else _layer_attn_rest_qkv
    return _compiled(f"{fn.__name__}_{widths}_{_qkv_widths(x, next_qkv)}", fn, dynamic=None)(
        x, *head, rest, _qkv_args(next_qkv), cos, sin)


def epilogue(acc: torch.Tensor, token_scale: torch.Tensor | None, weight_scale: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`pertoken.quant.qlinear.epilogue`, fused."""
    return _compiled("epilogue", _epilogue)(acc, token_scale, weight_scale, bias)
