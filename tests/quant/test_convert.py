import pytest
import torch
from torch import nn

from pertoken.errors import UserError
from pertoken.models import tiny_llama
from pertoken.quant.convert import (QuantConfig, fold_channel_scales, linear_groups,
                                    quantize_model)
from pertoken.quant.observers import ChannelStats, observe_inputs
from pertoken.quant.qlinear import QuantLinear


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_folding_scales_and_shift_is_exact_in_float():
    w = torch.randn(12, 20, generator=_gen(0), dtype=torch.float64)
    b = torch.randn(12, generator=_gen(1), dtype=torch.float64)
    s = torch.rand(20, generator=_gen(2), dtype=torch.float64) + 0.1
    z = torch.randn(20, generator=_gen(3), dtype=torch.float64)
    x = torch.randn(7, 20, generator=_gen(4), dtype=torch.float64) * 5
    for bias in (b, None):
        for shift in (z, None):
            wf, bf = fold_channel_scales(w, bias, s, shift)
            u = ((x - shift) if shift is not None else x) / s
            want = nn.functional.linear(x.float(), w.float(),
                                        None if bias is None else bias.float())
            got = nn.functional.linear(u.float(), wf, bf)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shift_is_the_mean_of_per_sample_mid_ranges_over_the_true_sample_count():
    x = torch.randn(3, 9, 5, generator=_gen(5)) + torch.tensor([0.0, 4.0, -2.0, 0.5, 10.0])
    st = ChannelStats(5)
    st.update(x[:2])
    st.update(x[2])  # a 2-D batch is one sample
    assert st.samples == 3 and st.tokens == 27
    mids = (x.amax(1) + x.amin(1)) / 2
    assert torch.allclose(st.shift(), mids.mean(0))
    z = st.shift()
    reach = (x - z).abs().amax(dim=(0, 1))
    assert torch.allclose(st.scale(8, z) * 127, reach)
    assert torch.allclose(st.scale(6), x.abs().amax(dim=(0, 1)) / 31)
    assert torch.allclose(st.shift("global"), (x.amax((0, 1)) + x.amin((0, 1))) / 2)


def _batches(n=4, length=24, vocab=200, seed=0):
    g = _gen(seed)
    return [torch.randint(4, vocab, (2, length), generator=g) for _ in range(n)]


@pytest.mark.parametrize("cfg", [QuantConfig(), QuantConfig(shift=False),
                                 QuantConfig(method="per-token"),
                                 QuantConfig(w_bits=6, a_bits=6, weights="mse"),
                                 QuantConfig(method="smoothquant"),
                                 QuantConfig(method="per-tensor"),
                                 QuantConfig(method="weight-only", w_bits=4, a_bits=4)])
