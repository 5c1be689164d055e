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
            unsigned = kernels.static_codes(x, inv, bits, shift, unsigned=True)
            assert unsigned.dtype == torch.uint8
            _close_codes(unsigned.int() - 128, static_codes(x, inv, bits, shift))
            unsigned, scale = kernels.per_token_codes(x, bits, unsigned=True)
            _close_codes(unsigned.int() - 128, want_codes)
        acc = torch.randint(-2**20, 2**20, (m, 24), generator=g, dtype=torch.int32)
        ws, b, ts = torch.rand(24, generator=g), torch.randn(24, generator=g), torch.rand(m)
        for args in ((ts, ws, b), (None, ws, b), (ts, ws, None), (None, ws, None)):
            assert torch.allclose(kernels.epilogue(acc, *args), epilogue(acc, *args),
                                  rtol=1e-6, atol=1e-6)


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_the_fused_layer_formulas_match_the_unfused_computations():
    """Each step the fused decoder layer's compiled graphs are made of against the unfused
    computation it replaces: HF's rotary embedding and head split, RMSNorm then the static
    quantizer, the residual connection after a per-token linear, o_proj's per-token quantizer
    on the heads and SwiGLU's; each with and without an asymmetric weight's zero-point term to
    subtract, and the row sums of the codes they make. (That the compiled graphs compute these
    formulas is tested on whole models below.)"""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(2)
    heads, kv_heads, dim = 4, 2, 8

    def zero_terms(rows, width):
        rowsum = torch.randint(-900, 900, (rows,), generator=g).float()
        zero_scale = torch.rand(width, generator=g) * 0.01
        return [((None, None), 0), ((rowsum, zero_scale), rowsum[:, None] * zero_scale)]

    def check_rowsum(codes, rowsum):
        assert torch.equal(rowsum, (codes.int() - 128).sum(-1).float())

    for batch, tokens in ((1, 24), (2, 17), (1, 40)):
        rows, width = batch * tokens, (heads + 2 * kv_heads) * dim
        qkv = torch.randn(batch, tokens, width, generator=g)
        angle = torch.rand(batch, tokens, dim // 2, generator=g) * 6
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        for zero, term in zero_terms(rows, width):
            rowsum = zero[0].view(batch, tokens) if zero[0] is not None else None
            q, k, v = kernels._rope_qkv(qkv, rowsum, zero[1], cos, sin, heads, kv_heads)
            split = (qkv - term.view(batch, tokens, -1) if rowsum is not None else qkv).view(
                batch, tokens, -1, dim).transpose(1, 2)
            want_q, want_k = apply_rotary_pos_emb(split[:, :heads],
                                                  split[:, heads:heads + kv_heads], cos, sin)
            for got, want in ((q, want_q), (k, want_k), (v, split[:, heads + kv_heads:])):
                assert got.is_contiguous() and torch.allclose(got, want, atol=1e-5)

        x, y = torch.randn(rows, 48, generator=g), torch.randn(rows, 48)
        weight, inv = torch.rand(48, generator=g) + 0.5, torch.rand(48, generator=g) * 20 + 1
        shift, bias, ts = torch.randn(48) * 0.1, torch.randn(48), torch.rand(rows)
        for sh in (shift, None):
            codes, rowsum = kernels._rms_norm_codes(x, weight, 1e-5, inv, sh, -128, 127, True)
            _close_codes(codes.int() - 128, static_codes(_rms(x, weight, 1e-5), inv, 8, sh))
            check_rowsum(codes, rowsum)
            for b in (bias, None):
                for zero, term in zero_terms(rows, 48):
                    want_h = x + (y - term) * ts[:, None] + (b if b is not None else 0)
                    h, codes, rowsum = kernels._add_rms_norm_codes(
                        x, y, *zero, ts, b, weight, 1e-5, inv, sh, -128, 127, True)
                    assert torch.allclose(h, want_h, atol=1e-5)
                    assert torch.allclose(kernels._add_scaled(x, y, *zero, ts, b), want_h,
                                          atol=1e-5)
                    _close_codes(codes.int() - 128,
                                 static_codes(_rms(want_h, weight, 1e-5), inv, 8, sh))
                    check_rowsum(codes, rowsum)

        attn = torch.randn(batch, heads, tokens, dim, generator=g)
        flat = attn.transpose(1, 2).reshape(rows, heads * dim)
        inv = torch.rand(heads * dim, generator=g) + 0.5
        gate_up = torch.randn(rows, 64, generator=g)
        for scale_in in (inv, None):
            codes, scale, rowsum = kernels._heads_per_token(attn, scale_in, -128, 127, True)
            want_codes, want_scale = per_token_codes(flat * scale_in if scale_in is not None
                                                     else flat, 8)
            _close_codes(codes.int() - 128, want_codes)
            assert torch.allclose(scale, want_scale)
            check_rowsum(codes, rowsum)
            for zero, term in zero_terms(rows, 64):
                codes, scale, rowsum = kernels._silu_mul_codes(gate_up, *zero, scale_in, -128,
                                                               127, True, True)
                gu = gate_up - term
                h = torch.nn.functional.silu(gu[:, :32]) * gu[:, 32:]
                want_codes, want_scale = per_token_codes(h * scale_in if scale_in is not None
                                                         else h, 8)
                _close_codes(codes.int() - 128, want_codes)
                assert torch.allclose(scale, want_scale)
                check_rowsum(codes, rowsum)


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


def _quantized_tiny_llama(tmp_path, weights: str = "rtn_asym"):
    from pertoken.models import tiny_llama
    from pertoken.quant import qlinear
    from pertoken.quant.convert import QuantConfig, quantize_model
    from pertoken.quant.io import load, save_quantized

    if not qlinear.onednn_available():
        pytest.skip("the fused blocks run on oneDNN's quantized linear")
    model, tokenizer = tiny_llama(hidden_size=64, intermediate_size=128)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, 200, (2, 24), generator=g) for _ in range(4)]
    quantize_model(model, batches, QuantConfig(weights=weights), progress=False)
    save_quantized(model, tokenizer, tmp_path / "q", {})
    return load(tmp_path / "q")[0]


