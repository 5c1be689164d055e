"""The compiled kernels against the eager definitions they fuse."""

import shutil

import pytest
import torch

from pertoken.quant import kernels
from pertoken.quant.qlinear import QuantLinear, epilogue
from pertoken.quant.quantizers import per_token_codes, quantize_weight, static_codes

pytestmark = pytest.mark.skipif(not shutil.which("g++"), reason="needs a C++ compiler")


@pytest.fixture
def compiled():
    assert kernels.use_compiled_kernels(True)
    yield
    kernels.use_compiled_kernels(False)


def _close_codes(got, want):
    """Equal but for rare exact ties a fused multiply-add may round the other way."""
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_compiled_quantizers_and_epilogue_match_the_eager_definitions(compiled):
    g = torch.Generator().manual_seed(0)
    for m in (1, 5, 64):
        x = torch.randn(m, 48, generator=g) * torch.logspace(-1, 1, 48)
        inv = torch.rand(48, generator=g) * 20 + 1
        shift = torch.randn(48, generator=g)
        for bits in (8, 6):
            _close_codes(kernels.static_codes(x, inv, bits, shift), static_codes(x, inv, bits, shift))
            _close_codes(kernels.static_codes(x, inv, bits), static_codes(x, inv, bits))
            codes, scale = kernels.per_token_codes(x, bits)
            want_codes, want_scale = per_token_codes(x, bits)
            _close_codes(codes, want_codes)
            assert torch.allclose(scale, want_scale)
        acc = torch.randint(-2**20, 2**20, (m, 24), generator=g, dtype=torch.int32)
        ws, b, ts = torch.rand(24, generator=g), torch.randn(24, generator=g), torch.rand(m)
        for args in ((ts, ws, b), (None, ws, b), (ts, ws, None), (None, ws, None)):
            assert torch.allclose(kernels.epilogue(acc, *args), epilogue(acc, *args),
                                  rtol=1e-6, atol=1e-6)


def test_a_quantized_linear_gives_the_same_outputs_on_compiled_kernels():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 48, generator=g)
    layer = QuantLinear(quantize_weight(w, 8, "rtn_asym"), torch.randn(32, generator=g),
                        "static", 8, inv_scale=torch.full((48,), 30.0), shift=torch.randn(48))
    x = torch.randn(3, 7, 48, generator=g)
    eager = layer(x)
    assert kernels.use_compiled_kernels(True)
    try:
        fused = layer(x)
    finally:
        kernels.use_compiled_kernels(False)
    assert torch.allclose(fused, eager, rtol=1e-4, atol=1e-4)


def test_fused_norm_and_mlp_blocks_match_the_unfused_model(tmp_path):
    """The fused RMSNorm (norm and group codes in one loop) and MLP (SwiGLU's product and
    down_proj's per-token quantizer in one loop) give the unfused model's logits, survive a
    reload, and the fused norm's codes replace the group's own quantizer call."""
    from pertoken.models import tiny_llama
    from pertoken.quant import qlinear
    from pertoken.quant.convert import QuantConfig, quantize_model
    from pertoken.quant.io import load, save_quantized

    if not qlinear.onednn_available():
        pytest.skip("the fused MLP runs on oneDNN's quantized linear")
    model, tokenizer = tiny_llama(hidden_size=64, intermediate_size=128)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, 200, (2, 24), generator=g) for _ in range(4)]
    quantize_model(model, batches, QuantConfig(), progress=False)
    save_quantized(model, tokenizer, tmp_path / "q", {})
    again, _ = load(tmp_path / "q")
    layer = again.model.layers[0]
    assert "forward" in vars(layer.input_layernorm) and "forward" in vars(layer.mlp)
    ids = torch.randint(4, 200, (2, 24), generator=g)
    with torch.no_grad():
        want = again(input_ids=ids).logits
    calls = []
    original = QuantLinear.codes

    def counting(self, x):
        calls.append(self)
        return original(self, x)

    assert kernels.use_compiled_kernels(True)
    QuantLinear.codes = counting
    try:
        with torch.no_grad():
            got = again(input_ids=ids).logits
    finally:
        QuantLinear.codes = original
        kernels.use_compiled_kernels(False)
    assert (got - want).abs().max() < 1e-3 * want.abs().max(), (got - want).abs().max()
    # per layer only o_proj quantizes its input itself (q/k/v and gate/up get the norm's
    # codes, down_proj's come from the fused MLP)
    assert len(calls) == 2 and all(c.out_features == 64 and c.act == "per-token" for c in calls)