def test_a_quantized_tiny_llama_runs_on_integer_linears_close_to_float(cfg):
    model, _ = tiny_llama(hidden_size=64, intermediate_size=128)
    embed = model.model.embed_tokens.weight.clone()
    ids = torch.randint(4, 200, (2, 24), generator=_gen(9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    quantize_model(model, _batches(), cfg, progress=False)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [type(m) for m in linears] == [nn.Linear]  # only the tied head stays float
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * 7
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        got = model(input_ids=ids).logits
    err = (got - want).abs().max() / want.abs().max()
    assert err < {8: 0.03, 6: 0.06, 4: 0.15}[cfg.a_bits if cfg.method != "weight-only"
                                             else cfg.w_bits], err
    acts = [m.act for m in model.modules() if isinstance(m, QuantLinear)]
    want_static = {"outliertune": 2 * 5, "per-tensor": 2 * 7}.get(cfg.method, 0)
    assert acts.count("static") == want_static
    assert acts.count("none") == (2 * 7 if cfg.method == "weight-only" else 0)
    static = [m for m in model.modules() if isinstance(m, QuantLinear) and m.act == "static"]
    if cfg.method == "outliertune":
        assert all((m.shift.numel() > 0) == cfg.shift for m in static)
    if cfg.method == "per-tensor":  # one scale per input
        assert all(bool((m.inv_scale == m.inv_scale[0]).all()) for m in static)
    if cfg.method == "smoothquant":  # the migration sits in front of per-token codes
        assert sum(m.inv_scale.numel() > 0 for m in model.modules()
                   if isinstance(m, QuantLinear)) == 2 * 5


def test_unknown_families_bad_bits_and_empty_calibration_are_user_errors():
    with pytest.raises(UserError, match="not a model family"):
        linear_groups(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(UserError, match="must be 4, 6 or 8"):
        QuantConfig(w_bits=5).validate()
    with pytest.raises(UserError, match="4-bit activations"):
        QuantConfig(a_bits=4).validate()
    with pytest.raises(UserError, match="alpha"):
        QuantConfig(method="smoothquant", smooth_alpha=1.5).validate()
    model, _ = tiny_llama()
    with pytest.raises(UserError, match="calibration set is empty"):
        observe_inputs(model, ["model.layers.0.self_attn.q_proj"], [], progress=False)


def test_a_tiny_opt_with_layernorm_and_biases_quantizes_too():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2,
                                     ffn_dim=128, num_attention_heads=4,
                                     max_position_embeddings=64, word_embed_proj_dim=64)).eval()
    ids = torch.randint(4, 200, (2, 24), generator=_gen(9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    folded = quantize_model(model, _batches(), QuantConfig(), progress=False)
    static = [f for f in folded.values() if "scale" in f]
    assert len(static) == 4 and all(f["shift"] is not None for f in static)
    assert sum("migration" in f for f in folded.values()) == 4  # out_proj via v, fc2 via fc1
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * 6
    fc1 = model.model.decoder.layers[0].fc1
    assert fc1.act == "static" and fc1.bias.numel() == 128
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - want).abs().max() / want.abs().max() < 0.08  # static scales clip unseen tokens


@pytest.mark.parametrize("cfg", [QuantConfig(), QuantConfig(w_bits=6, a_bits=6),
                                 QuantConfig(w_bits=6, a_bits=6, weights="gptq"),
                                 QuantConfig(method="per-token", weights="rtn_sym"),
                                 QuantConfig(method="smoothquant"),
                                 QuantConfig(method="per-tensor"),
                                 QuantConfig(method="weight-only", w_bits=4)])
def test_a_quantized_model_round_trips_through_save_and_load(cfg, tmp_path):
    from pertoken.quant.io import WEIGHTS_FILE, load, save_quantized

    model, tokenizer = tiny_llama(hidden_size=64, intermediate_size=128)
    quantize_model(model, _batches(), cfg, progress=False)
    ids = torch.randint(4, 200, (2, 24), generator=_gen(9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_quantized(model, tokenizer, tmp_path / "q", {"method": cfg.method})
    again, tok = load(tmp_path / "q")
    assert tok is not None and tok.encode("hi") == tokenizer.encode("hi")
    with torch.no_grad():
        got = again(input_ids=ids).logits
    assert torch.equal(got, want)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    out = again.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)
    if cfg.w_bits == 6:  # packed: 3 bytes per 4 codes
        from safetensors import safe_open
        with safe_open(str(tmp_path / "q" / WEIGHTS_FILE), "pt") as f:
            keys = list(f.keys())
        assert any(k.endswith("weight_packed") for k in keys)
        assert not any(k.endswith("weight_t") for k in keys)


def test_the_head_option_runs_the_tied_head_and_embedding_on_one_int8_table(tmp_path):
    from safetensors import safe_open

    from pertoken.quant.io import WEIGHTS_FILE, load, save_quantized
    from pertoken.quant.qlinear import QuantEmbedding

    model, tokenizer = tiny_llama(hidden_size=64, intermediate_size=128)
    embed = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(4, 200, (2, 24), generator=_gen(9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    quantize_model(model, _batches(), QuantConfig(head=True), progress=False)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.act == "per-token"
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    # the embedding rows are the head's dequantized rows: within half a step of the original
    rows = model.model.embed_tokens(ids[0])
    step = model.lm_head.weight_scale[ids[0]][:, None]
    assert torch.all((rows - embed[ids[0]]).abs() <= step / 2 + 1e-7)
    assert torch.equal(rows, model.lm_head.dequantized_weight()[ids[0]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - want).abs().max() / want.abs().max() < 0.03
    save_quantized(model, tokenizer, tmp_path / "q", {"method": "outliertune"},
                   embedding_dtype="bfloat16")
    with safe_open(str(tmp_path / "q" / WEIGHTS_FILE), "pt") as f:
        keys = list(f.keys())
    assert not any("embed_tokens" in k for k in keys) and "lm_head.weight_t" in keys
    again, _ = load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, got)
    assert again.generate(ids[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)
    half, _ = load(tmp_path / "q", dtype="bfloat16")
    assert half.model.embed_tokens(ids).dtype == torch.bfloat16


def test_a_bfloat16_embedding_is_what_the_reloaded_tied_model_uses(tmp_path):
    from pertoken.quant.io import load, save_quantized

    model, tokenizer = tiny_llama(hidden_size=64, intermediate_size=128)
    quantize_model(model, _batches(), QuantConfig(), progress=False)
    save_quantized(model, tokenizer, tmp_path / "q", {}, embedding_dtype="bfloat16")
    again, _ = load(tmp_path / "q")
    rounded = model.model.embed_tokens.weight.detach().bfloat16().float()
    assert torch.equal(again.model.embed_tokens.weight, rounded)
    assert again.lm_head.weight is again.model.embed_tokens.weight


def _tiny_opt(**overrides):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2,
                                    ffn_dim=128, num_attention_heads=4,
                                    max_position_embeddings=64, word_embed_proj_dim=64,
                                    **overrides)).eval()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_migrating_the_dynamic_inputs_leaves_the_float_model_unchanged(family):
    model = tiny_llama(hidden_size=64, intermediate_size=128)[0] if family == "llama" \
        else _tiny_opt()
    groups = linear_groups(model)
    dynamic = [g for g in groups if g.kind == "dynamic"]
    assert all(g.feeder is not None for g in dynamic)
    ids = torch.randint(4, 200, (2, 24), generator=_gen(9))
    stats = observe_inputs(model, [g.linears[0] for g in dynamic], _batches(), progress=False)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    from pertoken.quant.convert import migrate_dynamic_inputs

    factors = migrate_dynamic_inputs(model, groups, {n: s.absmax for n, s in stats.items()}, 0.5)
    assert len(factors) == len(dynamic)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    if family == "llama":  # one factor per key-value channel, shared by its query heads
        a = factors[dynamic[0].linears[0]].view(2, 2, -1)
        assert torch.equal(a[:, 0], a[:, 1])
    # the migrated inputs are flatter across channels
    after = observe_inputs(model, [g.linears[0] for g in dynamic], _batches(), progress=False)
    for name, st in stats.items():
        spread = lambda m: (m.max() / m.clamp(min=1e-6).median()).item()  # noqa: E731
        assert spread(after[name].absmax) < spread(st.absmax)


def test_no_migration_through_a_non_homogeneous_activation():
    model = _tiny_opt(activation_function="gelu")
    fc2 = [g for g in linear_groups(model) if g.linears[0].endswith("fc2")]
    assert fc2 and all(g.feeder is None for g in fc2)


def test_outliertune_with_dynamic_migration_quantizes_close_to_float():
    model, _ = tiny_llama(hidden_size=64, intermediate_size=128)
    ids = torch.randint(4, 200, (2, 24), generator=_gen(9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    folded = quantize_model(model, _batches(), QuantConfig(dynamic_alpha=0.5), progress=False)
    assert sum("migration" in f for f in folded.values()) == 2 * 2
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - want).abs().max() / want.abs().max() < 0.03


@pytest.mark.parametrize("shift", [False, True])
def test_outliertune_codes_equal_smoothquant_alpha_1_with_static_per_tensor_codes(shift):
    """Spec identity 1.7.1: smoothing by a_j = max|X_j| makes every channel's calibration
    range 1, so one static per-tensor scale 1/qmax gives OutlierTune's per-channel codes (with
    the shift: Outlier Suppression+'s shift first). Exact in float64."""
    from pertoken.quant.convert import _smoothing
    from pertoken.quant.quantizers import static_codes

    g = _gen(21)
    x = (torch.randn(64, 16, generator=g, dtype=torch.float64)
         * torch.logspace(-1, 1.5, 16, dtype=torch.float64) + torch.linspace(-3, 3, 16))
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    st = ChannelStats(16)
    st.update(x)
    z = st.shift().double() if shift else None
    s = st.scale(8, z if shift else None).double()
    ot = static_codes(x, 1 / s, 8, z)
    centred = x - z if shift else x
    st2 = ChannelStats(16)
    st2.update(centred)
    a = _smoothing(st2.absmax, [w], 1.0).double()  # alpha = 1: a_j = max|X_j|
    smoothed = centred / a
    per_tensor = smoothed.abs().max() / 127
    sq = static_codes(smoothed, torch.full((16,), 1 / per_tensor.item(), dtype=torch.float64), 8)
    assert torch.equal(ot, sq)


def test_a_prior_per_channel_rescaling_cancels():
    """Spec identity 1.7.2: SmoothQuant-style scales applied before calibration leave the
    OutlierTune codes unchanged (the static per-channel scale absorbs them)."""
    from pertoken.quant.quantizers import static_codes

    g = _gen(22)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64) * torch.logspace(-1, 1.5, 16)
    a = torch.rand(16, generator=g, dtype=torch.float64) + 0.5
    codes = []
    for inputs in (x, x / a):
        st = ChannelStats(16)
        st.update(inputs)
        codes.append(static_codes(inputs, 1 / st.scale(8).double(), 8))
    mismatches = (codes[0] != codes[1]).sum().item()
    assert mismatches <= 2, mismatches  # rare ties from rounding x / a


def test_the_shift_alone_reproduces_the_float_model_after_save_and_load(tmp_path):
    """Spec test 6.1: with the shift's bias folded and quantization out of the way, logits
    match the float model to 1e-5, also after a save and reload (the new biases survive)."""
    from pertoken.quant.io import load, save_quantized

    model, tokenizer = tiny_llama(hidden_size=64, intermediate_size=128)
    ids = torch.randint(4, 200, (2, 24), generator=_gen(9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    quantize_model(model, _batches(), QuantConfig(dynamic_alpha=None), progress=False)
    static = [m for m in model.modules() if isinstance(m, QuantLinear) and m.act == "static"]
    assert static and all(m.shift.abs().sum() > 0 and m.bias.numel() for m in static)
    # then quantization is turned off: unrounded inputs against the float weights, keeping the
    # saved shift, scales and the bias that compensates the shift
    save_quantized(model, tokenizer, tmp_path / "q", {})
    again, _ = load(tmp_path / "q")
    original = tiny_llama(hidden_size=64, intermediate_size=128)[0]  # the same seed
    for quantized in (model, again):
        for name, m in list(quantized.named_modules()):
            if not isinstance(m, QuantLinear):
                continue
            w = original.get_submodule(name).weight.detach()
            if m.act == "static":  # u = (x - z) / s against W diag(s), plus the bias W z
                folded = w * (1 / m.inv_scale)[None, :]
                m.forward = (lambda x, m=m, folded=folded: nn.functional.linear(
                    (x - m.shift) * m.inv_scale, folded, m.bias))
            else:
                m.forward = (lambda x, w=w: nn.functional.linear(x, w))
        with torch.no_grad():
            got = quantized(input_ids=ids).logits
        assert (got - want).abs().max() < 1e-5, (got - want).abs().max()


def test_a_group_quantizes_its_shared_input_once_with_the_same_outputs(tmp_path):
    from pertoken.quant.io import load, save_quantized
    from pertoken.quant.qlinear import SharedCodes

    model, tokenizer = tiny_llama(hidden_size=64, intermediate_size=128)
    quantize_model(model, _batches(), QuantConfig(), progress=False)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared is not None
    assert attn.o_proj.shared is None
    ids = torch.randint(4, 200, (2, 24), generator=_gen(9))
    calls = []
    original = QuantLinear.codes

    def counting(self, x, *args, **kwargs):
        calls.append(self)
        return original(self, x, *args, **kwargs)

    QuantLinear.codes = counting
    try:
        with torch.no_grad():
            shared = model(input_ids=ids).logits
        per_forward = len(calls)
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.shared = None
        calls.clear()
        with torch.no_grad():
            unshared = model(input_ids=ids).logits
    finally:
        QuantLinear.codes = original
    assert torch.equal(shared, unshared)
    assert per_forward == 2 * 4 and len(calls) == 2 * 7  # q/k/v, o, gate/up, down per layer
    # a reload links the groups again, and nothing is held after a forward
    save_quantized(model, tokenizer, tmp_path / "q", {})
    again, _ = load(tmp_path / "q")
    caches = {id(m.shared): m.shared for m in again.modules()
              if isinstance(m, QuantLinear) and m.shared is not None}
    assert len(caches) == 2 * 2 and all(isinstance(c, SharedCodes) for c in caches.values())
    with torch.no_grad():
        again(input_ids=ids)
    assert all(c._input is None and c._value is None for c in caches.values())


@pytest.mark.parametrize("family,weights", [("llama", "rtn_asym"), ("llama", "rtn_sym"),
                                            ("opt", "rtn_asym")])
def test_the_onednn_backend_runs_groups_as_one_gemm_with_the_int_mm_logits(family, weights):
    from pertoken.quant import qlinear

    if not qlinear.onednn_available():
        pytest.skip("oneDNN's quantized linear is not available here")
    if family == "llama":
        model, _ = tiny_llama(hidden_size=64, intermediate_size=128)
    else:
        model = _tiny_opt()
    quantize_model(model, _batches(), QuantConfig(weights=weights), progress=False)
    ids = torch.randint(4, 200, (2, 24), generator=_gen(9))
    calls = []
    original = qlinear.OnednnWeights.__call__

    def counting(self, codes, token_scale):
        calls.append(len(self.splits))
        return original(self, codes, token_scale)

    before = qlinear._gemm["backend"]
    qlinear.OnednnWeights.__call__ = counting
    try:
        with torch.no_grad():
            qlinear.use_gemm("int_mm")
            want = model(input_ids=ids).logits
            qlinear.use_gemm("onednn")
            got = model(input_ids=ids).logits
            # new weights in a member's buffers are picked up (the packed copy is rebuilt)
            layer = next(m for m in model.modules() if isinstance(m, QuantLinear) and m.shared)
            layer.weight_t.copy_(-layer.weight_t.clamp(min=-127))
            changed = model(input_ids=ids).logits
            qlinear.use_gemm("int_mm")
            changed_want = model(input_ids=ids).logits
    finally:
        qlinear.OnednnWeights.__call__ = original
        qlinear._gemm["backend"] = before
    scale = want.abs().max().item()
    assert (got - want).abs().max() < 1e-4 * scale
    assert (changed - changed_want).abs().max() < 1e-4 * scale
    assert (changed - want).abs().max() > 1e-2 * scale
    groups = [n for n in calls[:len(calls) // 2]]
    # llama: q/k/v as one GEMM, o, gate/up as one, down; OPT: q/k/v, out, fc1, fc2
    expected = [3, 1, 2, 1] if family == "llama" else [3, 1, 1, 1]
    assert groups == expected * 2, groups
