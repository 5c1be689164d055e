"""SAE metrics with pinned definitions (spec §1.6).

- :func:`evaluate`: reconstruction and sparsity over an activation store: FVU (centred, summed
  over all evaluated tokens), mean L0 and its per-token distribution, dead fraction over the
  evaluated tokens, feature densities; in ``batch`` mode (the selection rule on batches of the
  training size B) or ``threshold`` mode (token by token, :meth:`SparseAutoencoder.encode`).
- :func:`ce_loss_recovered`: the model's next-token loss with the SAE's reconstruction spliced
  into the residual stream, against the clean run and a zero ablation (CE loss recovered, ΔCE,
  KL and the KL score).

Both take the SAE in the units it expects: ``scale`` multiplies the raw activations on the way
in and divides the reconstruction on the way out (1 for an SAE read by
:func:`pertoken.sae.load`, which works on raw activations; the store's ``scale`` for one
fresh from training). Metrics are reported in raw units (FVU and CE do not depend on them).
"""

from __future__ import annotations

import logging
import math
from itertools import islice

import numpy as np
import torch

from pertoken.errors import UserError
from pertoken.sae.cache import OUTLIER_RATIO
from pertoken.sae.model import SparseAutoencoder

log = logging.getLogger(__name__)

MODES = ("batch", "threshold")
L0_QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
DENSITY_BINS = np.arange(-8.0, 0.25, 0.5)
"""log10 firing-rate bin edges of the density histogram (dead features are counted apart)"""


def default_mode(sae: SparseAutoencoder) -> str:
    """``threshold`` for batch-dependent SAEs (what inference uses), ``batch`` for TopK."""
    return "threshold" if sae.cfg.batch_dependent else "batch"


def _check_mode(sae: SparseAutoencoder, mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"unknown evaluation mode {mode!r}: choose batch or threshold")
    if mode == "threshold" and sae.cfg.batch_dependent and torch.isnan(sae.threshold).any():
        raise UserError(f"this {sae.cfg.arch} SAE has no inference thresholds: evaluate it in "
                        "batch mode or convert its thresholds first")


