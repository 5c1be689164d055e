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


def compiled_kernels_on() -> bool:
    return _state["on"]


def _static(x, inv_scale, shift, lo: int, hi: int):
    u = torch.addcmul(shift * -inv_scale, x, inv_scale) if shift is not None else x * inv_scale
    return u.clamp(lo, hi).round().to(torch.int8)


def _per_token(x, lo: int, hi: int):
    scale = x.abs().amax(dim=-1).clamp(min=EPS) / hi
    return (x / scale[:, None]).clamp(lo, hi).round().to(torch.int8), scale


def _rms_norm_static(x, weight, eps: float, inv_scale, shift, lo: int, hi: int):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * y
    return y, _static(y, inv_scale, shift, lo, hi)


def _silu_mul_per_token(gate_up, inv_scale, lo: int, hi: int):
    half = gate_up.shape[-1] // 2
    h = torch.nn.functional.silu(gate_up[:, :half]) * gate_up[:, half:]
    if inv_scale is not None:
        h = h * inv_scale
    return _per_token(h, lo, hi)


def _epilogue(acc, token_scale, weight_scale, bias):
    y = acc.float()
    if token_scale is not None:
        y = y * token_scale[:, None]
    y = y * weight_scale
    return y + bias if bias is not None else y


def _compiled(name: str, fn):
    fns = _state["fns"]
    if name not in fns:
        fns[name] = torch.compile(fn, dynamic=True)
    return fns[name]


def static_codes(x: torch.Tensor, inv_scale: torch.Tensor, bits: int,
                 shift: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`pertoken.quant.quantizers.static_codes`, fused."""
    return _compiled("static", _static)(x, inv_scale, shift, *code_range(bits))


def per_token_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pertoken.quant.quantizers.per_token_codes`, fused."""
    return _compiled("per_token", _per_token)(x, *code_range(bits))


def rms_norm_static_codes(x: torch.Tensor, weight: torch.Tensor, eps: float,
                          inv_scale: torch.Tensor, bits: int,
                          shift: torch.Tensor | None = None):
    """A Llama RMSNorm of ``x`` (tokens, d) in float32 and the static codes of its output, in
    one fused pass: ``(y, static_codes(y, inv_scale, bits, shift))``."""
    return _compiled("rms_static", _rms_norm_static)(x, weight, eps, inv_scale, shift,
                                                     *code_range(bits))


def silu_mul_per_token_codes(gate_up: torch.Tensor, inv_scale: torch.Tensor | None, bits: int):
    """SwiGLU's product ``silu(gate) * up`` (times ``inv_scale``, SmoothQuant's migration) of
    the side-by-side ``[gate | up]`` outputs, quantized per token, fused:
    ``per_token_codes(silu(g) * u * inv_scale, bits)``."""
    return _compiled("silu_mul", _silu_mul_per_token)(gate_up, inv_scale, *code_range(bits))


def epilogue(acc: torch.Tensor, token_scale: torch.Tensor | None, weight_scale: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`pertoken.quant.qlinear.epilogue`, fused."""
    return _compiled("epilogue", _epilogue)(acc, token_scale, weight_scale, bias)
