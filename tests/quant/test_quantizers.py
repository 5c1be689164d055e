import pytest
import torch

from pertoken.errors import UserError
from pertoken.quant.quantizers import (code_range, pack_int6, per_token_codes, quantize_weight,
                                       static_codes, unpack_int6)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_activation_codes_are_round_half_even_and_clamped():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0]])
    codes = static_codes(x, torch.ones(7), 8)
    assert codes.tolist() == [[0, 2, 2, 0, -2, 127, -128]]
    assert static_codes(x, torch.ones(7), 6).tolist() == [[0, 2, 2, 0, -2, 31, -32]]
    shifted = static_codes(x, torch.full((7,), 2.0), 8, shift=torch.full((7,), 1.0))
    assert shifted.tolist() == [[-1, 1, 3, -3, -5, 127, -128]]


def test_per_token_codes_use_each_rows_absmax():
    x = torch.randn(5, 16, generator=_gen(0))
    x[2] = 0
    codes, scale = per_token_codes(x, 8)
    assert codes.dtype == torch.int8
    assert torch.equal(codes.abs().amax(1)[[0, 1, 3, 4]], torch.full((4,), 127, dtype=torch.int8))
    assert (codes[2] == 0).all() and scale[2] > 0
    assert torch.allclose(codes.float() * scale[:, None], x, atol=float(scale.max()) / 2 + 1e-7)


@pytest.mark.parametrize("method", ["rtn_sym", "rtn_asym", "mse", "mse_sym"])
@pytest.mark.parametrize("bits", [8, 6, 4])
def test_weight_codes_lie_in_range_and_rtn_error_is_at_most_half_a_step(method, bits):
    w = torch.randn(24, 40, generator=_gen(1)) * torch.linspace(0.1, 3, 40)
    q = quantize_weight(w, bits, method)
    lo, hi = code_range(bits)
    assert q.codes.dtype == torch.int8
    assert lo <= int(q.codes.min()) and int(q.codes.max()) <= hi
    err = (q.dequantize() - w).abs()
    if not method.startswith("mse"):  # no clipping: every value within half a step
        assert (err <= q.scale[:, None] / 2 + 1e-6).all()
    if method in ("rtn_sym", "mse_sym"):
        assert q.zero is None and int(q.codes.min()) >= -hi  # symmetric: [-qmax, qmax]
    else:
        assert q.zero is not None and lo <= int(q.zero.min()) and int(q.zero.max()) <= hi


def test_mse_clipping_never_loses_to_round_to_nearest_on_its_objective():
    w = torch.randn(32, 64, generator=_gen(2))
    w[:, 0] *= 20  # an outlier column inflates every row's range
    for bits in (4, 6):
        for plain, clipped in (("rtn_asym", "mse"), ("rtn_sym", "mse_sym")):
            rtn, mse = quantize_weight(w, bits, plain), quantize_weight(w, bits, clipped)
            e_rtn = (rtn.dequantize() - w).abs().pow(2.4).sum(1)
            e_mse = (mse.dequantize() - w).abs().pow(2.4).sum(1)
            assert (e_mse <= e_rtn + 1e-6).all()
            assert e_mse.sum() < e_rtn.sum()


def test_centred_asymmetric_codes_dequantize_the_same():
    w = torch.randn(8, 16, generator=_gen(3)) + 0.7
    q = quantize_weight(w, 6, "rtn_asym")
    c = q.centred()
    assert c.zero is None and int(c.codes.abs().max()) <= 63
    assert torch.equal(c.dequantize(), q.dequantize())
    with pytest.raises(ValueError):
        quantize_weight(w, 8, "rtn_asym").centred()


@pytest.mark.parametrize("count", [0, 1, 3, 4, 5, 1001])
def test_int6_packing_round_trips_bit_exactly_in_three_quarters_of_a_byte(count):
    codes = torch.randint(-32, 32, (count,), generator=_gen(count), dtype=torch.int8)
    if count >= 2:
        codes[:2] = torch.tensor([-32, 31], dtype=torch.int8)
    packed = pack_int6(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 3 * -(-count // 4)
    assert torch.equal(unpack_int6(packed, count), codes)
    with pytest.raises(ValueError):
        pack_int6(torch.tensor([32]))


def test_unsupported_bit_widths_are_a_user_error():
    with pytest.raises(UserError):
        quantize_weight(torch.ones(2, 2), 9)
    with pytest.raises(UserError):
        quantize_weight(torch.ones(2, 2), 8, "gptq-typo")
