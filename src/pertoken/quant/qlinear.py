"""A linear layer that runs int8 x int8 -> int32 GEMMs (``torch._int_mm``) with a float32
epilogue (OutlierTune spec §1.4, §2).

Activation modes:

- ``static``: per-channel codes ``round((x - shift) * inv_scale)`` with calibrated scales; the
  per-channel dequantization is already folded into the weight (``W' = W diag(s)``) and the
  shift's effect into the bias (``b' = b + W shift``), so the epilogue is ``acc * step + b'``;
- ``per-token``: dynamic absmax codes; the epilogue is ``acc * s_t * step + b`` (with
  ``inv_scale`` given, the input is first multiplied by it: SmoothQuant's migration, whose
  inverse is folded into the weight);
- ``none``: weight-only quantization, a float matmul with the dequantized weight.

Weights are per-output-row codes (:class:`~pertoken.quant.quantizers.QuantizedWeight`); an
asymmetric 8-bit weight subtracts ``rowsum(x_codes) * zero`` from the int32 accumulator, and
narrower asymmetric weights store ``codes - zero`` directly. Any number of tokens works,
including one; on CUDA the operands are padded to what ``_int_mm`` accepts there. With
:func:`pertoken.quant.kernels.use_compiled_kernels` the quantizers and the epilogue run as
fused compiled loops.

GEMM backends (:func:`use_gemm`, ``PERTOKEN_QUANT_GEMM``): on CPU the default is oneDNN's
quantized linear (``torch.ops.onednn.qlinear_pointwise``, the kernel behind inductor's x86
int8 path), which runs u8 x s8 -> s32 on prepacked weights with the per-output-channel
dequantization and the bias fused into the GEMM, and computes the members of a linked group
(``q/k/v``, ``gate/up``) as one wider GEMM. The activation codes are handed to it as unsigned
bytes with zero point 128 (a sign-bit flip of the int8 codes, exact). oneDNN ignores weight
zero points, so an asymmetric 8-bit weight's ``rowsum(x) * zero`` term is applied after it as a
float rank-one update. ``int_mm`` (``torch._int_mm`` plus the epilogue) is the reference, and
what runs on other devices.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from pertoken.errors import UserError
from pertoken.quant import kernels
from pertoken.quant.quantizers import QuantizedWeight, per_token_codes, static_codes

ACT_MODES = ("static", "per-token", "none")
GEMM_BACKENDS = ("onednn", "int_mm")
_gemm = {"backend": os.environ.get("PERTOKEN_QUANT_GEMM", "onednn")}


@functools.cache
def onednn_available() -> bool:
    """Whether oneDNN's quantized linear runs here, exactly (checked once on a small case
    against ``torch._int_mm``)."""
    try:
        if not (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.onednn, "qlinear_pointwise")):
            return False
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(-128, 128, (3, 40), dtype=torch.int8, generator=gen)
        w = torch.randint(-128, 128, (24, 40), dtype=torch.int8, generator=gen)
        got = _onednn_linear(a, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(24), None)
        return torch.equal(got, torch._int_mm(a, w.t().contiguous()).float())
    except Exception:  # an op missing or refusing in this build: fall back to _int_mm
        return False


def use_gemm(backend: str) -> None:
    """Choose the integer GEMM of every :class:`QuantLinear` on CPU: ``onednn`` (the default,
    when available) or ``int_mm``."""
    if backend not in GEMM_BACKENDS:
        raise UserError(f"unknown GEMM backend {backend!r}: choose {' or '.join(GEMM_BACKENDS)}")
    _gemm["backend"] = backend


ONEDNN_MIN_TOKENS = 16
"""below this many tokens (decoding) ``torch._int_mm`` is faster on CPU than oneDNN's call"""


def gemm_backend(device: torch.device, tokens: int | None = None) -> str:
    """The backend that runs on ``device`` now, for ``tokens`` rows if given."""
    if (device.type == "cpu" and _gemm["backend"] == "onednn"
            and (tokens is None or tokens >= ONEDNN_MIN_TOKENS) and onednn_available()):
        return "onednn"
    return "int_mm"


