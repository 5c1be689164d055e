import json

import pytest
import torch

from pertoken.errors import UserError
from pertoken.models import (ALIASES, DEFAULT_MODEL, convert_gguf, find_package_file, list_models,
                             PackedLinear, bf16_packing_available, fp32_one_row_packed,
                             fp32_small_batch_kernel, load_model, mkl_packing_available,
                             onednn_fp32_available, resolve, small_batch_layout,
                             tiny_byte_tokenizer, tiny_llama)


def test_tiny_tokenizer_round_trips_arbitrary_text():
    tok = tiny_byte_tokenizer()
    for text in ["hello world", "  tabs\tand\nnewlines\n", "Ünïcödé 中文 Straße 🚀", ""]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tiny_llama_is_deterministic_per_seed():
    a, _ = tiny_llama(seed=3)
    b, _ = tiny_llama(seed=3)
    c, _ = tiny_llama(seed=4)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert not torch.equal(a(ids).logits, c(ids).logits)


def test_load_model_from_saved_folder_reproduces_logits(tmp_path, tiny):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))
    ids = torch.tensor([tokenizer.encode("a small test", add_special_tokens=False)])
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded_tok.encode("a small test") == tokenizer.encode("a small test")
    assert not loaded.training


def test_small_batch_layout_keeps_values_and_ties():
    model, _ = tiny_llama(seed=1)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert small_batch_layout(model) is model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.weight.stride() == (1, m.weight.shape[0]) for m in linears)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    small_batch_layout(model)  # idempotent
    assert all(m.weight.stride() == (1, m.weight.shape[0]) for m in linears)
    half = tiny_llama(seed=1)[0].to(torch.float16)
    small_batch_layout(half)  # left alone
    assert half.lm_head.weight.is_contiguous()
    assert not any(isinstance(m, PackedLinear) for m in half.modules())


@pytest.mark.skipif(not bf16_packing_available(), reason="no oneDNN bf16 linear")
def test_bf16_packed_linears_equal_plain_linears():
    model = tiny_llama(seed=3)[0].to(torch.bfloat16)
    plain = tiny_llama(seed=3)[0].to(torch.bfloat16)
    small_batch_layout(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is PackedLinear for m in linears)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(m.weight.is_contiguous() for m in linears)  # bf16 keeps its layout
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in (1, 2, 9, 40):
            ids = torch.randint(3, 260, (1, rows), generator=gen)
            torch.testing.assert_close(model(ids).logits, plain(ids).logits)
        lin = model.model.layers[0].self_attn.q_proj
        x = torch.randn(3, 32, generator=gen).bfloat16()
        before = lin(x)
        torch.testing.assert_close(before, torch.nn.functional.linear(x, lin.weight))
        lin.weight.mul_(2)  # in place: the packed copy is rebuilt
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight))
        assert not torch.equal(lin(x), before)
        # a module made under inference mode (no version counters), with a bias
        biased = torch.nn.Linear(32, 48).bfloat16()
        small_batch_layout(torch.nn.Sequential(biased))
        assert type(biased) is PackedLinear
        torch.testing.assert_close(biased(x), torch.nn.functional.linear(x, biased.weight,
                                                                         biased.bias))


needs_mkl = pytest.mark.skipif(not mkl_packing_available(), reason="no MKL packed GEMM")


@needs_mkl
def test_packed_linears_equal_plain_linears_for_any_row_count():
    model, _ = tiny_llama(seed=2)
    plain, _ = tiny_llama(seed=2)
    small_batch_layout(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is PackedLinear for m in linears)
    assert model.state_dict().keys() == plain.state_dict().keys()
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in (1, 2, 3, 9, 17, 40):
            ids = torch.randint(3, 260, (1, rows), generator=gen)
            torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
            x = torch.randn(rows, 32, generator=gen)
            lin = model.model.layers[0].self_attn.q_proj
            torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight),
                                       rtol=1e-5, atol=1e-5)


