"""Training sparse autoencoders on a cached activation store (spec §1, §4).

Adam with the spec's defaults (lr ``2e-4 / sqrt(F / 2**14)``, eps 6.25e-10, 100 warm-up steps,
linear decay over the last 20%), the reconstruction loss scaled by ``1 / Var(x)`` (the centred
variance of a stats sample, so it reads as an FVU), the decoder kept unit-norm after every step
with its parallel gradient removed, ``b_pre`` started at the geometric median of a sample.
Dead latents are counted in tokens. Batch-dependent selections convert to inference thresholds
(spec §1.3): Mutual Choice one global value, the batch's ``kB``-th largest pre-activation;
Feature Choice one per feature, its ``m_j``-th largest. A running mean over the steps follows
training, and at the end :func:`calibrate_thresholds` replaces it by the mean of those values
over the last training batches under the final weights (the running mean lags while the
values drift: on SmolLM2 it ended 8% high and cut threshold-mode L0 from 32 to 25).

The forward and backward passes are sparse where the codes are: only the encoder's forward is
a dense (B x F) matmul; the decoder and every gradient are CSR matmuls over the selected
(token, feature) pairs (and the aux loss touches only its candidates' columns). The dense :class:`~pertoken.sae.model.SparseAutoencoder` forward and
:func:`~pertoken.sae.model.aux_loss` are the reference the tests hold this path to.

Under ``torchrun`` (gloo on CPU) each rank takes its slice of the global batch; the selection
(Mutual Choice's top ``kB``, Feature Choice's per-feature top ``m_j``), the dead and density
counters, the loss normalisers and the gradients are all reduced over the global batch, so a
2-process run follows the 1-process run on the same global batch (up to float summation order).
"""

from __future__ import annotations

