"""OutlierTune: static per-channel activation quantization with folded dequantization and
symmetrization, on integer kernels (arXiv 2406.18832; spec ``outliertune.md``).

Built so far:

- :mod:`pertoken.quant.quantizers`: activation codes (dynamic per token, static per channel
  with a shift), per-row weight codes (round-to-nearest symmetric or asymmetric, MSE-clipped)
  and 6-bit packing;
- :mod:`pertoken.quant.gptq`: GPTQ weight rounding against each linear's input Hessian (of the
  folded input, for OutlierTune), run layer by layer by :func:`quantize_model`;
- :mod:`pertoken.quant.qlinear`: :class:`QuantLinear`, an int8 x int8 -> int32 GEMM
  (``torch._int_mm``) with a float32 epilogue, for any number of tokens, and
  :class:`QuantEmbedding`, a tied embedding read from a quantized head's codes;
- :mod:`pertoken.quant.kernels`: the quantizers and the epilogue fused by ``torch.compile``
  (opt-in, :func:`use_compiled_kernels`);
- :mod:`pertoken.quant.observers`: per-channel input statistics from forward pre-hooks (the
  shift over the true sample count, scales after the shift);
- :mod:`pertoken.quant.convert`: :func:`quantize_model` calibrates a Llama- or OPT-style model
  and swaps its decoder linears (static folded groups after each norm, per-token for the
  attention and MLP outputs), and optionally the output head;
- :mod:`pertoken.quant.io`: :func:`save_quantized` and :func:`load` (safetensors with packed
  6-bit weights, ``quant_config.json``, the transformers config and tokenizer).

``pertoken quant quantize`` calibrates and saves; ``pertoken eval ppl --model DIR`` and
:func:`pertoken.models.load_model` read the folder. Baselines: SmoothQuant (migration, then
per token), per-token, per-tensor static and weight-only; ``benchmarks/quant.py``
compares them with torchao's dynamic int8 in one run.
"""

from pertoken._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "ChannelStats": "pertoken.quant.observers",
    "QuantConfig": "pertoken.quant.convert",
    "QuantLinear": "pertoken.quant.qlinear",
    "QuantEmbedding": "pertoken.quant.qlinear",
    "gptq_quantize": "pertoken.quant.gptq",
    "use_compiled_kernels": "pertoken.quant.kernels",
    "quantize_head": "pertoken.quant.convert",
    "fold_channel_scales": "pertoken.quant.convert",
    "is_quantized_folder": "pertoken.quant.io",
    "load": "pertoken.quant.io",
    "save_quantized": "pertoken.quant.io",
    "linear_groups": "pertoken.quant.convert",
    "observe_inputs": "pertoken.quant.observers",
    "quantize_model": "pertoken.quant.convert",
    "QuantizedWeight": "pertoken.quant.quantizers",
    "int_matmul": "pertoken.quant.qlinear",
    "pack_int6": "pertoken.quant.quantizers",
    "per_token_codes": "pertoken.quant.quantizers",
    "quantize_weight": "pertoken.quant.quantizers",
    "static_codes": "pertoken.quant.quantizers",
    "unpack_int6": "pertoken.quant.quantizers",
})