def _close_logits(got, want):
    assert (got - want).abs().max() < 1e-3 * want.abs().max(), (got - want).abs().max()


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_causal_attention_in_blocks_equals_causal_attention(monkeypatch, kv_heads):
    """Causal attention as blocks of query rows over their key prefixes equals a plain
    softmax over the masked scores, for token counts below, at and off multiples of the
    block, with grouped-query attention and without."""
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK", 8)
    g = torch.Generator().manual_seed(5)
    for tokens in (3, 16, 37):
        q = torch.randn(2, 4, tokens, 16, generator=g)
        k, v = (torch.randn(2, kv_heads, tokens, 16, generator=g) for _ in range(2))
        rep = 4 // kv_heads
        scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * 0.3
        scores = scores.masked_fill(torch.ones(tokens, tokens).triu(1).bool(), float("-inf"))
        want = scores.softmax(-1) @ v.repeat_interleave(rep, 1)
        torch.testing.assert_close(kernels.causal_attention(q, k, v, 0.3), want,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weights,block", [("rtn_asym", 0), ("rtn_sym", 8)])
def test_the_fused_decoder_layer_matches_the_unfused_model(tmp_path, monkeypatch, weights,
                                                           block):
    """With the compiled kernels on, a whole Llama decoder layer runs fused (the norms' codes,
    q/k/v as one GEMM, the rotary embedding, SDPA, o_proj's codes, the residual connections,
    gate/up, SwiGLU and down_proj's codes; asymmetric weights' zero-point terms inside the
    next kernel) and gives the unfused model's logits after a reload, with no quantizer call
    left to the linears themselves; with SDPA in the graph or as blocks of query rows
    (``block``) between the graphs."""
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK", block)
    model = _quantized_tiny_llama(tmp_path, weights)
    layer = model.model.layers[0]
    assert all("forward" in vars(m) for m in (layer, layer.input_layernorm, layer.mlp))
    ids = torch.randint(4, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    calls = []
    original = QuantLinear.codes

    def counting(self, x, *args, **kwargs):
        calls.append(self)
        return original(self, x, *args, **kwargs)

    assert kernels.use_compiled_kernels(True)
    QuantLinear.codes = counting
    try:
        with torch.no_grad():
            got = model(input_ids=ids).logits
    finally:
        QuantLinear.codes = original
        kernels.use_compiled_kernels(False)
    _close_logits(got, want)
    assert calls == []


def test_the_fused_decoder_layer_handles_caches_masks_and_decoding(tmp_path):
    """Greedy generation (a fused prefill, then one-token steps that run unfused on the
    cache the fused layers filled), a prefill continued on a cache (keys longer than the
    queries) and a left-padded batch (an attention mask) all give the unfused results."""
    model = _quantized_tiny_llama(tmp_path)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(4, 200, (1, 20), generator=g)
    more = torch.randint(4, 200, (1, 18), generator=g)
    padded = torch.randint(4, 200, (2, 24), generator=g)
    mask = torch.ones_like(padded)
    mask[1, :5] = 0

    def outputs():
        with torch.no_grad():
            tokens = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
            first = model(input_ids=prompt, use_cache=True)
            second = model(input_ids=more, past_key_values=first.past_key_values).logits
            masked = model(input_ids=padded, attention_mask=mask).logits
        return tokens, second, masked * mask[..., None]

    want = outputs()
    fused_layers = []
    layer_rest = kernels.layer_rest

    def counting(x, *args):
        fused_layers.append(x.shape[1])
        return layer_rest(x, *args)

    assert kernels.use_compiled_kernels(True)
    kernels.layer_rest = counting
    try:
        got = outputs()
    finally:
        kernels.layer_rest = layer_rest
        kernels.use_compiled_kernels(False)
    # two layers fused in each of the prefill, the first and second calls, the padded batch
    assert fused_layers == [20, 20, 20, 20, 18, 18, 24, 24]
    assert torch.equal(got[0], want[0])
    _close_logits(got[1], want[1])
    _close_logits(got[2], want[2])


def test_a_fused_layer_computes_the_next_ones_inputs_unless_a_hook_intervenes(tmp_path):
    """Each fused layer hands the next one its q/k/v, computed from its output in the same
    graph (one q/k/v graph a forward instead of one a layer); a forward hook that edits the
    output in place in between makes the next layer compute them afresh, as unfused."""
    model = _quantized_tiny_llama(tmp_path)
    ids = torch.randint(4, 200, (1, 24), generator=torch.Generator().manual_seed(4))

    def edit(module, args, output):
        output.mul_(0.5)

    calls = []
    layer_qkv = kernels.layer_qkv

    def counting(x, *args):
        calls.append(x.shape[1])
        return layer_qkv(x, *args)

    results = {}
    for hooked in (False, True):
        handle = model.model.layers[0].register_forward_hook(edit) if hooked else None
        with torch.no_grad():
            want = model(input_ids=ids).logits
        assert kernels.use_compiled_kernels(True)
        kernels.layer_qkv = counting
        try:
            with torch.no_grad():
                results[hooked] = model(input_ids=ids).logits
        finally:
            kernels.layer_qkv = layer_qkv
            kernels.use_compiled_kernels(False)
            if handle is not None:
                handle.remove()
        _close_logits(results[hooked], want)
    assert calls == [24, 24, 24]  # the first layer's alone, then both layers' with the hook
    assert not torch.allclose(results[True], results[False])
