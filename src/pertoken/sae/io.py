"""Save and load SAEs in the SAELens folder layout (``cfg.json`` + ``sae_weights.safetensors``).

An SAE is trained on activations multiplied by the store's ``scale`` (``E||x scale||^2 = d``,
spec §4). Saving folds that constant into the weights, so the saved SAE reads and writes RAW
activations: with ``x_s = x scale``,

    z' = W_enc (x_s - b_pre) + b_enc = (W_enc scale) (x - b_pre / scale) + b_enc
    x_hat = (W_dec a + b_pre) / scale = (W_dec / scale) a + b_pre / scale,

so ``W_enc <- W_enc scale``, ``W_dec <- W_dec / scale``, ``b_pre <- b_pre / scale``; the codes,
``b_enc`` and the thresholds stay as they are (the pre-activations are unchanged; SAELens #763
only concerns SAEs that rescale activations by decoder norms, which ours do not).

Architectures map onto SAELens inference classes: our ``topk`` is SAELens ``topk``
(``apply_b_dec_to_input``, no decoder-norm rescaling); ``batchtopk``, ``mutual-choice`` and
``feature-choice`` are saved as ``jumprelu`` with their inference thresholds (spec §1.3: one
global value broadcast for Mutual Choice, one per feature for Feature Choice). ``cfg.json``
keeps our own configuration and the folded scale in a ``"pertoken"`` block, which SAELens
ignores and :func:`load` reads back.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import fields
from pathlib import Path

import torch

from pertoken.atomic import atomic_path, write_json_atomic
from pertoken.errors import UserError
from pertoken.sae.model import SAEConfig, SparseAutoencoder

log = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT_VERSION = 1
SAELENS_FORMAT = "6.0.0"
"""the SAELens config format we write (6.x; older versions are converted on load by SAELens)"""


def hook_name(layer: int) -> str:
    """The SAELens ``hook_name`` of the residual stream after decoder layer ``layer``."""
    return f"model.layers.{layer}"


def hook_layer(name: str | None) -> int | None:
    """The decoder layer of a ``hook_name`` written by :func:`hook_name` (None otherwise)."""
    match = re.fullmatch(r"model\.layers\.(\d+)", name or "")
    return int(match.group(1)) if match else None


def _saelens_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("sae-lens")
    except PackageNotFoundError:
        return SAELENS_FORMAT
    return found if int(found.split(".")[0]) >= 6 else SAELENS_FORMAT


def save_sae(sae: SparseAutoencoder, path: str | Path, scale: float = 1.0,
             metadata: dict | None = None, batch_size: int | None = None,
             capacities: torch.Tensor | None = None, folded_scale: float | None = None) -> Path:
    """Write ``sae`` (trained on activations times ``scale``) as a SAELens folder at ``path``
    that works on raw activations. Each of the two files is written atomically (weights first,
    then ``cfg.json``); other files in the folder (a trainer's checkpoints and log) stay.

    ``metadata`` goes into SAELens's ``metadata`` block (``model_name``, ``hook_name`` such as
    ``model.layers.19``, ``context_size``, ``dataset_path``, or anything else). ``batch_size``
    (the training batch B) and ``capacities`` (Feature Choice's per-feature m_j at that B, when
    they are not uniform) are kept for batch-mode evaluation and threshold calibration; see
    :func:`training_batch`. ``folded_scale``: for an SAE already in raw units (one read by
    :func:`load`, saved again with ``scale=1``), the training scale to record.
    """
    from safetensors.torch import save_file

    cfg = sae.cfg
    if not (math.isfinite(scale) and scale > 0):
        raise UserError(f"the activation scale must be a positive number, got {scale}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a folder for an SAE")
    # refuse a folder holding anything but an SAE or hidden working files (a trainer's
    # checkpoints), so that a mistyped path cannot mix an SAE into a user's folder
    if (path.is_dir() and not (path / CFG_FILE).is_file()
            and any(not p.name.startswith(".") for p in path.iterdir())):
        raise UserError(f"{path} is a folder that does not hold an SAE: refusing to replace it")
    scale = float(scale)
    with torch.no_grad():
        tensors = {
            "W_enc": (sae.W_enc.detach().float() * scale).t().contiguous(),   # (d_in, d_sae)
            "W_dec": (sae.W_dec.detach().float() / scale).t().contiguous(),   # (d_sae, d_in)
            "b_enc": sae.b_enc.detach().float().clone().contiguous(),
            "b_dec": (sae.b_pre.detach().float() / scale).contiguous(),
        }
    saelens = {"architecture": "topk", "k": cfg.k, "rescale_acts_by_decoder_norm": False}
    if cfg.batch_dependent:
        threshold = sae.threshold.detach().float()
        unset = int(torch.isnan(threshold).sum())
        if unset:
            raise UserError(f"{unset} of the {cfg.width} inference thresholds of this {cfg.arch} "
                            "SAE are unset (NaN): convert them before saving (spec §1.3)")
        if (threshold < 0).any():
            # ours keep z where z > theta; SAELens's JumpReLU also applies ReLU, so a negative
            # theta lets SAELens differ on pre-activations in (theta, 0]
            log.warning("%d negative thresholds: SAELens will zero their negative activations",
                        int((threshold < 0).sum()))
        tensors["threshold"] = threshold.clone().contiguous()
        saelens = {"architecture": "jumprelu"}
    meta = {"sae_lens_version": _saelens_version(), "sae_lens_training_version": None,
            "model_name": None, "hook_name": None, "hook_head_index": None,
            "context_size": None, "dataset_path": None}
    meta.update(metadata or {})
    config = {
        **saelens,
        "d_in": cfg.d_in,
        "d_sae": cfg.width,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
        "pertoken": {"format": FORMAT_VERSION, "config": cfg.to_dict(),
                     "scale": scale if folded_scale is None else float(folded_scale),
                     "units": "raw activations (scale folded into the weights)",
                     "batch_size": batch_size,
                     "capacities": (None if capacities is None
                                    else [int(m) for m in capacities.tolist()])},
    }
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    write_json_atomic(path / CFG_FILE, config)
    return path


def read_config(path: str | Path) -> dict:
    """The ``cfg.json`` of the pertoken SAE folder ``path`` (a :class:`UserError` if there is
    none, or if the folder was not written by :func:`save_sae`)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"no SAE folder at {path}")
    for name in (CFG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise UserError(f"{path} has no {name}: not an SAE folder")
    try:
        config = json.loads((path / CFG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path / CFG_FILE} is not valid JSON ({error})") from None
    block = config.get("pertoken") if isinstance(config, dict) else None
    if not isinstance(block, dict) or not isinstance(block.get("config"), dict):
        raise UserError(f"{path} is an SAE folder not written by pertoken (no \"pertoken\" "
                        "block in its cfg.json)")
    return config


def training_batch(config: dict) -> tuple[int | None, torch.Tensor | None]:
    """The training batch size and Feature Choice capacities kept in a ``cfg.json`` read by
    :func:`read_config` (None for what the folder does not record)."""
    block = config["pertoken"]
    caps = block.get("capacities")
    return block.get("batch_size"), (None if caps is None else torch.tensor(caps))


def load(path: str | Path) -> SparseAutoencoder:
    """Read a folder written by :func:`save_sae` back into a :class:`SparseAutoencoder`.

    The result works on raw activations, as saved (its decoder columns have norm
    ``1 / scale``); the configuration and the inference thresholds are restored.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config = read_config(path)
    saved = config["pertoken"]["config"]
    known = {f.name for f in fields(SAEConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        log.warning("%s: ignoring unknown SAE settings %s", path, ", ".join(unknown))
    try:
        cfg = SAEConfig(**{k: v for k, v in saved.items() if k in known})
    except TypeError as error:
        raise UserError(f"{path / CFG_FILE} has an incomplete SAE configuration "
                        f"({error})") from None
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path / WEIGHTS_FILE} cannot be read ({error})") from None
    d, f = cfg.d_in, cfg.width
    want = {"W_enc": (d, f), "W_dec": (f, d), "b_enc": (f,), "b_dec": (d,)}
    if cfg.batch_dependent:
        want["threshold"] = (f,)
    for name, shape in want.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise UserError(f"{path / WEIGHTS_FILE}: {name} should have shape {shape} for "
                            f"d_in={d}, width={f}, got {got}")
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(tensors["W_enc"].float().t())
        sae.W_dec.copy_(tensors["W_dec"].float().t())
        sae.b_enc.copy_(tensors["b_enc"].float())
        sae.b_pre.copy_(tensors["b_dec"].float())
        if "threshold" in tensors:
            sae.threshold.copy_(tensors["threshold"].float())
    return sae.eval()
