"""Integer codes for activations and weights (OutlierTune spec §1.1, §1.4, §1.5, §2).

Activations are quantized symmetrically: per token (dynamic absmax) or per channel with static
scales and an optional symmetrizing shift. Weights are quantized per output row, symmetric or
asymmetric, by round-to-nearest or with an MSE-searched clipping range. Rounding is
``torch.round`` (half to even) everywhere; codes live in int8 containers for every width up to
8 bits, and 6-bit codes pack four values into three bytes for storage.

Hand-written because torch's quantized tensors (``torch.ao``) are deprecated and torchao's
configs do not expose static per-channel activation scales with a folded dequantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pertoken.errors import UserError

EPS = 1e-8
"""floor of a per-token scale (an all-zero row quantizes to zeros)"""


def code_range(bits: int) -> tuple[int, int]:
    """The signed code range ``[-2^(b-1), 2^(b-1) - 1]`` of a ``bits``-wide integer."""
    if not 2 <= bits <= 8:
        raise UserError(f"bit width {bits} is not supported: use 2 to 8 bits")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def qmax(bits: int) -> int:
    return code_range(bits)[1]


def _codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Round and clamp a fresh float tensor ``u`` in place and cast it to int8. Clamping to
    integer bounds before rounding gives the same codes as after (and halves the work)."""
    lo, hi = code_range(bits)
    return u.clamp_(lo, hi).round_().to(torch.int8)


def per_token_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization of ``x`` (tokens, channels): the codes and
    each token's scale ``max_j |x_tj| / qmax`` (floored at :data:`EPS`)."""
    scale = x.abs().amax(dim=-1).clamp_(min=EPS) / qmax(bits)
    return _codes(x / scale[:, None], bits), scale


def static_codes(x: torch.Tensor, inv_scale: torch.Tensor, bits: int,
                 shift: torch.Tensor | None = None) -> torch.Tensor:
    """Static per-channel quantization: ``round((x - shift) * inv_scale)``, clamped, computed
    as one fused ``x * inv_scale - shift * inv_scale``. The per-channel dequantization is folded
    into the next weight, so nothing else is needed."""
    u = torch.addcmul(shift * -inv_scale, x, inv_scale) if shift is not None else x * inv_scale
    return _codes(u, bits)


@dataclass
class QuantizedWeight:
    """A weight ``W`` (out, in) as ``W ~ scale[:, None] * (codes - zero[:, None])``.

    ``codes`` are int8: symmetric codes in ``[-qmax, qmax]`` (``zero`` None), or for
    asymmetric weights the unsigned codes shifted by ``2^(b-1)`` into the signed range, with
    ``zero`` the zero point shifted alike (spec §1.4: the GEMM then subtracts
    ``rowsum(x) * zero``). Up to 7 bits an asymmetric weight can instead store ``codes - zero``
    directly (it fits in int8), see :meth:`centred`."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int

    def dequantize(self) -> torch.Tensor:
        q = self.codes.float()
        if self.zero is not None:
            q = q - self.zero.float()[:, None]
        return q * self.scale[:, None]

    def centred(self) -> "QuantizedWeight":
        """The same weight with the zero point folded into the codes (bits <= 7 only)."""
        if self.zero is None:
            return self
        if self.bits > 7:
            raise ValueError("8-bit asymmetric codes minus their zero point do not fit in int8")
        codes = (self.codes.to(torch.int16) - self.zero.to(torch.int16)[:, None]).to(torch.int8)
        return QuantizedWeight(codes, self.scale, None, self.bits)


def _rtn(w: torch.Tensor, bits: int, symmetric: bool, shrink: torch.Tensor | None = None):
    """Round-to-nearest per row; ``shrink`` (rows,) scales each row's range (clipping)."""
    f = shrink[:, None] if shrink is not None else 1.0
    if symmetric:
        top = qmax(bits)
        scale = (w.abs().amax(dim=1, keepdim=True) * f).clamp(min=EPS) / top
        codes = torch.round(w / scale).clamp(-top, top)
        return codes, scale[:, 0], None
    levels = (1 << bits) - 1
    low = (w.amin(dim=1, keepdim=True) * f).clamp(max=0)
    high = (w.amax(dim=1, keepdim=True) * f).clamp(min=0)
    scale = ((high - low) / levels).clamp(min=EPS)
    zero = torch.round(-low / scale).clamp(0, levels)
    codes = (torch.round(w / scale) + zero).clamp(0, levels)
    return codes, scale[:, 0], zero[:, 0]


def _error(w, codes, scale, zero, norm: float) -> torch.Tensor:
    q = codes - zero[:, None] if zero is not None else codes
    return (q * scale[:, None] - w).abs().pow(norm).sum(dim=1)


def quantize_weight(w: torch.Tensor, bits: int, method: str = "rtn_asym",
                    grid: int = 80, norm: float = 2.4) -> QuantizedWeight:
    """Per-output-row weight quantization of ``w`` (out, in) (spec §1.5).

    ``rtn_sym``: absmax / qmax per row. ``rtn_asym``: min-max per row with an integer zero
    point. ``mse``: asymmetric, with each row's range shrunk by the factor in
    ``{1.00, 0.99, ..., 1 - grid/100}`` that minimises ``sum |error|^norm`` (GPTQ's grid);
    ``mse_sym`` the same search on the symmetric grid."""
    methods = ("rtn_sym", "rtn_asym", "mse", "mse_sym")
    if method not in methods:
        raise UserError(f"unknown weight quantizer {method!r}: choose {', '.join(methods)}")
    code_range(bits)
    w = w.detach().float()
    if method in ("mse", "mse_sym"):
        symmetric = method == "mse_sym"
        best = _rtn(w, bits, symmetric)
        best_err = _error(w, *best, norm)
        for i in range(1, grid + 1):
            shrink = torch.full((w.shape[0],), 1 - i / 100)
            trial = _rtn(w, bits, symmetric, shrink)
            err = _error(w, *trial, norm)
            better = err < best_err
            best = tuple(None if t is None
                         else torch.where(better[:, None] if t.dim() == 2 else better, t, b)
                         for t, b in zip(trial, best))
            best_err = torch.minimum(err, best_err)
        codes, scale, zero = best
    else:
        codes, scale, zero = _rtn(w, bits, method == "rtn_sym")
    if zero is None:
        return QuantizedWeight(codes.to(torch.int8), scale, None, bits)
    offset = 1 << (bits - 1)
    return QuantizedWeight((codes - offset).to(torch.int8), scale,
                           (zero - offset).to(torch.int32), bits)


def pack_int6(codes: torch.Tensor) -> torch.Tensor:
    """Pack 6-bit codes in ``[-32, 31]`` four to three bytes (spec §2): with ``a = code + 32``,
    ``b0 = a0 | a1 << 6``, ``b1 = a1 >> 2 | a2 << 4``, ``b2 = a2 >> 4 | a3 << 2``. The flat
    codes are padded with zeros to a multiple of four; :func:`unpack_int6` takes the count."""
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() and (flat.min() < -32 or flat.max() > 31):
        raise ValueError("6-bit codes must lie in [-32, 31]")
    pad = (-flat.numel()) % 4
    a = torch.cat([flat + 32, flat.new_full((pad,), 32)]).view(-1, 4)
    b0 = a[:, 0] | ((a[:, 1] << 6) & 0xFF)
    b1 = (a[:, 1] >> 2) | ((a[:, 2] << 4) & 0xFF)
    b2 = (a[:, 2] >> 4) | (a[:, 3] << 2)
    return torch.stack([b0, b1, b2], dim=1).reshape(-1).to(torch.uint8)


def unpack_int6(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The inverse of :func:`pack_int6`: the first ``count`` codes, as int8."""
    b = packed.to(torch.int16).view(-1, 3)
    a0 = b[:, 0] & 0x3F
    a1 = (b[:, 0] >> 6) | ((b[:, 1] & 0x0F) << 2)
    a2 = (b[:, 1] >> 4) | ((b[:, 2] & 0x03) << 4)
    a3 = b[:, 2] >> 2
    return (torch.stack([a0, a1, a2, a3], dim=1).reshape(-1)[:count] - 32).to(torch.int8)