@torch.inference_mode()
def evaluate(sae: SparseAutoencoder, store, tokens: int | None = None, batch_size: int = 4608,
             mode: str | None = None, scale: float = 1.0,
             capacities: torch.Tensor | None = None, progress: bool = True) -> dict:
    """Reconstruction and sparsity of ``sae`` on the first ``tokens`` rows of ``store`` (an
    :class:`~pertoken.sae.cache.ActivationStore`, already shuffled; None: all of it).

    ``mode="batch"`` codes batches of ``batch_size`` tokens with the selection rule (report
    and use the training B, spec pitfall 1); for Mutual and Feature Choice only whole batches
    are evaluated (a smaller last batch would change the selection), so ``eval_tokens`` is
    rounded down to a multiple of B. TopK and ``mode="threshold"`` are token by token and use
    every token (``batch_size`` then only sets the chunk size). ``capacities``: Feature
    Choice's per-feature budgets in batch mode (default: uniform for a batch of B).

    Returns ``fvu`` = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the evaluated tokens,
    ``explained_variance``, ``mse`` (per token, raw units), ``l0`` (mean active latents per
    token) with ``l0_quantiles``, ``l0_std`` and ``l0_histogram`` (entry i: tokens with i
    active latents), ``dead_fraction``/``dead_features`` (zero firings over the evaluated
    tokens), ``feature_density`` (firing rate of each latent) with ``density_histogram``
    (log10 bins, live latents only), ``eval_tokens``, ``mode`` and ``batch_size``.
    """
    from tqdm.auto import tqdm

    cfg = sae.cfg
    mode = mode or default_mode(sae)
    _check_mode(sae, mode)
    if store.d_in != cfg.d_in:
        raise UserError(f"the SAE reads {cfg.d_in}-dimensional activations but the store holds "
                        f"{store.d_in}-dimensional ones")
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    if tokens is not None and tokens < 1:
        raise UserError(f"tokens must be positive, got {tokens}")
    n = len(store) if tokens is None else min(tokens, len(store))
    if tokens is not None and tokens > len(store):
        log.warning("the store holds %d tokens, fewer than the %d asked for", len(store), tokens)
    whole_batches = mode == "batch" and cfg.batch_dependent
    if whole_batches:
        if n < batch_size:
            raise UserError(f"batch mode needs at least one batch of {batch_size} tokens; the "
                            f"store gives {n}")
        n -= n % batch_size
    sae.eval()
    d = cfg.d_in
    sum_x = torch.zeros(d, dtype=torch.float64)
    sum_sq = 0.0
    sum_err = 0.0
    fired = torch.zeros(cfg.width, dtype=torch.long)
    l0 = torch.empty(n, dtype=torch.long)
    bar = tqdm(total=n, desc=f"sae eval ({mode})", unit="tok", unit_scale=True,
               disable=not progress)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x = store.rows(np.arange(start, stop))
        if mode == "threshold":
            a = sae.encode(x * scale)
        else:
            a = sae.codes(sae.pre_activations(x * scale), "batch", capacities)
        x_hat = sae.decode(a) / scale
        active = a != 0
        l0[start:stop] = active.sum(1)
        fired += active.sum(0)
        x64 = x.double()
        sum_x += x64.sum(0)
        sum_sq += float(x64.pow(2).sum())
        sum_err += float((x64 - x_hat.double()).pow(2).sum())
        bar.update(stop - start)
    bar.close()
    centred = sum_sq - float(sum_x.pow(2).sum()) / n
    fvu = sum_err / centred if centred > 0 else float("nan")
    density = fired.double() / n
    live = density[density > 0]
    counts, _ = np.histogram(np.log10(live.numpy()), bins=DENSITY_BINS)
    l0f = l0.double()
    dead = int((fired == 0).sum())
    result = {
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "mse": sum_err / n,
        "l0": float(l0f.mean()),
        "l0_std": float(l0f.std()) if n > 1 else 0.0,
        "l0_quantiles": {f"p{round(q * 100):02d}": float(np.quantile(l0.numpy(), q))
                         for q in L0_QUANTILES},
        "l0_min": int(l0.min()),
        "l0_max": int(l0.max()),
        "l0_histogram": torch.bincount(l0).tolist(),
        "dead_fraction": dead / cfg.width,
        "dead_features": dead,
        "feature_density": density.tolist(),
        "density_histogram": {"log10_edges": DENSITY_BINS.tolist(), "counts": counts.tolist()},
        "eval_tokens": n,
        "mode": mode,
        "batch_size": batch_size if mode == "batch" else None,
        "arch": cfg.arch,
        "k": cfg.k,
        "width": cfg.width,
    }
    log.info("%s SAE, %s mode over %d tokens: FVU %.4f, L0 %.2f, dead %.2f%%", cfg.arch, mode, n,
             fvu, result["l0"], 100 * result["dead_fraction"])
    return result