import logging
import math
import resource
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pertoken.atomic import atomic_path, write_json_atomic
from pertoken.errors import UserError
from pertoken.sae.model import SAEConfig, SparseAutoencoder, underused, zipf_fit
from pertoken.sae.selection import (_fill_ties, topk_entries, uniform_capacities,
                                    zipf_capacities)

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    tokens: int
    """training tokens (the store is cycled if it holds fewer)"""
    batch_size: int = 4608
    """tokens per step over all ranks (B; Feature Choice's uniform m = kB/F)"""
    lr: float = 0.0
    """0: ``2e-4 / sqrt(F / 2**14)`` (the sparsify / dictionary_learning scaling)"""
    adam_eps: float = 6.25e-10
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    """the learning rate decays linearly to 0 over this last fraction of the steps"""
    dead_tokens: int = 0
    """a latent is dead after this many tokens without firing (0: a quarter of ``tokens``,
    at most 10M; the spec's 2.5M of a 10M-token run)"""
    density_decay: float = 0.99
    """per-step decay of the running feature densities (aux_zipf, Zipf capacities)"""
    threshold_decay: float = 0.99
    """per-step decay of the running inference thresholds"""
    calibration_batches: int = 16
    """batches (the run's last ones) whose statistics under the final weights set the saved
    inference thresholds of batch-dependent selections (0: keep the running means)"""
    capacity_every: int = 10
    """steps between updates of Zipf capacities (the TopK demand they rank features by)"""
    grad_clip: float = 0.0
    """clip the global gradient norm to this (0: no clipping, as OpenAI's recipe)"""
    init_sample: int = 32_768
    """rows for the geometric-median ``b_pre`` and the loss's variance"""
    checkpoint_every: int = 50
    seed: int = 0

    def validate(self, world: int = 1) -> None:
        if self.tokens < 1:
            raise UserError(f"--tokens must be at least 1, got {self.tokens}")
        if self.batch_size < 1:
            raise UserError(f"the batch size must be at least 1, got {self.batch_size}")
        if self.batch_size % world:
            raise UserError(f"the batch size {self.batch_size} is not divisible by the "
                            f"{world} processes")
        if self.lr < 0 or self.adam_eps <= 0:
            raise UserError("the learning rate must be >= 0 and Adam's eps > 0")
        for name in ("density_decay", "threshold_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name} must be in [0, 1)")
        if not 0 <= self.decay_fraction <= 1:
            raise UserError("decay_fraction must be in [0, 1]")
        if self.calibration_batches < 0:
            raise UserError("calibration_batches must be >= 0")

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def effective_lr(self, width: int) -> float:
        return self.lr or 2e-4 / math.sqrt(width / 2 ** 14)

    def effective_dead_tokens(self) -> int:
        return self.dead_tokens or max(1, min(10_000_000, self.tokens // 4))

    def lr_factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        start = int(self.steps * (1 - self.decay_fraction))
        decay = 1.0 if step < start else (self.steps - step) / max(1, self.steps - start)
        return warm * decay


class Comm:
    """Collectives over the ranks of ``torch.distributed`` (no-ops for a single process)."""

    def __init__(self) -> None:
        dist = torch.distributed
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            torch.distributed.all_reduce(t)
        return t

    def min(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return t

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``t`` from every rank, in rank order (equal shapes)."""
        if not self.on:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world)]
        torch.distributed.all_gather(out, t.contiguous())
        return out


def _allowed_ties(room: torch.Tensor, equal: list[torch.Tensor], rank: int) -> torch.Tensor:
    """Ties at the boundary go to the lowest global index: rank ``rank`` may take what is left
    of ``room`` after the ranks before it took their equal entries."""
    before = sum(equal[:rank], torch.zeros_like(room))
    return (room - before).clamp(min=0).minimum(equal[rank])


def global_batch_topk(z: torch.Tensor, k: int, budget: int, comm: Comm):
    """Mutual Choice over the global batch: the ``budget`` (= k x global B) largest entries of
    all ranks' ``z``, ties to the lowest global row-major index (rank order, then row-major),
    as :func:`~pertoken.sae.selection.batch_topk_mask` on the concatenated batch.
    Returns the local selection as ``(rows, cols)`` in row-major order (the mask's
    ``nonzero``) and the global ``budget``-th value.

    The candidates are each row's top ``4k`` entries, and every entry of the rows whose
    ``4k``-th value reaches the ``budget``-th largest candidate (rows that may hold more than
    ``4k`` of the budget; common early in training). Every entry at or above the global
    ``budget``-th value is then a candidate, so the selection is exact and is read from the
    candidates, with no pass over the dense ``z`` after the row top-k."""
    n, width = z.shape
    per_row = min(4 * k, width)
    rows_top, rows_index = torch.topk(z, per_row, dim=1)
    rows_index += torch.arange(n).unsqueeze(1) * width  # row-major indices into z
    values, index = rows_top.reshape(-1), rows_index.reshape(-1)
    local = min(budget, values.numel())
    if per_row < width and local:
        whole = rows_top[:, -1] >= torch.topk(values, local).values[-1]
        if bool(whole.any()):
            rows = whole.nonzero().squeeze(1)
            log.debug("Mutual Choice: %d of %d rows may take more than %d entries", len(rows),
                      n, per_row)
            values = torch.cat([rows_top[~whole].reshape(-1), z[rows].reshape(-1)])
            index = torch.cat([rows_index[~whole].reshape(-1),
                               (rows.unsqueeze(1) * width + torch.arange(width)).reshape(-1)])
    cand = torch.topk(values, min(budget, values.numel())).values
    if cand.numel() < budget:
        cand = torch.cat([cand, cand.new_full((budget - cand.numel(),), -math.inf)])
    kth = torch.topk(torch.cat(comm.gather(cand)), budget).values[-1]
    above, equal = values > kth, values == kth
    # count_nonzero: a bool sum() converts to int64 first
    room = budget - comm.sum(torch.count_nonzero(above).reshape(1))
    allowed = _allowed_ties(room, comm.gather(torch.count_nonzero(equal).reshape(1)), comm.rank)
    ties = index[equal].sort().values[:int(allowed)]
    chosen = torch.cat([index[above], ties]).sort().values
    return (chosen // width, chosen % width), kth


def global_feature_choice(z: torch.Tensor, capacities: torch.Tensor, comm: Comm):
    """Feature Choice over the global batch: column ``j`` keeps its ``capacities[j]`` largest
    entries over all ranks' rows (ties to the lowest global row), as
    :func:`~pertoken.sae.selection.feature_choice_mask` on the concatenated batch.
    Returns the local selection as ``(rows, cols)`` in row-major order (the mask's
    ``nonzero``) and each column's ``m_j``-th value (NaN where ``m_j = 0``).

    Each feature's candidates are its largest ``max m_j`` entries, from one ``topk`` over the
    transposed (contiguous) ``z``, and one more; the selection is read from them unless some
    feature's last candidate ties its ``m_j``-th value (then from the dense mask)."""
    n, f = z.shape
    caps = capacities.to(torch.long)
    top = int(caps.max()) if f else 0
    nan = torch.full((f,), math.nan)
    if top == 0:
        none = torch.zeros(0, dtype=torch.long)
        return (none, none), nan
    take = min(top + 1, n)  # one past the largest m_j: a tie at m_j shows in the list
    cand, cand_rows = torch.topk(z.t().contiguous(), take, dim=1)  # (F, take), descending
    local = cand[:, :top]
    if local.shape[1] < top:
        local = torch.cat([local, local.new_full((f, top - local.shape[1]), -math.inf)], dim=1)
    merged = local if comm.world == 1 else torch.topk(torch.cat(comm.gather(local), dim=1), top,
                                                      dim=1).values
    kth = merged.gather(1, (caps - 1).clamp(min=0)[:, None])[:, 0]
    live = caps > 0
    stat = torch.where(live, kth, nan)
    if not (take == n or bool((cand[:, -1] < kth)[live].all())):  # a tie may lie past the list
        above = torch.count_nonzero(z > kth, dim=0)
        equal = torch.count_nonzero(z == kth, dim=0)
        room = caps - comm.sum(above.clone())
        allowed = _allowed_ties(room, comm.gather(equal), comm.rank)
        mask = _fill_ties(z, kth[None], (above + allowed)[None], dim=0) & live[None]
        return mask.nonzero(as_tuple=True), stat
    above = (cand > kth[:, None]) & live[:, None]
    equal = (cand == kth[:, None]) & live[:, None]
    room = caps - comm.sum(torch.count_nonzero(above, dim=1))
    allowed = _allowed_ties(room, comm.gather(torch.count_nonzero(equal, dim=1)), comm.rank)
    tie_col, tie_at = equal.nonzero(as_tuple=True)  # the lowest rows of each feature first
    tie_row = cand_rows[tie_col, tie_at]
    order = torch.argsort(tie_col * n + tie_row)
    tie_col, tie_row = tie_col[order], tie_row[order]
    counts = torch.bincount(tie_col, minlength=f)
    within = torch.arange(len(tie_col)) - (torch.cumsum(counts, 0) - counts)[tie_col]
    keep = within < allowed[tie_col]
    col, at = above.nonzero(as_tuple=True)
    chosen = torch.cat([cand_rows[col, at] * f + col, tie_row[keep] * f + tie_col[keep]])
    chosen = chosen.sort().values
    return (chosen // f, chosen % f), stat


@torch.no_grad()
def calibrate_thresholds(sae: SparseAutoencoder, batches, batch_size: int,
                         capacities: torch.Tensor | None = None,
                         comm: Comm | None = None) -> int:
    """Set a batch-dependent SAE's inference thresholds from its current weights: the mean,
    over ``batches`` (each this rank's rows of a global batch of ``batch_size``), of the value
    its training selection cuts at. Mutual Choice: the global batch's ``k * batch_size``-th
    largest pre-activation (0 when fewer are positive), one value for every feature. Feature
    Choice: each feature's ``capacities[j]``-th largest (default uniform ``kB/F``); a feature
    with no capacity keeps its threshold. The units are the batches' (scaled in training, raw
    for a saved SAE). Returns the number of batches used."""
    cfg = sae.cfg
    if not cfg.batch_dependent:
        raise UserError(f"a {cfg.arch} SAE has no inference thresholds to calibrate")
    comm = comm or Comm()
    if capacities is None:
        capacities = uniform_capacities(cfg.width, batch_size, cfg.k)
    total = torch.zeros(cfg.width, dtype=torch.float64)
    count = torch.zeros(cfg.width, dtype=torch.long)
    used = 0
    for x in batches:
        z = sae.pre_activations(x)
        if cfg.arch == "feature-choice":
            _, kth = global_feature_choice(z, capacities, comm)
            ok = ~torch.isnan(kth)
        else:
            _, kth = global_batch_topk(z, cfg.k, cfg.k * batch_size, comm)
            kth = kth.expand(cfg.width)
            ok = torch.ones(cfg.width, dtype=torch.bool)
        total += torch.where(ok, kth.double().clamp(min=0), 0.0)
        count += ok
        used += 1
    if used == 0:
        raise UserError("no batches to calibrate the thresholds on")
    seen = count > 0
    sae.threshold[seen] = (total[seen] / count[seen]).to(sae.threshold.dtype)
    return used


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's iteration (written by hand: torch has no geometric median)."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp(min=1e-12)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() <= tol * max(1.0, float(m.norm())):
            m = new
            break
        m = new
    return m.float()


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
         shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from row-major sorted (``rows``, ``cols``) pairs."""
    crow = torch.searchsorted(rows, torch.arange(shape[0] + 1, dtype=rows.dtype))
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


class _Selected(torch.autograd.Function):
    """Pre-activations ``z[rows, cols]`` (already computed without autograd and passed as
    ``values``) as a function of ``x - b_pre``, ``W_enc`` and ``b_enc``. The backward pass
    multiplies the sparse (B x F) gradient as a CSR matrix, never forming it densely.
    ``(rows, cols)`` must be row-major sorted."""

    @staticmethod
    def forward(ctx, xe, w_enc, b_enc, rows, cols, values):
        ctx.save_for_backward(xe, w_enc, rows, cols)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        xe, w_enc, rows, cols = ctx.saved_tensors
        g = _csr(rows, cols, grad, (xe.shape[0], w_enc.shape[0]))
        d_b = torch.bincount(cols, weights=grad, minlength=w_enc.shape[0]).to(grad.dtype)
        d_xe = g @ w_enc
        d_w = g.t().to_sparse_csr() @ xe
        return d_xe, d_w, d_b, None, None, None


class _Decode(torch.autograd.Function):
    """``A @ W_dec^T`` for the sparse codes ``A`` (values ``acts`` at row-major sorted
    ``(rows, cols)``), by CSR matmuls; the codes' gradient is the sampled product
    ``(G W_dec)[rows, cols]`` (``torch.sparse.sampled_addmm``)."""

    @staticmethod
    def forward(ctx, acts, w_dec, rows, cols, tokens):
        a = _csr(rows, cols, acts, (tokens, w_dec.shape[1]))
        ctx.save_for_backward(acts, w_dec, rows, cols)
        ctx.tokens = tokens
        return a @ w_dec.t().contiguous()

    @staticmethod
    def backward(ctx, grad):
        acts, w_dec, rows, cols = ctx.saved_tensors
        shape = (ctx.tokens, w_dec.shape[1])
        pattern = _csr(rows, cols, torch.zeros_like(acts), shape)
        d_acts = torch.sparse.sampled_addmm(pattern, grad.contiguous(), w_dec, beta=0.0).values()
        d_w = (_csr(rows, cols, acts, shape).t().to_sparse_csr() @ grad).t()
        return d_acts, d_w, None, None, None


class Trainer:
    """One SAE's training state: the model, Adam, and the running counters. ``step`` consumes
    one batch (this rank's rows of the global batch)."""

    def __init__(self, sae: SparseAutoencoder, cfg: TrainConfig, comm: Comm | None = None):
        self.sae, self.cfg = sae, cfg
        self.comm = comm or Comm()
        cfg.validate(self.comm.world)
        f = sae.cfg.width
        # fused: one pass per parameter instead of one per Adam operation (a fifth of a CPU step)
        self.opt = torch.optim.Adam(sae.parameters(), lr=cfg.effective_lr(f),
                                    betas=cfg.betas, eps=cfg.adam_eps, fused=True)
        self.base_lr = cfg.effective_lr(f)
        self.step_index = 0
        self.variance = 1.0
        self.since_fired = torch.zeros(f, dtype=torch.long)
        self.density = torch.full((f,), math.nan)
        self.demand = torch.full((f,), math.nan)
        self.capacities = uniform_capacities(f, cfg.batch_size, sae.cfg.k)
        self.capacity_alpha = sae.cfg.capacity_alpha
        self.threshold_seen = torch.zeros(f, dtype=torch.bool)

    # -- set-up ----------------------------------------------------------------------------
    @torch.no_grad()
    def initialise(self, sample: torch.Tensor) -> None:
        """``b_pre`` at the sample's geometric median; the loss's variance from the sample."""
        self.sae.b_pre.copy_(geometric_median(sample))
        self.variance = float((sample.double() - sample.double().mean(0)).pow(2).sum(1).mean())

    def state_dict(self) -> dict:
        return {"sae": self.sae.state_dict(), "opt": self.opt.state_dict(), "step": self.step_index,
                "variance": self.variance, "since_fired": self.since_fired,
                "density": self.density, "demand": self.demand, "capacities": self.capacities,
                "capacity_alpha": self.capacity_alpha, "threshold_seen": self.threshold_seen}

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.step_index = state["step"]
        self.variance = state["variance"]
        for name in ("since_fired", "density", "demand", "capacities", "threshold_seen"):
            setattr(self, name, state[name])
        self.capacity_alpha = state["capacity_alpha"]

    # -- one step --------------------------------------------------------------------------
    def dead(self) -> torch.Tensor:
        return self.since_fired >= self.cfg.effective_dead_tokens()

    def _select(self, z: torch.Tensor):
        """The local selection as ``(rows, cols)`` in row-major order (a mask's ``nonzero``)
        and, for Feature Choice, each feature's ``m_j``-th value its threshold learns from
        (Mutual Choice's statistic comes from the kept codes, in :meth:`loss`)."""
        arch, k = self.sae.cfg.arch, self.sae.cfg.k
        if arch == "topk":
            return topk_entries(z, k), None
        if arch in ("batchtopk", "mutual-choice"):
            entries, _ = global_batch_topk(z, k, k * self.cfg.batch_size, self.comm)
            return entries, None
        if self.sae.cfg.capacities == "zipf" and self.step_index % self.cfg.capacity_every == 0:
            self._update_capacities(z)
        return global_feature_choice(z, self.capacities, self.comm)

    def _update_capacities(self, z: torch.Tensor) -> None:
        """Zipf capacities ranked by each feature's TopK demand (how often it is among a
        token's k largest pre-activations, a running mean); the exponent is fitted to that
        demand curve unless the config fixes it (spec §1.2, a project reconstruction)."""
        cfg, b = self.sae.cfg, self.cfg.batch_size
        counts = self.comm.sum(torch.bincount(topk_entries(z, cfg.k)[1],
                                              minlength=cfg.width).double())
        rate = counts / b
        decay = self.cfg.density_decay ** self.cfg.capacity_every
        self.demand = rate if torch.isnan(self.demand).any() else decay * self.demand + (1 - decay) * rate
        if cfg.capacity_alpha == 0:
            _, self.capacity_alpha = zipf_fit(self.demand, beta=cfg.capacity_beta)
        order = torch.argsort(self.demand, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(order.numel())
        self.capacities = zipf_capacities(ranks, b, cfg.k, self.capacity_alpha, cfg.capacity_beta)

    @torch.no_grad()
    def _learn_thresholds(self, stat) -> None:
        sae, decay = self.sae, self.cfg.threshold_decay
        if stat is None:
            return
        if stat.dim() == 0:  # Mutual Choice: one global value
            if not math.isfinite(float(stat)):
                return
            stat = stat.expand_as(sae.threshold)
            ok = torch.ones_like(self.threshold_seen)
        else:  # Feature Choice: per feature, where the feature had a capacity
            ok = ~torch.isnan(stat)
            stat = stat.clamp(min=0)
        first = ok & ~self.threshold_seen
        sae.threshold.copy_(torch.where(first, stat, sae.threshold))
        both = ok & self.threshold_seen
        sae.threshold.copy_(torch.where(both, decay * sae.threshold + (1 - decay) * stat,
                                        sae.threshold))
        self.threshold_seen |= ok

    def loss(self, x: torch.Tensor):
        """The step's loss on this rank's rows ``x`` (already scaled; its gradient summed over
        ranks is the global batch's) and what :meth:`step` needs to finish the step."""
        sae, cfg, comm = self.sae, self.cfg, self.comm
        with torch.no_grad():
            z = sae.pre_activations(x)
            (rows, cols), stat = self._select(z)
            values = z[rows, cols]
            keep = values > 0  # the ReLU zeroes the others (and their gradient)
            rows, cols, values = rows[keep], cols[keep], values[keep]
            if sae.cfg.arch in ("batchtopk", "mutual-choice"):  # the smallest selected positive
                low = values.min() if values.numel() else z.new_tensor(math.inf)
                stat = comm.min(low.reshape(1).clone())[0]
        xe = x - sae.b_pre
        acts = _Selected.apply(xe, sae.W_enc, sae.b_enc, rows, cols, values)
        x_hat = _Decode.apply(acts, sae.W_dec, rows, cols, x.shape[0]) + sae.b_pre
        sq = (x - x_hat).pow(2).sum()
        loss = sq / (cfg.batch_size * self.variance)
        aux_value = torch.zeros(())
        aux_features = 0
        if sae.cfg.aux != "none":
            candidates, weights = self._aux_candidates()
            aux_features = int(candidates.sum())
            if aux_features:
                aux_value = self._aux(x, x_hat, z, xe, candidates, weights)
                loss = loss + sae.cfg.aux_coef * aux_value
        return loss, {"stat": stat, "cols": cols, "sq": sq.detach(), "aux": aux_value.detach(),
                      "aux_features": aux_features}

    def step(self, x: torch.Tensor) -> dict:
        """One optimiser step on this rank's rows ``x`` (already scaled). Returns global
        statistics: ``fvu`` (of this batch, before the step), ``l0``, ``dead``, ``loss``,
        ``aux`` and ``aux_features`` (the latents the aux loss trained: the dead ones for
        aux_k, dead and under-used for aux_zipf)."""
        sae, cfg, comm = self.sae, self.cfg, self.comm
        b_global = cfg.batch_size
        loss, info = self.loss(x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._reduce_grads()
        sae.remove_parallel_grad()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = self.base_lr * cfg.lr_factor(self.step_index)
        self.opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            fired = comm.sum(torch.bincount(info["cols"], minlength=sae.cfg.width))
            rate = fired.double() / b_global
            self.density = rate if torch.isnan(self.density).any() else (
                cfg.density_decay * self.density + (1 - cfg.density_decay) * rate)
            self.since_fired = torch.where(fired > 0, torch.zeros_like(self.since_fired),
                                           self.since_fired + b_global)
            self._learn_thresholds(info["stat"])
            mean = comm.sum(x.sum(0).double()) / b_global  # the global batch mean
            sums = comm.sum(torch.stack([
                info["sq"].double(), (x.double() - mean).pow(2).sum(),
                torch.tensor(float(info["cols"].numel()), dtype=torch.float64),
                loss.detach().double(), info["aux"].double()]))
        self.step_index += 1
        return {"fvu": float(sums[0] / sums[1]), "l0": float(sums[2] / b_global),
                "dead": int(self.dead().sum()), "loss": float(sums[3]),
                "aux": float(sums[4]) / comm.world, "aux_features": info["aux_features"]}

    def _aux_candidates(self):
        dead = self.dead()
        if self.sae.cfg.aux == "auxk":
            return dead, None
        if torch.isnan(self.density).any():
            return dead, None
        return underused(self.density, dead, self.sae.cfg.zipf_tau,
                         weighting=self.sae.cfg.zipf_weighting)

    def _aux(self, x, x_hat, z, xe, candidates, weights):
        """The aux_k loss of :func:`~pertoken.sae.model.aux_loss`, with the residual's
        centring taken over the global batch. Only the candidate latents' columns enter the
        (dense) matmuls, so it costs in proportion to their number."""
        sae, comm = self.sae, self.comm
        index = candidates.nonzero().squeeze(1)
        n = index.numel()
        kk = min(sae.cfg.effective_aux_k, n)
        with torch.no_grad():
            e = (x - x_hat).detach()
            mean = comm.sum(e.sum(0).double()) / self.cfg.batch_size
            den = comm.sum((e.double() - mean).pow(2).sum().reshape(1))[0].clamp(min=1e-12)
        pre = xe @ sae.W_enc[index].t() + sae.b_enc[index]  # (B, candidates)
        acts = torch.relu(pre) if sae.cfg.aux_relu else pre
        if kk < n:
            keep = torch.zeros_like(pre, dtype=torch.bool)
            keep.scatter_(1, torch.topk(pre.detach(), kk, dim=1).indices, True)
            acts = acts * keep
        if weights is not None:
            acts = acts * weights[index]
        e_hat = acts @ sae.W_dec[:, index].t()
        loss = (e - e_hat).pow(2).sum() / den.float()
        if sae.cfg.aux_scale_by_dead:
            loss = loss * min(n / sae.cfg.effective_aux_k, 1.0)
        return loss

    def _reduce_grads(self) -> None:
        if not self.comm.on:
            return
        grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.comm.sum(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _batch(store, scale: float, step: int, batch: int, comm: Comm) -> torch.Tensor:
    """This rank's rows of global batch ``step``: consecutive rows of the (already shuffled)
    store, cycled when the run outlasts it."""
    local = batch // comm.world
    start = step * batch + comm.rank * local
    return store.rows(np.arange(start, start + local) % len(store)) * scale


def train_sae(store, output: str | Path, sae_cfg: SAEConfig, cfg: TrainConfig,
              resume: bool = False, metadata: dict | None = None,
              progress: bool = True, log_every: int = 10) -> dict:
    """Train an SAE on ``store`` (an :class:`~pertoken.sae.cache.ActivationStore`) and save it
    to ``output`` in SAELens's layout, in the store's raw units. Checkpoints go to
    ``output/.train/checkpoint.pt`` every ``cfg.checkpoint_every`` steps; ``resume`` continues
    from the last one to the same result as an uninterrupted run. Returns the run's summary
    (also written to ``output/training.json``): final running statistics, history, tokens per
    second, wall time."""
    from tqdm.auto import tqdm

    from pertoken.sae.io import save_sae

    comm = Comm()
    if sae_cfg.d_in != store.d_in:
        raise UserError(f"the SAE's input dimension {sae_cfg.d_in} does not match the store's "
                        f"{store.d_in}")
    sae_cfg.validate()
    cfg.validate(comm.world)
    out = Path(output)
    ckpt = out / ".train" / "checkpoint.pt"
    sae = SparseAutoencoder(sae_cfg, seed=cfg.seed)
    trainer = Trainer(sae, cfg, comm)
    identity = {"sae": sae_cfg.to_dict(), "train": asdict(cfg), "store": str(store.path),
                "world": comm.world}
    history: list[dict] = []
    if ckpt.is_file() and not resume:
        raise UserError(f"{out} already holds a training run: pass --resume to continue it "
                        "or choose another folder")
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        saved = {key: state["identity"][key] for key in ("sae", "train")}
        if saved != {"sae": identity["sae"], "train": identity["train"]}:
            raise UserError(f"{ckpt} was written with other settings: resume with the same "
                            "options or choose another folder")
        trainer.load_state_dict(state["trainer"])
        history = state["history"]
        log.info("resuming %s at step %d", out, trainer.step_index)
    else:
        sample_rows = min(cfg.init_sample, len(store))
        trainer.initialise(store.rows(np.arange(sample_rows)) * store.scale)

    def checkpoint() -> None:
        if comm.rank == 0:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(ckpt) as tmp:
                torch.save({"identity": identity, "trainer": trainer.state_dict(),
                            "history": history}, tmp)

    bar = tqdm(total=cfg.steps, initial=trainer.step_index, unit="step", desc="sae train",
               disable=not progress or comm.rank != 0)
    began, steps_run = time.perf_counter(), 0
    stats: dict = {}
    while trainer.step_index < cfg.steps:
        stats = trainer.step(_batch(store, store.scale, trainer.step_index, cfg.batch_size, comm))
        steps_run += 1
        bar.update(1)
        if trainer.step_index % log_every == 0 or trainer.step_index == cfg.steps:
            history.append({"step": trainer.step_index, **stats})
            bar.set_postfix(fvu=f"{stats['fvu']:.3f}", l0=f"{stats['l0']:.1f}",
                            dead=stats["dead"])
        if trainer.step_index % cfg.checkpoint_every == 0 or trainer.step_index == cfg.steps:
            checkpoint()
    bar.close()
    seconds = time.perf_counter() - began
    summary = {
        "steps": cfg.steps, "tokens": cfg.steps * cfg.batch_size, "batch_size": cfg.batch_size,
        "world": comm.world, "threads": torch.get_num_threads(),
        "seconds": seconds, "tokens_per_second": steps_run * cfg.batch_size / max(seconds, 1e-9),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final": stats, "history": history, "lr": trainer.base_lr,
        "dead_tokens": cfg.effective_dead_tokens(), "capacity_alpha": trainer.capacity_alpha,
        "scale": store.scale, "config": identity,
        "capacities": trainer.capacities.tolist() if sae_cfg.capacities == "zipf" else None,
    }
    if sae_cfg.batch_dependent and cfg.calibration_batches:
        before = sae.threshold.clone()
        first = max(0, cfg.steps - cfg.calibration_batches)
        used = calibrate_thresholds(
            sae, (_batch(store, store.scale, step, cfg.batch_size, comm)
                  for step in range(first, cfg.steps)),
            cfg.batch_size, trainer.capacities, comm)
        summary["threshold_calibration"] = {
            "batches": used, "running_mean": float(torch.nanmean(before)),
            "calibrated_mean": float(torch.nanmean(sae.threshold))}
        log.info("inference thresholds from %d batches under the final weights: mean %.4g "
                 "(running mean %.4g)", used, summary["threshold_calibration"]["calibrated_mean"],
                 summary["threshold_calibration"]["running_mean"])
    if sae_cfg.batch_dependent:
        unset = torch.isnan(sae.threshold)
        if unset.any():  # Zipf capacities that never reached a feature: it never fires
            log.warning("%d features never had a Feature Choice capacity: their thresholds "
                        "are set to +inf", int(unset.sum()))
            sae.threshold[unset] = math.inf
    if comm.rank == 0:
        settings = store.meta.get("settings", {})
        meta = {"model_name": settings.get("model"), "hook_name":
                f"model.layers.{store.meta.get('layer')}", "layer": store.meta.get("layer"),
                "context_size": settings.get("context"), "dataset_path": settings.get("corpus"),
                **(metadata or {})}
        save_sae(sae, out, scale=store.scale, metadata=meta, batch_size=cfg.batch_size,
                 capacities=trainer.capacities if sae_cfg.capacities == "zipf" else None)
        write_json_atomic(out / "training.json", summary)
    return summary
