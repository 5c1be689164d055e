"""The sparse autoencoder (spec §1.1) and its auxiliary losses (§1.4, §1.5).

``z' = W_enc (x - b_pre) + b_enc``; codes ``a = ReLU(z') * S`` with ``S`` the selection mask
of the architecture (:mod:`pertoken.sae.selection`), or, at inference after threshold
conversion, ``a = z' * [z' > theta]``; reconstruction ``x_hat = W_dec a + b_pre``. The decoder
columns have unit norm (restored after every optimiser step by :meth:`normalize_decoder`,
whose gradient companion :meth:`remove_parallel_grad` runs before the step).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pertoken.errors import UserError
from pertoken.sae.selection import select, uniform_capacities

ARCHITECTURES = ("topk", "batchtopk", "mutual-choice", "feature-choice")
AUX_LOSSES = ("none", "auxk", "zipf")


@dataclass
class SAEConfig:
    d_in: int
    width: int
    k: int
    arch: str = "topk"
    aux: str = "auxk"
    aux_k: int = 0
    """latents in the auxiliary reconstruction (0: ``d_in // 2``, as SAELens and Gao App. B.1)"""
    aux_coef: float = 1 / 32
    aux_relu: bool = True
    """ReLU on the auxiliary activations (OpenAI) rather than raw pre-activations (SAELens)"""
    aux_scale_by_dead: bool = False
    """scale the auxiliary loss by ``min(n_candidates / aux_k, 1)`` (SAELens, sparsify)"""
    zipf_tau: float = 4.0
    """aux_zipf: a feature is under-used when its density is below the Zipf fit / tau"""
    zipf_weighting: bool = False
    """aux_zipf: weight feature j by ``min(1, log(fit / p_j) / log tau)``"""
    capacities: str = "uniform"
    """Feature Choice capacities: ``uniform`` (m = kB/F) or ``zipf`` (spec §1.2)"""
    capacity_alpha: float = 0.0
    """Zipf capacities' exponent (0: fitted during training to the features' TopK demand)"""
    capacity_beta: float = 1.0
    """Zipf capacities' rank offset beta"""

    def validate(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise UserError(f"unknown architecture {self.arch!r}: choose from {', '.join(ARCHITECTURES)}")
        if self.aux not in AUX_LOSSES:
            raise UserError(f"unknown aux loss {self.aux!r}: choose from {', '.join(AUX_LOSSES)}")
        if self.d_in < 1 or self.width < 1:
            raise UserError("the SAE's input dimension and width must be positive")
        if not 1 <= self.k < self.width:
            raise UserError(f"k must be at least 1 and below the width {self.width}, got {self.k}")
        if self.aux_k < 0:
            raise UserError(f"aux-k must be >= 0, got {self.aux_k}")
        if self.zipf_tau <= 1:
            raise UserError(f"zipf tau must be above 1, got {self.zipf_tau}")
        if self.capacities not in ("uniform", "zipf"):
            raise UserError(f"unknown capacities {self.capacities!r}: choose uniform or zipf")
        if self.capacity_alpha < 0 or self.capacity_beta < 0:
            raise UserError("Zipf capacity alpha and beta must be >= 0")

    @property
    def batch_dependent(self) -> bool:
        """Whether a token's code depends on the rest of its batch (Mutual and Feature Choice);
        such SAEs encode single tokens through thresholds."""
        return self.arch != "topk"

    @property
    def effective_aux_k(self) -> int:
        return self.aux_k or max(1, self.d_in // 2)

    def to_dict(self) -> dict:
        return asdict(self)


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SAEConfig, seed: int = 0) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(cfg.d_in, cfg.width, generator=g)
        w = w / w.norm(dim=0, keepdim=True)
        self.W_dec = nn.Parameter(w)                      # (d, F), unit columns
        self.W_enc = nn.Parameter(w.t().clone())          # tied initialisation
        self.b_enc = nn.Parameter(torch.zeros(cfg.width))
        self.b_pre = nn.Parameter(torch.zeros(cfg.d_in))
        # threshold-mode inference: one global value (Mutual Choice) or one per feature
        self.register_buffer("threshold", torch.full((cfg.width,), float("nan")))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x - self.b_pre, self.W_enc, self.b_enc)  # the bias added in the GEMM

    def codes(self, z: torch.Tensor, mode: str = "batch",
              capacities: torch.Tensor | None = None) -> torch.Tensor:
        """Codes from pre-activations ``z`` (tokens x F): ``batch`` applies the selection rule
        (in float32), ``threshold`` the converted thresholds."""
        if mode == "threshold":
            if torch.isnan(self.threshold).any():
                raise UserError("this SAE has no inference thresholds (train it first)")
            return z * (z > self.threshold)
        mask = select(z.detach(), self.cfg.arch, self.cfg.k, capacities)
        return torch.relu(z) * mask

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token-by-token codes: TopK's own rule, or the inference thresholds of a batch-dependent
        selection (spec §1.3)."""
        z = self.pre_activations(x)
        return self.codes(z, "threshold" if self.cfg.batch_dependent else "batch")

    def decode(self, a: torch.Tensor) -> torch.Tensor:
        return a @ self.W_dec.t() + self.b_pre

    def forward(self, x: torch.Tensor, mode: str = "batch",
                capacities: torch.Tensor | None = None):
        """``(x_hat, codes, pre-activations)``."""
        z = self.pre_activations(x)
        a = self.codes(z, mode, capacities)
        return self.decode(a), a, z

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp(min=1e-12))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out of each decoder column's gradient its component along the column (the
        column is unit-norm), so the step moves along the sphere (Gao et al.)."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(0, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    def default_capacities(self, tokens: int) -> torch.Tensor:
        return uniform_capacities(self.cfg.width, tokens, self.cfg.k)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``
    (centred, spec §1.6)."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp(min=1e-12)


def aux_loss(sae: SparseAutoencoder, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor,
             candidates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Gao et al.'s auxiliary loss on the latents ``candidates`` (a bool mask over F: the dead
    ones for aux_k, dead or under-used for aux_zipf): reconstruct the detached residual
    ``e = x - x_hat`` from each token's top ``aux_k`` candidate pre-activations, decoder only
    (no bias), scored as ``||e - e_hat||^2 / ||e - mean(e)||^2``. ``weights`` (over F)
    scale the candidates' activations. Zero when there is no candidate."""
    n = int(candidates.sum())
    if n == 0:
        return z.new_zeros(())
    cfg = sae.cfg
    k = min(cfg.effective_aux_k, n)
    e = (x - x_hat).detach()
    masked = z.masked_fill(~candidates, float("-inf"))
    values, index = torch.topk(masked, k, dim=1)
    if cfg.aux_relu:
        values = torch.relu(values)
    if weights is not None:
        values = values * weights[index]
    acts = torch.zeros_like(z).scatter(1, index, values)
    e_hat = acts @ sae.W_dec.t()
    loss = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp(min=1e-12)
    if cfg.aux_scale_by_dead:
        loss = loss * min(n / cfg.effective_aux_k, 1.0)
    return loss


def zipf_fit(densities: torch.Tensor, exclude_bottom: float = 0.1, beta: float = 1.0):
    """``(C, alpha)`` of ``p(r) = C (r + beta)^-alpha`` fitted by least squares in log-log
    space to the densities sorted in decreasing order (ranks from 1), leaving out the bottom
    ``exclude_bottom`` of ranks and zero densities (spec §1.5, a project reconstruction)."""
    p = torch.sort(densities.double(), descending=True).values
    keep = max(2, int(math.ceil(p.numel() * (1 - exclude_bottom))))
    p = p[:keep]
    r = torch.arange(1, p.numel() + 1, dtype=torch.float64)
    ok = p > 0
    if int(ok.sum()) < 2:
        return float(p.max().clamp(min=1e-12)), 0.0
    lx, ly = torch.log(r[ok] + beta), torch.log(p[ok])
    slope = ((lx - lx.mean()) * (ly - ly.mean())).sum() / (lx - lx.mean()).pow(2).sum()
    c = math.exp(float(ly.mean() - slope * lx.mean()))
    return c, float(-slope)


def underused(densities: torch.Tensor, dead: torch.Tensor, tau: float, beta: float = 1.0,
              weighting: bool = False):
    """aux_zipf's candidates: features whose density ``p_j`` is below the Zipf fit at their
    rank divided by ``tau``, plus the dead ones; and their weights
    ``min(1, log(fit / p_j) / log tau)`` (1 for dead features) when ``weighting``."""
    c, alpha = zipf_fit(densities, beta=beta)
    order = torch.argsort(densities.double(), descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, order.numel() + 1)
    fit = c * (ranks.double() + beta).pow(-alpha)
    p = densities.double()
    mask = dead | (p < fit / tau)
    if not weighting:
        return mask, None
    w = torch.where(p > 0, torch.log(fit / p.clamp(min=1e-30)) / math.log(tau),
                    torch.ones_like(p)).clamp(0, 1)
    w = torch.where(dead, torch.ones_like(w), w)
    return mask, w.float()
