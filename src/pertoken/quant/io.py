"""Save and load quantized models: a folder with the transformers ``config.json``, the
tokenizer, ``model.safetensors`` (integer codes, folded scales, the float rest) and
``quant_config.json`` naming the method, the bits and every quantized linear's layout.

6-bit weight codes are stored packed, four to three bytes (spec §2), with a per-row offset (a
centred asymmetric row spans up to 127 values but only 64 distinct ones), and unpacked at
load. The tied embedding is stored once and tied again at load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pertoken.atomic import atomic_path, write_json_atomic
from pertoken.errors import UserError
from pertoken.quant.convert import replace_linear
from pertoken.quant.fused import link_fused_blocks
from pertoken.quant.qlinear import QuantEmbedding, QuantLinear, link_shared_codes
from pertoken.quant.quantizers import QuantizedWeight, pack_int6, unpack_int6

QUANT_FILE = "quant_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = 1


def is_quantized_folder(path: str | Path) -> bool:
    return (Path(path) / QUANT_FILE).is_file()


def _layout(module: QuantLinear) -> dict:
    return {"in": module.in_features, "out": module.out_features, "act": module.act,
            "a_bits": module.a_bits, "w_bits": module.w_bits,
            "asym": module.weight_zero.numel() > 0, "bias": module.bias.numel() > 0,
            "shift": module.shift.numel() > 0, "inv_scale": module.inv_scale.numel() > 0,
            "group": module.group}


def save_quantized(model: nn.Module, tokenizer, path: str | Path, settings: dict,
                   embedding_dtype: torch.dtype | str | None = None) -> Path:
    """Write ``model`` (after :func:`~pertoken.quant.convert.quantize_model`) to ``path``.
    ``settings`` (method, bits, calibration, ...) goes into ``quant_config.json``. A float
    input embedding (which a tied head shares) is stored in ``embedding_dtype`` (None: as it
    is; ``bfloat16`` halves the largest float tensor of a small model)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a folder for a model")
    layouts = {name: _layout(m) for name, m in model.named_modules()
               if isinstance(m, QuantLinear)}
    if not layouts:
        raise UserError("the model has no quantized linears to save")
    state = {}
    tied = getattr(model.config, "tie_word_embeddings", False)
    embedding = model.get_input_embeddings()
    from_head = isinstance(embedding, QuantEmbedding)
    embedding_key = next((f"{n}.weight" for n, m in model.named_modules() if m is embedding),
                         None)
    if isinstance(embedding_dtype, str):
        embedding_dtype = getattr(torch, embedding_dtype)
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        if key == embedding_key and embedding_dtype is not None and value.is_floating_point():
            value = value.to(embedding_dtype)
        owner, _, leaf = key.rpartition(".")
        if owner in layouts and leaf == "weight_t" and layouts[owner]["w_bits"] == 6:
            # 6-bit weights may be stored centred (codes minus an asymmetric zero point, up to
            # [-63, 63]); a per-row offset brings each row back into [0, 63] for packing
            wide = value.to(torch.int16)
            offset = (-wide.amin(dim=0)).clamp(min=0)
            if int((wide + offset).max()) <= 63:
                state[f"{owner}.weight_packed"] = pack_int6(wide + offset - 32)
                state[f"{owner}.weight_offset"] = offset.to(torch.int8)
                continue
        state[key] = value.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json_atomic(path / QUANT_FILE, {"format": FORMAT, **settings, "linears": layouts,
                                          "embedding": "head" if from_head else "float"})
    return path


def _empty_linear(layout: dict) -> QuantLinear:
    n, k = layout["out"], layout["in"]
    weight = QuantizedWeight(torch.zeros(n, k, dtype=torch.int8), torch.ones(n),
                             torch.zeros(n, dtype=torch.int32) if layout["asym"] else None,
                             layout["w_bits"])
    scaled = layout.get("inv_scale", layout["act"] == "static")
    linear = QuantLinear(weight, torch.zeros(n) if layout["bias"] else None, layout["act"],
                         layout["a_bits"], inv_scale=torch.ones(k) if scaled else None,
                         shift=torch.zeros(k) if layout["shift"] else None)
    linear.group = layout.get("group", "")
    return linear


def load(path: str | Path, dtype: torch.dtype | str = torch.float32):
    """``(model, tokenizer)`` from a folder written by :func:`save_quantized`, in eval mode.
    ``dtype`` applies to the parts left in floating point (embedding, norms, head); the
    quantized linears keep their integer codes and float32 epilogues."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not is_quantized_folder(path):
        raise UserError(f"{path} is not a quantized model folder (no {QUANT_FILE})")
    try:
        settings = json.loads((path / QUANT_FILE).read_text())
        layouts = settings["linears"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{path / QUANT_FILE} is not a valid quantization config ({error})") \
            from None
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_config(config)
    for name, layout in layouts.items():
        replace_linear(model, name, _empty_linear(layout))
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if settings.get("embedding") == "head":
        model.set_input_embeddings(QuantEmbedding(model.get_output_embeddings(), dtype))
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path / WEIGHTS_FILE} cannot be read ({error})") from None
    for name, layout in layouts.items():
        packed = state.pop(f"{name}.weight_packed", None)
        if packed is not None:
            codes = unpack_int6(packed, layout["in"] * layout["out"]).view(layout["in"],
                                                                          layout["out"])
            offset = state.pop(f"{name}.weight_offset").to(torch.int16)
            state[f"{name}.weight_t"] = (codes.to(torch.int16) + 32 - offset).to(torch.int8)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{path / WEIGHTS_FILE} does not match its config: missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
    link_shared_codes(model)
    link_fused_blocks(model)
    for param in model.parameters():  # QuantLinear holds buffers only
        param.data = param.data.to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True) \
        if (path / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer

