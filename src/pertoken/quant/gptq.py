"""GPTQ weight rounding (Frantar et al., 2022; OutlierTune spec §1.5).

Each output row's step and zero point are fixed first (MSE-searched clipping, as the ``mse``
quantizer, or ``mse_sym`` on a symmetric grid); then the columns are rounded one at a time and
each column's rounding error is spread over the columns not yet rounded, weighted by the inverse
of the layer's input Hessian ``H = X^T X``, so that ``||(W - Q) X^T||`` rather than ``||W - Q||``
is kept small. Columns go in order of decreasing ``H_jj`` (``act_order``), the Hessian is damped
by 1% of its mean diagonal, and the updates are applied lazily in blocks of 128 columns.

For a folded OutlierTune linear the Hessian is built from ``u = (x - z) / s``, the input the
folded weight ``W' = W diag(s)`` actually multiplies.

Hand-written: the GPTQ packages (``auto-gptq``, ``gptqmodel``, ``llm-compressor``) need CUDA or
their own model wrappers, and none takes static per-channel activation scales into the Hessian.
"""

from __future__ import annotations

import torch

from pertoken.quant.quantizers import QuantizedWeight, code_range, quantize_weight


class HessianAccumulator:
    """Running ``sum_t x_t x_t^T`` over the rows of the inputs given to :meth:`add`, each
    batch's product in float32 (as GPTQ does) and the running sum in float64."""

    def __init__(self, columns: int) -> None:
        self.sum = torch.zeros(columns, columns, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.sum.shape[0]).float()
        self.sum += (x.t() @ x).double()
        self.rows += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n`` (GPTQ's scaling; any positive factor gives the same rounding)."""
        return 2 * self.sum / max(self.rows, 1)


def _grid(weight: torch.Tensor, bits: int, symmetric: bool):
    """The per-row step and (unsigned) zero point GPTQ rounds onto."""
    q = quantize_weight(weight, bits, "mse_sym" if symmetric else "mse")
    if q.zero is None:
        return q.scale, None
    return q.scale, (q.zero + (1 << (bits - 1))).float()


def _round(column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bits: int) -> torch.Tensor:
    """Integer codes of one weight column on the fixed per-row grid (unsigned if asymmetric)."""
    if zero is None:
        top = code_range(bits)[1]
        return torch.round(column / scale).clamp(-top, top)
    return (torch.round(column / scale) + zero).clamp(0, (1 << bits) - 1)


def _value(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (codes - zero if zero is not None else codes) * scale


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int,
                  symmetric: bool = False, damp: float = 0.01, block: int = 128,
                  act_order: bool = True) -> QuantizedWeight:
    """GPTQ-round ``weight`` (out, in) against the input Hessian (in, in); see the module
    docstring. Returns per-row codes like :func:`~pertoken.quant.quantizers.quantize_weight`."""
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    columns = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scale, zero = _grid(w.float(), bits, symmetric)
    scale = scale.double()
    zero = zero.double() if zero is not None else None
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order \
        else torch.arange(columns)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(columns, dtype=h.dtype)
    # the upper Cholesky factor of H^-1: its row i holds the error-propagation weights of
    # column i onto the columns after it, once the columns before it are fixed
    inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        inv_block = inv[start:end, start:end]
        for i in range(end - start):
            column = w_block[:, i]
            q = _round(column, scale, zero, bits)
            codes[:, start + i] = q
            error = (column - _value(q, scale, zero)) / inv_block[i, i]
            w_block[:, i:] -= error[:, None] * inv_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inv[start:end, end:]
    codes = codes[:, torch.argsort(order)]
    if zero is None:
        return QuantizedWeight(codes.to(torch.int8), scale.float(), None, bits)
    offset = 1 << (bits - 1)
    return QuantizedWeight((codes - offset).to(torch.int8), scale.float(),
                           (zero - offset).to(torch.int32), bits)
