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
    scale = x.abs().amax(dim=-1).clamp(min=EPS) / hi
    return (x / scale[:, None]).clamp(lo, hi).round(), scale


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

    def rotated(t):
        return t * c + torch.cat((-t[..., dim // 2:], t[..., :dim // 2]), dim=-1) * s

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
    codes, scale, _ = silu_mul_codes(gate_up, None, inv_scale, bits, unsigned)
    return codes, scale


# The kernels of the fused decoder layer (:mod:`pertoken.quant.fused`). Codes come as oneDNN's
# bytes ``code + 128``. A ``zero`` argument is ``(rowsum, zero_scale)`` for a GEMM output whose
# asymmetric weights' zero-point term ``rowsum ⊗ zero_scale`` is still to be subtracted (the
# row sums of its input codes, the weights' ``zero * step``), or None; ``want_rowsum`` makes a
# quantizer also return the row sums of its codes, for the GEMM it feeds.
def silu_mul_codes(gate_up: torch.Tensor, zero, inv_scale: torch.Tensor | None, bits: int,
                   unsigned: bool = True, want_rowsum: bool = False):
    """:func:`silu_mul_per_token_codes` of ``gate_up`` less its zero-point term: ``(codes,
    token scales, row sums or None)``."""
    rowsum, zero_scale = zero or (None, None)
    return _compiled(f"silu_mul_{gate_up.shape[-1]}", _silu_mul_codes, dynamic=None)(
        gate_up, rowsum, zero_scale, inv_scale, *code_range(bits), unsigned, want_rowsum)


def rope_qkv(qkv: torch.Tensor, zero, cos: torch.Tensor, sin: torch.Tensor, heads: int,
             kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The side-by-side ``[q | k | v]`` projections (batch, tokens, (heads + 2 kv_heads) dim),
    less their zero-point term, split into heads, with Llama's rotary embedding (``cos``,
    ``sin``: (batch, tokens, dim)) applied to q and k, in one pass that writes each as a
    contiguous (batch, heads, tokens, dim) tensor (the layout SDPA runs fastest on): the
    formulas of HF's ``apply_rotary_pos_emb``."""
    rowsum, zero_scale = zero or (None, None)
    name = f"rope_qkv_{qkv.shape[-1]}_{cos.shape[-1]}_{heads}_{kv_heads}"
    return _compiled(name, _rope_qkv, dynamic=None)(
        qkv, None if rowsum is None else rowsum.view(qkv.shape[:-1]), zero_scale, cos, sin,
        heads, kv_heads)


def rms_norm_codes(x: torch.Tensor, weight: torch.Tensor, eps: float, inv_scale: torch.Tensor,
                   bits: int, shift: torch.Tensor | None = None, want_rowsum: bool = False):
    """The static codes of a Llama RMSNorm of ``x`` (tokens, d) in float32, in one pass (the
    normalized values themselves are not kept): ``(codes, row sums or None)``."""
    return _compiled(f"rms_codes_{x.shape[-1]}", _rms_norm_codes, dynamic=None)(
        x, weight, eps, inv_scale, shift, *code_range(bits), want_rowsum)


def add_rms_norm_codes(residual: torch.Tensor, y: torch.Tensor, zero,
                       token_scale: torch.Tensor, bias: torch.Tensor | None,
                       weight: torch.Tensor, eps: float, inv_scale: torch.Tensor, bits: int,
                       shift: torch.Tensor | None = None, want_rowsum: bool = False):
    """A residual connection followed by a Llama RMSNorm and its static codes, in one pass:
    ``h = residual + (y - zero term) * token_scale[:, None] + bias`` (``y`` a per-token
    linear's output before its token scales) and ``(h, *rms_norm_codes(h, ...))``."""
    rowsum, zero_scale = zero or (None, None)
    return _compiled(f"add_rms_codes_{y.shape[-1]}", _add_rms_norm_codes, dynamic=None)(
        residual, y, rowsum, zero_scale, token_scale, bias, weight, eps, inv_scale, shift,
        *code_range(bits), want_rowsum)


def add_scaled(residual: torch.Tensor, y: torch.Tensor, zero, token_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``residual + (y - zero term) * token_scale[:, None] + bias`` in one pass."""
    rowsum, zero_scale = zero or (None, None)
    return _compiled(f"add_scaled_{y.shape[-1]}", _add_scaled, dynamic=None)(
        residual, y, rowsum, zero_scale, token_scale, bias)


def heads_per_token_codes(attn: torch.Tensor, inv_scale: torch.Tensor | None, bits: int,
                          want_rowsum: bool = False):
    """Per-token codes of an attention output (batch, heads, tokens, dim), read as the
    (batch * tokens, heads * dim) matrix that ``o_proj`` takes without writing that matrix
    out first: ``(codes, token scales, row sums or None)``."""
    name = f"heads_per_token_{attn.shape[1]}_{attn.shape[3]}"
    return _compiled(name, _heads_per_token, dynamic=None)(attn, inv_scale, *code_range(bits),
                                                            want_rowsum)


def epilogue(acc: torch.Tensor, token_scale: torch.Tensor | None, weight_scale: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`pertoken.quant.qlinear.epilogue`, fused."""
    return _compiled("epilogue", _epilogue)(acc, token_scale, weight_scale, bias)