FP32_KERNELS = [pytest.param("mkl", marks=needs_mkl),
                pytest.param("onednn", marks=pytest.mark.skipif(not onednn_fp32_available(),
                                                                reason="no oneDNN linear"))]


@pytest.mark.parametrize("one_row", ["packed", "plain"])
@pytest.mark.parametrize("kernel", FP32_KERNELS)
def test_each_fp32_kernel_equals_plain_linears(monkeypatch, kernel, one_row):
    monkeypatch.setenv("PERTOKEN_FP32_GEMM", kernel)
    monkeypatch.setenv("PERTOKEN_FP32_ONE_ROW", one_row)
    other = "onednn" if kernel == "mkl" else "mkl"
    model, _ = tiny_llama(seed=4)
    plain, _ = tiny_llama(seed=4)
    small_batch_layout(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.fp32_kernel == kernel for m in linears)
    assert all(m.one_row_packed == (one_row == "packed") for m in linears)
    calls = []
    if one_row == "packed":  # one row really takes the packed copy, not F.linear
        real = PackedLinear._packed
        monkeypatch.setattr(PackedLinear, "_packed",
                            lambda self, w: calls.append(1) or real(self, w))
        with torch.inference_mode():
            model.model.layers[0].mlp.down_proj(torch.randn(1, 64))
        assert calls
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in (1, 2, 3, 9, 17, 40):
            ids = torch.randint(3, 260, (1, rows), generator=gen)
            torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
        lin = model.model.layers[0].mlp.down_proj
        x = torch.randn(2, 5, lin.in_features, generator=gen)  # batched rows keep their shape
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight),
                                   rtol=1e-5, atol=1e-5)
        if mkl_packing_available() and onednn_fp32_available():
            # laid out again for the other kernel: repacked for it, same values
            monkeypatch.setenv("PERTOKEN_FP32_GEMM", other)
            small_batch_layout(model)
            assert all(m.fp32_kernel == other for m in linears)
            torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight),
                                       rtol=1e-5, atol=1e-5)


def test_fp32_small_batch_kernel_is_measured_once_or_forced(monkeypatch):
    monkeypatch.delenv("PERTOKEN_FP32_GEMM", raising=False)
    monkeypatch.setattr("pertoken.models._FP32_KERNELS", {})
    available = {k for k, ok in (("mkl", mkl_packing_available()),
                                 ("onednn", onednn_fp32_available())) if ok}
    choice = fp32_small_batch_kernel()
    assert choice in available if available else choice is None
    assert fp32_small_batch_kernel() == choice  # kept for this thread count
    monkeypatch.setenv("PERTOKEN_FP32_GEMM", "blas")
    with pytest.raises(ValueError, match="mkl or onednn"):
        fp32_small_batch_kernel()


def test_fp32_one_row_choice_is_measured_once_or_forced(monkeypatch):
    monkeypatch.delenv("PERTOKEN_FP32_ONE_ROW", raising=False)
    monkeypatch.setattr("pertoken.models._ONE_ROW", {})
    assert fp32_one_row_packed(None) is False  # no packed kernel: nothing to take
    kernel = fp32_small_batch_kernel()
    if kernel is not None:
        choice = fp32_one_row_packed(kernel)
        assert isinstance(choice, bool)
        assert fp32_one_row_packed(kernel) == choice  # kept for this kernel and thread count
    monkeypatch.setenv("PERTOKEN_FP32_ONE_ROW", "packed")
    assert fp32_one_row_packed("onednn") is True and fp32_one_row_packed(None) is False
    monkeypatch.setenv("PERTOKEN_FP32_ONE_ROW", "sometimes")
    with pytest.raises(ValueError, match="packed or plain"):
        fp32_one_row_packed("onednn")