def _replace_output(output, new_hidden):
    """A decoder layer's output with its hidden states replaced (transformers 5 Llama layers
    return a tensor; older ones and some other families a tuple with the states first)."""
    if isinstance(output, tuple):
        return (new_hidden, *output[1:])
    return new_hidden


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.inference_mode()
def ce_loss_recovered(sae: SparseAutoencoder, model, tokenizer, documents, layer: int,
                      sequences: int, context: int = 256, batch_size: int = 4, scale: float = 1.0,
                      seed: int = 0, outlier_ratio: float = OUTLIER_RATIO,
                      progress: bool = True) -> dict:
    """CE loss recovered, ΔCE and KL of splicing ``sae`` into the residual stream after decoder
    layer ``layer`` (spec §1.6; SAELens ``ce_loss_score``/``kl_div_score``).

    ``sequences`` packed sequences of ``context`` tokens are built from ``documents`` as the
    activation cache builds them (shuffled with ``seed``, EOS before each document). A forward
    hook on ``model.model.layers[layer]`` replaces the layer's output at positions >= 1 by the
    SAE's token-by-token reconstruction (:meth:`SparseAutoencoder.encode`), or by zeros for the
    ablation; position 0 is left alone (the SAE never saw it), and so are the attention-sink
    tokens the cache drops (:func:`~pertoken.sae.cache.outlier_mask` with ``outlier_ratio``). The loss is scored on the
    predictions made at positions 1 .. T-2 (of tokens 2 .. T-1), the ones the splice can
    change; position 0's prediction is the same in every run and would only dilute the gap.

    Returns ``ce_clean``, ``ce_sae``, ``ce_zero`` (mean nats per token),
    ``ce_loss_recovered`` = (CE_zero - CE_SAE) / (CE_zero - CE_clean),
    ``delta_ce`` = CE_SAE - CE_clean, ``kl`` and ``kl_zero`` (mean KL(clean || spliced) per
    token), ``kl_score`` = 1 - kl / kl_zero, and the ``tokens`` scored.
    """
    from tqdm.auto import tqdm

    from pertoken.sae.cache import _sequences, check_layer, decoder_layers, outlier_mask

    check_layer(model, layer)
    if model.config.hidden_size != sae.cfg.d_in:
        raise UserError(f"the SAE reads {sae.cfg.d_in}-dimensional activations but the model's "
                        f"residual stream has {model.config.hidden_size} dimensions")
    if context < 3:
        raise UserError(f"CE loss needs a context of at least 3 tokens, got {context}")
    if sequences < 1 or batch_size < 1:
        raise UserError("sequences and batch size must be positive")
    if sae.cfg.batch_dependent and torch.isnan(sae.threshold).any():
        raise UserError(f"this {sae.cfg.arch} SAE has no inference thresholds: CE loss needs "
                        "token-by-token codes")
    seqs = list(islice(_sequences(tokenizer, documents, context, seed), sequences))
    if not seqs:
        raise UserError(f"the documents give no complete sequence of {context} tokens")
    if len(seqs) < sequences:
        log.warning("the documents give %d sequences of %d tokens, fewer than the %d asked for",
                    len(seqs), context, sequences)
    sae.eval()
    replace = {"how": None}

    def reconstruct(h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, h.shape[-1]).float()
        x_hat = sae.decode(sae.encode(x * scale)) / scale
        return x_hat.reshape(h.shape).to(h.dtype)

    def hook(module, inputs, output):
        if replace["how"] is None:
            return None
        h = _hidden(output)
        new = h.clone()
        rest = h[:, 1:]
        spliced = reconstruct(rest) if replace["how"] == "sae" else torch.zeros_like(rest)
        keep = outlier_mask(rest.reshape(-1, rest.shape[-1]), outlier_ratio).view(rest.shape[:2])
        new[:, 1:] = torch.where(keep[..., None], rest, spliced)
        return _replace_output(output, new)

    def log_probs(ids: torch.Tensor, how: str | None) -> torch.Tensor:
        replace["how"] = how
        logits = model(input_ids=ids, use_cache=False).logits
        return torch.log_softmax(logits[:, 1:-1].float(), dim=-1)

    totals = dict.fromkeys(("ce_clean", "ce_sae", "ce_zero", "kl", "kl_zero"), 0.0)
    scored = 0
    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    bar = tqdm(total=len(seqs), desc="sae ce loss", unit="seq", disable=not progress)
    try:
        for start in range(0, len(seqs), batch_size):
            ids = torch.tensor(seqs[start:start + batch_size])
            target = ids[:, 2:].unsqueeze(-1)
            clean = log_probs(ids, None)
            p_clean = clean.exp()
            totals["ce_clean"] -= float(clean.gather(-1, target).sum())
            for how, ce, kl in (("sae", "ce_sae", "kl"), ("zero", "ce_zero", "kl_zero")):
                spliced = log_probs(ids, how)
                totals[ce] -= float(spliced.gather(-1, target).sum())
                totals[kl] += float((p_clean * (clean - spliced)).sum())
            scored += target.numel()
            bar.update(ids.shape[0])
    finally:
        replace["how"] = None
        handle.remove()
        bar.close()
    out = {name: value / scored for name, value in totals.items()}
    gap = out["ce_zero"] - out["ce_clean"]
    out["ce_loss_recovered"] = (out["ce_zero"] - out["ce_sae"]) / gap if gap != 0 else math.nan
    out["delta_ce"] = out["ce_sae"] - out["ce_clean"]
    out["kl_score"] = 1 - out["kl"] / out["kl_zero"] if out["kl_zero"] > 0 else math.nan
    out.update(tokens=scored, sequences=len(seqs), context=context, layer=layer)
    log.info("layer %d, %d tokens: CE clean %.4f, SAE %.4f, zero %.4f; recovered %.4f, "
             "KL score %.4f", layer, scored, out["ce_clean"], out["ce_sae"], out["ce_zero"],
             out["ce_loss_recovered"], out["kl_score"])
    return out
