import pytest
import torch
from torch import nn

from pertoken.models import tiny_llama
from pertoken.quant.convert import QuantConfig, quantize_model
from pertoken.quant.gptq import HessianAccumulator, gptq_quantize
from pertoken.quant.qlinear import QuantLinear
from pertoken.quant.quantizers import quantize_weight


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _correlated(rows, columns, seed):
    """Inputs with correlated channels and a few large ones, as activations have."""
    g = _gen(seed)
    mix = torch.randn(columns, columns, generator=g, dtype=torch.float64) / columns ** 0.5
    x = torch.randn(rows, columns, generator=g, dtype=torch.float64) @ (torch.eye(columns) + mix)
    x[:, :3] *= 8
    return x


def _slow_gptq(w, h, bits, damp=0.01, act_order=True):
    """Optimal Brain Surgeon one column at a time: fix the next column to its rounding and move
    the columns still free by -err / [H_F^-1]_00 * [H_F^-1]_0,:, with H_F^-1 the inverse of the
    Hessian restricted to the free columns, inverted afresh at every step (no Cholesky, no
    blocks). The same grid and order as the fast path; codes are unsigned (zero-point form)."""
    q = quantize_weight(w.float(), bits, "mse")
    offset = 1 << (bits - 1)
    scale = q.scale.double()
    zero = (q.zero + offset).double()
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order \
        else torch.arange(w.shape[1])
    w, h = w.double()[:, order].clone(), h.double()[order][:, order].clone()
    h += damp * torch.diagonal(h).mean() * torch.eye(w.shape[1], dtype=torch.float64)
    codes = torch.zeros_like(w)
    for j in range(w.shape[1]):
        inv = torch.linalg.inv(h[j:, j:])
        c = (torch.round(w[:, j] / scale) + zero).clamp(0, (1 << bits) - 1)
        codes[:, j] = c
        err = w[:, j] - (c - zero) * scale
        w[:, j:] -= (err / inv[0, 0])[:, None] * inv[0][None, :]
    return codes[:, torch.argsort(order)] - offset


@pytest.mark.parametrize("bits,act_order,block", [(4, True, 128), (6, True, 5), (8, False, 7)])
def test_gptq_equals_column_by_column_optimal_brain_surgeon(bits, act_order, block):
    w = torch.randn(9, 24, generator=_gen(0), dtype=torch.float64)
    acc = HessianAccumulator(24)
    x = _correlated(200, 24, 1)
    acc.add(x[:120])
    acc.add(x[120:])
    assert torch.allclose(acc.hessian, 2 * x.t() @ x / 200)
    got = gptq_quantize(w, acc.hessian, bits, block=block, act_order=act_order)
    want = _slow_gptq(w, acc.hessian, bits, act_order=act_order)
    assert torch.equal(got.codes.double(), want)


def test_an_identity_hessian_gives_round_to_nearest_on_the_same_grid():
    w = torch.randn(16, 32, generator=_gen(2))
    got = gptq_quantize(w, torch.eye(32), 6)
    want = quantize_weight(w, 6, "mse")
    assert torch.equal(got.codes, want.codes) and torch.equal(got.zero, want.zero)
    sym = gptq_quantize(w, torch.eye(32), 8, symmetric=True)
    assert torch.equal(sym.codes, quantize_weight(w, 8, "mse_sym").codes)


@pytest.mark.parametrize("bits", [4, 6])
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits):
    w = torch.randn(32, 48, generator=_gen(3))
    x = _correlated(500, 48, 4).float()
    acc = HessianAccumulator(48)
    acc.add(x)
    got = gptq_quantize(w, acc.hessian, bits)
    rtn = quantize_weight(w, bits, "mse")
    err_gptq = ((got.dequantize() - w) @ x.t()).pow(2).sum()
    err_rtn = ((rtn.dequantize() - w) @ x.t()).pow(2).sum()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_dead_input_channels_are_zeroed():
    w = torch.randn(4, 8, generator=_gen(5))
    x = _correlated(50, 8, 6).float()
    x[:, 2] = 0
    acc = HessianAccumulator(8)
    acc.add(x)
    q = gptq_quantize(w, acc.hessian, 8)
    assert torch.all(q.dequantize()[:, 2].abs() < q.scale / 2 + 1e-7)


def _quantized_logit_errors(cfg: QuantConfig, weightings) -> tuple[dict, dict]:
    """Mean squared logit error of a tiny Llama quantized with ``cfg`` under each weight
    rounding, and its quantized linears per rounding."""
    def batches():
        g = _gen(7)
        return [torch.randint(4, 200, (2, 32), generator=g) for _ in range(6)]

    ids = torch.randint(4, 200, (4, 32), generator=_gen(8))
    errors, linears = {}, {}
    for weights in weightings:
        model, _ = tiny_llama(hidden_size=64, intermediate_size=128)
        with torch.no_grad():
            want = model(input_ids=ids).logits
        quantize_model(model, batches(), QuantConfig(**{**cfg.__dict__, "weights": weights}),
                       progress=False)
        linears[weights] = [m for m in model.modules() if isinstance(m, QuantLinear)]
        assert [type(m) for m in model.modules() if isinstance(m, nn.Linear)] == [nn.Linear]
        with torch.no_grad():
            errors[weights] = (model(input_ids=ids).logits - want).pow(2).mean().item()
    return errors, linears


@pytest.mark.parametrize("cfg", [QuantConfig(w_bits=6, a_bits=6, weights="gptq"),
                                 QuantConfig(method="per-token", w_bits=4, weights="gptq")])
def test_sequential_gptq_quantizes_every_decoder_linear_and_beats_rtn(cfg):
    errors, linears = _quantized_logit_errors(cfg, ("gptq", "mse"))
    assert len(linears["gptq"]) == 2 * 7
    assert errors["gptq"] < errors["mse"], errors


def test_symmetric_sequential_gptq_leaves_no_zero_points_and_beats_symmetric_rtn():
    errors, linears = _quantized_logit_errors(QuantConfig(w_bits=6, a_bits=6),
                                              ("gptq_sym", "rtn_sym"))
    assert len(linears["gptq_sym"]) == 2 * 7
    assert all(m.weight_zero.numel() == 0 for m in linears["gptq_sym"])
    assert errors["gptq_sym"] < errors["rtn_sym"], errors
