"""The integer path against a fake-quant reference on the same codes and scales."""

import pytest
import torch

from pertoken.errors import UserError
from pertoken.quant import qlinear
from pertoken.quant.qlinear import QuantLinear, epilogue, int_matmul
from pertoken.quant.quantizers import per_token_codes, quantize_weight, static_codes


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _reference(layer: QuantLinear, w, x):
    """Fake quantization: the same codes, a float64 matmul of dequantized-to-integer values
    (exact), and the same epilogue (tested on its own below)."""
    if layer.act == "static":
        codes = static_codes(x, layer.inv_scale, layer.a_bits,
                             layer.shift if layer.shift.numel() else None)
        token_scale = None
    else:
        codes, token_scale = per_token_codes(x, layer.a_bits)
    q = w.codes.double()
    if w.zero is not None:
        q = q - w.zero.double()[:, None]
    acc = codes.double() @ q.t()
    y = epilogue(acc.to(torch.int32), token_scale, layer.weight_scale,
                 layer.bias if layer.bias.numel() else None)
    return y, acc


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_the_epilogue_is_the_float64_formula_to_float32_rounding(per_token, bias):
    g = _gen(11)
    acc = torch.randint(-2**22, 2**22, (9, 13), generator=g, dtype=torch.int32)
    ts = torch.rand(9, generator=g) + 0.01 if per_token else None
    ws = torch.rand(13, generator=g) / 100
    b = torch.randn(13, generator=g) if bias else None
    want = acc.double() * ws.double()
    if per_token:
        want = want * ts.double()[:, None]
    if bias:
        want = want + b.double()
    got = epilogue(acc, ts, ws, b)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.fixture
def gemm():
    """Run a test on one GEMM backend, and restore the default afterwards."""
    before, min_tokens = qlinear._gemm["backend"], qlinear.ONEDNN_MIN_TOKENS

    def choose(backend):
        if backend == "onednn" and not qlinear.onednn_available():
            pytest.skip("oneDNN's quantized linear is not available here")
        qlinear.use_gemm(backend)
        qlinear.ONEDNN_MIN_TOKENS = 1  # every token count on the chosen backend

    yield choose
    qlinear._gemm["backend"], qlinear.ONEDNN_MIN_TOKENS = before, min_tokens


@pytest.mark.parametrize("backend", ["int_mm", "onednn"])
@pytest.mark.parametrize("tokens", [1, 2, 7, 16, 17, 64])
@pytest.mark.parametrize("act", ["static", "per-token"])
@pytest.mark.parametrize("w_bits,method", [(8, "rtn_sym"), (8, "rtn_asym"), (6, "rtn_asym"),
                                           (4, "mse")])
def test_integer_gemm_equals_the_fake_quant_reference(tokens, act, w_bits, method, backend,
                                                      gemm):
    """``int_mm`` is bit-identical to the reference; oneDNN fuses the dequantization into its
    GEMM (and applies a weight zero point after it), so it agrees to float32 rounding."""
    gemm(backend)
    k, n = 40, 24
    w = quantize_weight(torch.randn(n, k, generator=_gen(0)), w_bits, method)
    inv = 1 / (torch.rand(k, generator=_gen(1)) + 0.02)
    shift = torch.randn(k, generator=_gen(2)) * 0.1
    layer = QuantLinear(w, torch.randn(n, generator=_gen(3)), act, a_bits=8 if w_bits == 8 else 6,
                        inv_scale=inv if act == "static" else None,
                        shift=shift if act == "static" else None)
    x = torch.randn(tokens, k, generator=_gen(4)) * 3
    codes, _ = layer.codes(x)
    acc = layer.accumulate(codes)
    want, want_acc = _reference(layer, w, x)
    assert acc.dtype == torch.int32 and torch.equal(acc.double(), want_acc)
    got = layer(x)
    if backend == "int_mm":
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        assert not torch.allclose(got, want + 1e-3 * want.abs().max().item())
    assert layer(x[None]).shape == (1, tokens, n)


def test_wide_reductions_stay_exact_where_float32_sums_would_not():
    k = 1536  # 127 * 127 * 1536 > 2^24
    a = torch.full((3, k), 127, dtype=torch.int8)
    b = torch.full((k, 5), 127, dtype=torch.int8)
    assert int(int_matmul(a, b)[0, 0]) == 127 * 127 * k


@pytest.mark.parametrize("m,k,n", [(1, 5, 3), (16, 8, 8), (17, 9, 13), (40, 64, 24)])
def test_padding_for_cuda_shape_rules_is_exact(m, k, n):
    a = torch.randint(-128, 128, (m, k), generator=_gen(m), dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), generator=_gen(n), dtype=torch.int8)
    assert torch.equal(int_matmul(a, b, pad=True), a.int() @ b.int())
    assert torch.equal(int_matmul(a, b, pad=False), a.int() @ b.int())


def test_per_token_w8a8_agrees_with_torchao_dynamic_int8():
    """torchao's Int8DynamicActivationInt8WeightConfig is the established per-token baseline."""
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 64, bias=True)
    x = torch.randn(33, 96)
    x[:, 5] *= 20  # an outlier channel
    ours = QuantLinear(quantize_weight(linear.weight, 8, "rtn_sym"), linear.bias, "per-token", 8)
    theirs = torch.nn.Sequential(linear)
    quantize_(theirs, Int8DynamicActivationInt8WeightConfig())
    with torch.no_grad():
        want, got, exact = theirs(x), ours(x), linear(x)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos > 0.9999, cos
    assert (got - exact).norm() < 0.05 * exact.norm()
    assert torchao.__version__


def test_decoding_sized_inputs_take_int_mm_and_prefills_take_onednn(gemm):
    gemm("onednn")
    qlinear.ONEDNN_MIN_TOKENS = 16
    cpu = torch.device("cpu")
    assert qlinear.gemm_backend(cpu, 1) == qlinear.gemm_backend(cpu, 15) == "int_mm"
    assert qlinear.gemm_backend(cpu, 16) == qlinear.gemm_backend(cpu) == "onednn"
    qlinear.use_gemm("int_mm")
    assert qlinear.gemm_backend(cpu, 512) == "int_mm"
    with pytest.raises(UserError):
        qlinear.use_gemm("fbgemm")