@needs_mkl
def test_packed_linear_follows_weight_changes_and_keeps_autograd():
    lin = torch.nn.Linear(32, 48)
    small_batch_layout(torch.nn.Sequential(lin))
    assert type(lin) is PackedLinear
    x = torch.randn(5, 32)
    with torch.inference_mode():
        before = lin(x)
    with torch.no_grad():
        lin.weight.mul_(2)  # in place: same storage, new version
    with torch.inference_mode():
        after = lin(x)
    torch.testing.assert_close(after, torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert not torch.allclose(before, after)
    lin.weight = torch.nn.Parameter(torch.randn(48, 32))  # a new tensor
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    y = lin(x.requires_grad_())  # with autograd: the plain path, gradients flow
    y.sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(5, 32))
    assert lin.weight.grad is not None
    with torch.inference_mode():  # made under inference mode: no version counter
        made = torch.nn.Linear(32, 48)
        small_batch_layout(torch.nn.Sequential(made))
        z = torch.randn(5, 32)
        torch.testing.assert_close(made(z), torch.nn.functional.linear(z, made.weight, made.bias))


def test_load_model_in_bfloat16_and_eager(tmp_path, tiny):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), dtype="bfloat16", attn_implementation="eager")
    assert loaded.dtype == torch.bfloat16
    assert loaded.config._attn_implementation == "eager"


@pytest.mark.parametrize("bad", ["/no/such/model", "no-such-alias", "someone/not-cached-here"])
def test_unknown_model_is_a_user_error(bad):
    with pytest.raises(UserError, match="no model"):
        load_model(bad)


def test_folder_without_config_and_non_gguf_file_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        resolve(str(tmp_path))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="gguf"):
        resolve(str(f))


def test_bad_dtype_is_a_user_error(tmp_path, tiny):
    with pytest.raises(UserError, match="dtype"):
        load_model(DEFAULT_MODEL, dtype="int3")


def test_find_package_file_does_not_import_the_package():
    import sys

    assert find_package_file("pertoken", "models.py") is not None
    assert find_package_file("no_such_package_xyz", "x") is None
    if ALIASES[DEFAULT_MODEL].package in sys.modules:
        pytest.skip("already imported elsewhere")
    find_package_file(ALIASES[DEFAULT_MODEL].package, ALIASES[DEFAULT_MODEL].filename)
    assert ALIASES[DEFAULT_MODEL].package not in sys.modules


def test_list_models_names_every_alias():
    rows = list_models()
    assert [r["alias"] for r in rows] == list(ALIASES)
    assert all(set(r) >= {"cached", "gguf", "install"} for r in rows)


def _default_gguf():
    entry = ALIASES[DEFAULT_MODEL]
    path = find_package_file(entry.package, entry.filename)
    if path is None:
        pytest.skip(f"default model not installed ({entry.install})")
    return path


@pytest.mark.slow
def test_default_model_conversion_matches_gguf_load_exactly(tmp_path):
    """The cached safetensors folder gives the same logits as loading the GGUF file itself."""
    gguf = _default_gguf()
    out = convert_gguf(gguf, tmp_path / "converted")
    assert json.loads((out / "pertoken.json").read_text())["dtype"] == "float32"
    from_gguf, gguf_tok = load_model(str(gguf))
    converted, tok = load_model(str(out))
    text = "The capital of France is Paris. Ünïcödé 中文 🚀\n\tdef f(x): return x"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == gguf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert sum(p.numel() for p in converted.parameters()) == 134_515_008
    batch = torch.tensor([ids])
    with torch.inference_mode():
        assert torch.equal(from_gguf(batch).logits, converted(batch).logits)


@pytest.mark.slow
def test_default_alias_loads_from_cache_and_answers_sensibly():
    _default_gguf()
    model, tok = load_model(DEFAULT_MODEL)  # converts into the test cache on first use
    assert [r for r in list_models() if r["alias"] == DEFAULT_MODEL][0]["cached"]
    model, tok = load_model(DEFAULT_MODEL)  # now from the cached folder
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:])
    assert "Paris" in answer


def test_resolve_device(monkeypatch):
    from pertoken.models import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad, needle in [("nonsense", "unknown device"), ("meta", "unsupported device")]:
        with pytest.raises(UserError, match=needle):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("CUDA:0") == torch.device("cuda", 0)
    with pytest.raises(UserError, match="1 CUDA device"):
        resolve_device("cuda:3")