def _onednn_linear(codes: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """``(codes @ W^T) * scale + bias`` in float32 for int8 ``codes`` and a prepacked int8
    ``W``: the codes go in as the unsigned bytes ``codes + 128`` (the sign bit flipped) with
    zero point 128 (``codes`` given as uint8 are taken to be those bytes already); ``zeros``
    are the weight zero points oneDNN wants (all 0)."""
    unsigned = codes if codes.dtype == torch.uint8 else codes.view(torch.uint8).bitwise_xor(128)
    if zeros is None:
        zeros = torch.zeros(scale.numel(), dtype=torch.int32)
    return kernels.onednn_linear(unsigned, packed, scale, zeros, bias)


class OnednnWeights:
    """The prepacked weights of one :class:`QuantLinear` or of a group's members side by side
    (one GEMM for all), with their scales, zero-point terms and biases concatenated. Rebuilt
    whenever a member's buffers change (a ``load_state_dict``, say)."""

    def __init__(self, layers: list[QuantLinear]) -> None:
        self.key = self.key_of(layers)
        weight = torch.cat([m.weight_t for m in layers], dim=1).t().contiguous()
        self.packed = torch.ops.onednn.qlinear_prepack(weight, None)
        self.scale = torch.cat([m.weight_scale for m in layers])
        self.zero_scale = None
        if any(m.weight_zero.numel() for m in layers):
            self.zero_scale = torch.cat([
                m.weight_zero.float() * m.weight_scale if m.weight_zero.numel()
                else torch.zeros(m.out_features) for m in layers])
        self.bias = None
        if any(m.bias.numel() for m in layers):
            self.bias = torch.cat([m.bias if m.bias.numel() else torch.zeros(m.out_features)
                                   for m in layers])
        self.splits = [m.out_features for m in layers]
        self.zeros = torch.zeros(sum(self.splits), dtype=torch.int32)

    @staticmethod
    def key_of(layers: list[QuantLinear]) -> tuple:
        key = []
        for m in layers:
            buffers = m._buffers
            for name in ("weight_t", "weight_scale", "weight_zero", "bias"):
                t = buffers[name]
                key += (t.data_ptr(), t._version)
        return tuple(key)

    def tensors(self) -> tuple:
        """``(packed weight, scales, zeros, bias or None, zero-point scales or None)``: what a
        compiled kernel takes (:func:`pertoken.quant.kernels.layer_qkv`)."""
        return self.packed, self.scale, self.zeros, self.bias, self.zero_scale

    def __call__(self, codes: torch.Tensor, token_scale: torch.Tensor | None) -> torch.Tensor:
        """The float32 outputs (tokens, sum of out_features) for int8 ``codes`` (or the uint8
        bytes ``code + 128``): ``codes @ W^T`` times the weights' steps, less the zero-point
        term of asymmetric weights, times the token scales if given, plus the bias."""
        static = token_scale is None
        y = _onednn_linear(codes, self.packed, self.scale, self.bias if static else None,
                           self.zeros)
        if self.zero_scale is not None:
            rowsum = codes.sum(dim=1, dtype=torch.int32)
            if codes.dtype == torch.uint8:
                rowsum -= 128 * codes.shape[1]
            y.addr_(rowsum.float(), self.zero_scale, alpha=-1)
        if not static:
            y.mul_(token_scale[:, None])
            if self.bias is not None:
                y.add_(self.bias)
        return y


def _onednn_weights(owner, layers: list[QuantLinear]) -> OnednnWeights:
    """``owner``'s cached :class:`OnednnWeights` for ``layers``, rebuilt if stale."""
    cached = getattr(owner, "_onednn", None)
    if cached is None or cached.key != OnednnWeights.key_of(layers):
        with torch.inference_mode(False), torch.no_grad():
            cached = OnednnWeights(layers)
        owner._onednn = cached
    return cached


def int_matmul(a: torch.Tensor, b: torch.Tensor, pad: bool | None = None) -> torch.Tensor:
    """``a @ b`` for int8 ``a`` (M, K) and ``b`` (K, N), exactly, as int32.

    ``torch._int_mm`` takes any shape on CPU; on CUDA it needs M > 16 and K, N multiples of 8,
    so there (or with ``pad=True``) zero rows and columns are added and cut off again."""
    if pad is None:
        pad = a.is_cuda
    if not pad:
        return torch._int_mm(a.contiguous(), b)
    m, k = a.shape
    n = b.shape[1]
    mp, kp, np_ = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
    if (mp, kp) != (m, k):
        a = torch.nn.functional.pad(a, (0, kp - k, 0, mp - m))
    if (kp, np_) != (k, n):
        b = torch.nn.functional.pad(b, (0, np_ - n, 0, kp - k))
    return torch._int_mm(a.contiguous(), b.contiguous())[:m, :n]


class SharedCodes:
    """Activation codes computed once for the linears of a group that read the same input
    with the same quantizer (``q/k/v``, ``gate/up``): the first member to see an input tensor
    quantizes it, the others reuse the codes for that very tensor object, and the cache lets
    go once every member has read it (so nothing outlives a forward pass). On the oneDNN
    backend what is shared is the output of one GEMM over all members' weights, which each
    member slices."""

    def __init__(self, layers: list[QuantLinear]) -> None:
        self.layers = layers
        self.members = len(layers)
        self.starts = {}
        """each member's first column in the group's fused output, by ``id``"""
        start = 0
        for m in layers:
            self.starts[id(m)] = start
            start += m.out_features
        self._input = self._value = None
        self._reads = 0
        self._primed_input = self._primed_codes = None

    def prime(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Codes of ``x`` computed ahead, by a fused norm (see :mod:`pertoken.quant.fused`):
        the group uses them, once, instead of quantizing ``x`` itself."""
        self._primed_input, self._primed_codes = x, codes

    def take_primed(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._primed_input is not x:
            return None
        codes = self._primed_codes
        self._primed_input = self._primed_codes = None
        return codes

    def get(self, x: torch.Tensor, compute):
        if self._input is not x:
            self._input, self._value, self._reads = x, compute(), 0
        value = self._value
        self._reads += 1
        if self._reads >= self.members:
            self._input = self._value = None
        return value


def link_shared_codes(model: nn.Module) -> int:
    """Give the static :class:`QuantLinear` members of each group one :class:`SharedCodes`;
    returns the number of groups linked."""
    groups: dict[str, list[QuantLinear]] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.act == "static" and module.group:
            groups.setdefault(module.group, []).append(module)
    linked = 0
    for members in groups.values():
        first = members[0]
        same = all(torch.equal(m.inv_scale, first.inv_scale) and torch.equal(m.shift, first.shift)
                   and m.a_bits == first.a_bits for m in members)
        if len(members) > 1 and same:
            cache = SharedCodes(members)
            for m in members:
                m.shared = cache
            linked += 1
    return linked


class QuantLinear(nn.Module):
    """An ``nn.Linear`` replacement on integer kernels (see the module docstring).

    Buffers: ``weight_t`` (in, out) int8 codes, pre-transposed for the CPU kernel;
    ``weight_scale`` (out,) step sizes; ``weight_zero`` (out,) int32 zero points or empty;
    ``bias`` (out,) or empty; ``inv_scale`` and ``shift`` (in,) for static activations (the
    shift may be empty)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, act: str,
                 a_bits: int, inv_scale: torch.Tensor | None = None,
                 shift: torch.Tensor | None = None) -> None:
        super().__init__()
        if act not in ACT_MODES:
            raise UserError(f"unknown activation mode {act!r}: choose {' or '.join(ACT_MODES)}")
        if act == "static" and inv_scale is None:
            raise ValueError("static activations need their per-channel inverse scales")
        self.act, self.a_bits, self.w_bits = act, a_bits, weight.bits
        self.group = ""
        """the first linear of the group this one shares its input and quantizer with"""
        self.shared: SharedCodes | None = None
        out_features, in_features = weight.codes.shape
        self.in_features, self.out_features = in_features, out_features
        empty = torch.zeros(0)
        self.register_buffer("weight_t", weight.codes.t().contiguous())
        self.register_buffer("weight_scale", weight.scale.float().contiguous())
        self.register_buffer("weight_zero", weight.zero.to(torch.int32) if weight.zero is not None
                             else torch.zeros(0, dtype=torch.int32))
        self.register_buffer("bias", bias.detach().float().clone() if bias is not None
                             else empty.clone())
        self.register_buffer("inv_scale", inv_scale.float().clone() if inv_scale is not None
                             else empty.clone())
        self.register_buffer("shift", shift.float().clone() if shift is not None
                             else empty.clone())

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, W{self.w_bits}A{self.a_bits}, "
                f"act={self.act}, asym={self.weight_zero.numel() > 0}, "
                f"shift={self.shift.numel() > 0}")

    def codes(self, x: torch.Tensor,
              unsigned: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The activation codes of ``x`` (tokens, in) and, per token, their scale (None for
        static activations, whose scales are folded into the weight). With ``unsigned`` the
        compiled kernels may return the codes as oneDNN's bytes ``code + 128`` (uint8)."""
        shift = self.shift if self.shift.numel() else None
        if self.act == "static":
            if kernels.compiled_kernels_on(x.shape[0]):
                return kernels.static_codes(x, self.inv_scale, self.a_bits, shift, unsigned), None
            return static_codes(x, self.inv_scale, self.a_bits, shift), None
        x = x * self.inv_scale if self.inv_scale.numel() else x
        if kernels.compiled_kernels_on(x.shape[0]):
            return kernels.per_token_codes(x, self.a_bits, unsigned)
        return per_token_codes(x, self.a_bits)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight (out, in) the codes stand for."""
        q = self.weight_t.t().float()
        if self.weight_zero.numel():
            q = q - self.weight_zero.float()[:, None]
        return q * self.weight_scale[:, None]

    def accumulate(self, codes: torch.Tensor) -> torch.Tensor:
        """The int32 accumulator ``codes @ (W_codes - zero)^T`` (the zero-point term as one
        in-place rank-one update); uint8 ``codes`` are oneDNN's bytes ``code + 128``."""
        if codes.dtype == torch.uint8:
            codes = codes.bitwise_xor(128).view(torch.int8)
        acc = int_matmul(codes, self.weight_t)
        if self.weight_zero.numel():
            acc.addr_(codes.sum(dim=1, dtype=torch.int32), self.weight_zero, alpha=-1)
        return acc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features).float()
        if self.act == "none":
            y = nn.functional.linear(flat, self.dequantized_weight(),
                                     self.bias if self.bias.numel() else None)
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        if gemm_backend(flat.device, flat.shape[0]) == "onednn":
            y = self._onednn_forward(x, flat)
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        if self.shared is not None:
            codes, token_scale = self.shared.get(x, lambda: self.input_codes(x, flat))
        else:
            codes, token_scale = self.codes(flat)
        finish = kernels.epilogue if kernels.compiled_kernels_on(flat.shape[0]) else epilogue
        y = finish(self.accumulate(codes), token_scale, self.weight_scale,
                   self.bias if self.bias.numel() else None)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def input_codes(self, x: torch.Tensor, flat: torch.Tensor, unsigned: bool = False):
        """:meth:`codes` of ``flat`` (``x`` as a float matrix), or the codes a fused norm
        primed the group with for ``x``."""
        primed = self.shared.take_primed(x) if self.shared is not None else None
        return (primed, None) if primed is not None else self.codes(flat, unsigned)

    def _onednn_forward(self, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        group = self.shared
        if group is None:
            return _onednn_weights(self, [self])(*self.codes(flat, unsigned=True))

        def fused():
            return _onednn_weights(group, group.layers)(*self.input_codes(x, flat, True))

        start = group.starts[id(self)]
        return group.get(x, fused)[:, start:start + self.out_features]


def epilogue(acc: torch.Tensor, token_scale: torch.Tensor | None, weight_scale: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """``acc * token_scale[:, None] * weight_scale + bias`` in float32, in as few passes over
    the (tokens, out) result as eager torch allows (float32 kernels are vectorized where mixed
    int32-float ones are not, so the accumulator is converted first)."""
    y = acc.float()
    if token_scale is None:
        return torch.addcmul(bias, y, weight_scale) if bias is not None else y.mul_(weight_scale)
    y.mul_(token_scale[:, None]).mul_(weight_scale)
    return y.add_(bias) if bias is not None else y


class QuantEmbedding(nn.Module):
    """The input embedding of a model whose tied head is a symmetric :class:`QuantLinear`:
    row ``i`` is ``codes[i] * step[i]``, read from the head's own buffers (nothing stored
    twice). ``dtype`` is the float type of the rows it returns (the model's)."""

    def __init__(self, head: QuantLinear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if head.weight_zero.numel():
            raise ValueError("an embedding shares only a symmetric head's codes")
        self.head = [head]  # a plain list: not a submodule, so not saved twice
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 codes of the head"

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (num_embeddings, embedding_dim), for inspection."""
        return self.head[0].dequantized_weight().to(self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        flat = ids.reshape(-1)
        rows = head.weight_t.index_select(1, flat).t().float()
        rows.mul_(head.weight_scale.index_select(0, flat)[:, None])
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)
