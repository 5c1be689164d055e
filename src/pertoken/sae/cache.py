"""Harvest residual-stream activations into an on-disk store (``pertoken sae cache``).

The residual stream after decoder layer ``L`` (``hidden_states[L + 1]`` of transformers, read by
a forward hook on ``model.model.layers[L]`` that stops the forward there, so the layers above
never run). Documents are shuffled (seeded), tokenised with an EOS before each and packed into
``context``-token sequences; position 0 of every sequence is dropped by default (its norm is an
attention-sink outlier, spec §4). Activations are shuffled across documents within a buffer of
several shards, then stored as float16 ``.npy`` shards (``np.load(..., mmap_mode="r")`` reads
them without loading) with ``meta.json``: model, layer, width, counts, and the mean squared
norm used to scale inputs so that ``E||x||^2 = d``. The store grows shard by shard; an
interrupted run continues with ``resume=True`` from the last whole buffer.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pertoken.atomic import atomic_path, write_json_atomic
from pertoken.errors import UserError

log = logging.getLogger(__name__)

META = "meta.json"


OUTLIER_RATIO = 3.0
"""the default cut of :func:`outlier_mask`, shared by caching, the CE splice and the CLI"""


@dataclass
class CacheConfig:
    layer: int
    tokens: int
    context: int = 256
    skip_first: bool = True
    batch_size: int = 8
    shard_tokens: int = 65_536
    shuffle_shards: int = 8
    """shards filled, shuffled together and written at once (the shuffle window)"""
    outlier_ratio: float = OUTLIER_RATIO
    """drop tokens whose activation norm exceeds this many times the batch's median norm
    (0: keep all); see :func:`outlier_mask`"""
    seed: int = 0

    def validate(self) -> None:
        for name in ("tokens", "context", "batch_size", "shard_tokens", "shuffle_shards"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.outlier_ratio < 0:
            raise UserError(f"outlier ratio must be >= 0, got {self.outlier_ratio}")
        if self.context < 2 and self.skip_first:
            raise UserError("a context of 1 token leaves nothing once position 0 is skipped")


class _Stop(Exception):
    pass


def decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UserError(f"{type(model).__name__} has no model.layers: SAE caching supports "
                        "Llama-family decoder models")
    return layers


def check_layer(model, layer: int) -> None:
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise UserError(f"layer {layer} does not exist: the model has layers 0-{n - 1}")


@torch.inference_mode()
def residual(model, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The residual stream after decoder layer ``layer`` for ``input_ids`` (batch, seq), running
    only the layers up to it."""
    captured = {}

    def hook(module, inputs, output):
        captured["x"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["x"]


def _sequences(tokenizer, documents, context: int, seed: int):
    """Packed ``context``-token sequences from the shuffled documents (EOS before each)."""
    docs = list(documents)
    random.Random(seed).shuffle(docs)
    sep = tokenizer.eos_token_id
    buffer: list[int] = []
    for start in range(0, len(docs), 256):
        for ids in tokenizer(docs[start:start + 256], add_special_tokens=False)["input_ids"]:
            if not ids:
                continue
            buffer.extend([sep] + ids)
            while len(buffer) >= context:
                yield buffer[:context]
                buffer = buffer[context:]


def outlier_mask(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Rows of ``x`` (tokens x d) whose norm exceeds ``ratio`` times the median row norm.

    On SmolLM2-135M about 1 token in 5,000 after position 0 (mostly position 1, after a
    separator or a repeated token) carries an attention-sink activation ~100x the median norm;
    those few hold three quarters of the centred variance, so an SAE's FVU would measure them
    rather than the other tokens (spec pitfall 7). A rarer few (a few in 100,000) sit at 1.5-10x
    the median, far beyond ordinary tokens (on docs-en at layer 19 the 99.9th percentile is 1.27x
    the median): a batch-dependent selection gives such a token far more than k features (its
    pre-activations scale with its norm) and overshoots it, so two held-out tokens of 200,000
    added 0.026 to a Mutual Choice SAE's FVU. The default ratio 3 drops both kinds. Caching
    drops them and the CE splice leaves them as they are, as both do for position 0. ``ratio``
    0: none."""
    if not ratio:
        return torch.zeros(x.shape[0], dtype=torch.bool)
    norms = x.float().norm(dim=-1)
    return norms > ratio * norms.median()


def read_meta(path: str | Path) -> dict:
    meta = Path(path) / META
    if not meta.is_file():
        raise UserError(f"{path} is not an activation store (no {META})")
    return json.loads(meta.read_text())


def cache_activations(model, tokenizer, documents, out: str | Path, cfg: CacheConfig,
                      model_name: str = "", corpus: str = "", resume: bool = False,
                      progress: bool = True) -> dict:
    """Write ``cfg.tokens`` activations of layer ``cfg.layer`` into the store ``out``;
    return its metadata."""
    from tqdm.auto import tqdm

    cfg.validate()
    check_layer(model, cfg.layer)
    out = Path(out)
    meta_path = out / META
    settings = {"model": model_name, "corpus": corpus, **asdict(cfg)}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if not resume:
            raise UserError(f"{out} already holds an activation store: pass --resume to "
                            "continue it, or choose another folder")
        if meta["settings"] != settings:
            raise UserError(f"{out} was cached with other settings; resume with the same flags")
    elif resume:
        raise UserError(f"nothing to resume in {out}")
    else:
        meta = {"settings": settings, "d_in": model.config.hidden_size, "layer": cfg.layer,
                "hook": f"model.layers.{cfg.layer} output (hidden_states[{cfg.layer + 1}])",
                "dtype": "float16", "shards": [], "tokens": 0, "sequences": 0,
                "sum_sq_norm": 0.0, "complete": False}
    if meta["complete"]:
        return meta
    window = cfg.shard_tokens * cfg.shuffle_shards
    stream = _sequences(tokenizer, documents, cfg.context, cfg.seed)
    for _ in range(meta["sequences"]):  # resume: skip what is stored
        next(stream, None)
    bar = tqdm(total=cfg.tokens, initial=meta["tokens"], desc="sae cache", unit="tok",
               disable=not progress, unit_scale=True)
    pending: list[np.ndarray] = []
    pending_tokens = pending_dropped = 0
    used_sequences = meta["sequences"]
    exhausted = False

    def flush(rows: np.ndarray, sequences: int, dropped: int) -> None:
        out.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([cfg.seed, len(meta["shards"])])  # same after a resume
        rows = rows[rng.permutation(rows.shape[0])]
        _write_shards(rows, out, meta, cfg.shard_tokens)
        meta["tokens"] += int(rows.shape[0])
        meta["sequences"] = sequences
        meta["outliers_dropped"] = meta.get("outliers_dropped", 0) + dropped
        meta["sum_sq_norm"] += float((rows.astype(np.float64) ** 2).sum())
        write_json_atomic(meta_path, meta)

    while meta["tokens"] + pending_tokens < cfg.tokens and not exhausted:
        batch = []
        for seq in stream:
            batch.append(seq)
            if len(batch) == cfg.batch_size:
                break
        if len(batch) < cfg.batch_size:
            exhausted = True
        if not batch:
            break
        x = residual(model, torch.tensor(batch), cfg.layer)
        if cfg.skip_first:
            x = x[:, 1:]
        rows = x.reshape(-1, x.shape[-1]).float()
        outliers = outlier_mask(rows, cfg.outlier_ratio)
        pending_dropped += int(outliers.sum())
        rows = rows[~outliers].numpy().astype(np.float16)
        used_sequences += len(batch)
        need = cfg.tokens - meta["tokens"] - pending_tokens
        rows = rows[:need]
        pending.append(rows)
        pending_tokens += rows.shape[0]
        bar.update(rows.shape[0])
        if pending_tokens >= window:
            flush(np.concatenate(pending), used_sequences, pending_dropped)
            pending, pending_tokens, pending_dropped = [], 0, 0
    if pending:
        flush(np.concatenate(pending), used_sequences, pending_dropped)
    bar.close()
    if meta["tokens"] == 0:
        raise UserError("the corpus gave no tokens to cache")
    if meta["tokens"] < cfg.tokens:
        log.warning("the corpus ran out after %d of %d tokens", meta["tokens"], cfg.tokens)
    meta["complete"] = True
    meta["mean_sq_norm"] = meta["sum_sq_norm"] / meta["tokens"]
    write_json_atomic(meta_path, meta)
    return meta


def _write_shards(rows: np.ndarray, out: Path, meta: dict, shard_tokens: int) -> None:
    """Append ``rows`` to the store ``out`` as shards of ``shard_tokens`` rows, each written
    atomically and listed in ``meta["shards"]``."""
    for first in range(0, rows.shape[0], shard_tokens):
        shard = rows[first:first + shard_tokens]
        name = f"shard-{len(meta['shards']):05d}.npy"
        with atomic_path(out / name) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, shard)
        meta["shards"].append({"file": name, "tokens": int(shard.shape[0])})


def write_store(rows: np.ndarray, out: str | Path, shard_tokens: int = 65_536,
                **settings) -> dict:
    """Write ``rows`` (tokens x d, in the given order) as a complete store at ``out``, for
    activations that come from elsewhere (tests, other tools); ``settings`` (``model``,
    ``corpus``, ``layer``, ...) go into its metadata. Returns the metadata."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise UserError("a store needs a non-empty (tokens x d) array")
    out = Path(out)
    if (out / META).exists():
        raise UserError(f"{out} already holds an activation store")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"settings": settings, "d_in": int(rows.shape[1]), "layer": settings.get("layer"),
            "dtype": "float16", "shards": [], "tokens": int(rows.shape[0]),
            "sequences": None, "sum_sq_norm": float((rows.astype(np.float64) ** 2).sum()),
            "complete": True}
    _write_shards(rows.astype(np.float16), out, meta, shard_tokens)
    meta["mean_sq_norm"] = meta["sum_sq_norm"] / meta["tokens"]
    write_json_atomic(out / META, meta)
    return meta


class ActivationStore:
    """Read a store written by :func:`cache_activations` (shards memory-mapped)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta = read_meta(path)
        if not self.meta.get("complete"):
            raise UserError(f"{path} is an unfinished activation store: resume caching first")
        if self.meta["tokens"] == 0:
            raise UserError(f"{path} holds no activations")
        self.d_in = int(self.meta["d_in"])
        self.shards = [np.load(self.path / s["file"], mmap_mode="r") for s in self.meta["shards"]]
        self.offsets = np.cumsum([0] + [s.shape[0] for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def scale(self) -> float:
        """The constant that makes ``E||x * scale||^2 = d`` (spec §4)."""
        return float(np.sqrt(self.d_in / self.meta["mean_sq_norm"]))

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """Activations at global row indices ``index`` (float32)."""
        index = np.asarray(index)
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        out = np.empty((index.size, self.d_in), dtype=np.float16)
        for s in np.unique(shard):
            pick = shard == s
            out[pick] = self.shards[s][index[pick] - self.offsets[s]]
        return torch.from_numpy(out).float()
