"""Calibration statistics of linear-layer inputs, recorded by forward pre-hooks (OutlierTune
spec §1.2).

For each observed linear the per-channel maximum and minimum over all calibration tokens are
kept, and the per-sample mid-range ``(max_t x_tj + min_t x_tj) / 2`` summed over samples (a
sample is one sequence), so that the symmetrizing shift is their mean over the true number of
samples. The scale after the shift follows from the extremes alone:
``max_t |x_tj - z_j| = max(max_j - z_j, z_j - min_j)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from pertoken.errors import UserError
from pertoken.quant.quantizers import EPS, qmax


@dataclass
class ChannelStats:
    channels: int
    high: torch.Tensor = field(init=False)
    low: torch.Tensor = field(init=False)
    mid_sum: torch.Tensor = field(init=False)
    samples: int = 0
    tokens: int = 0

    def __post_init__(self) -> None:
        self.high = torch.full((self.channels,), -torch.inf, dtype=torch.float64)
        self.low = torch.full((self.channels,), torch.inf, dtype=torch.float64)
        self.mid_sum = torch.zeros(self.channels, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch ``x`` (samples, tokens, channels) or (tokens, channels) as one sample."""
        x = x.detach().double()
        if x.dim() == 2:
            x = x[None]
        high, low = x.amax(dim=1), x.amin(dim=1)
        self.high = torch.maximum(self.high, high.amax(0))
        self.low = torch.minimum(self.low, low.amin(0))
        self.mid_sum += ((high + low) / 2).sum(0)
        self.samples += x.shape[0]
        self.tokens += x.shape[0] * x.shape[1]

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.high.abs(), self.low.abs())

    def shift(self, mode: str = "mean") -> torch.Tensor:
        """The symmetrizing shift: the mean over samples of each sample's mid-range (``mean``)
        or the mid-range over everything (``global``, as Outlier Suppression+)."""
        if self.samples == 0:
            raise UserError("the calibration set is empty")
        if mode == "global":
            return ((self.high + self.low) / 2).float()
        if mode != "mean":
            raise UserError(f"unknown shift mode {mode!r}: choose mean or global")
        return (self.mid_sum / self.samples).float()

    def scale(self, bits: int, shift: torch.Tensor | None = None) -> torch.Tensor:
        """Static per-channel scales ``max_t |x_tj - z_j| / qmax`` (floored at EPS)."""
        if self.samples == 0:
            raise UserError("the calibration set is empty")
        if shift is None:
            reach = self.absmax
        else:
            z = shift.double()
            reach = torch.maximum(self.high - z, z - self.low)
        return (reach / qmax(bits)).clamp(min=EPS).float()


def observe_inputs(model: nn.Module, names: Iterable[str], batches: Iterable[torch.Tensor],
                   progress: bool = True) -> dict[str, ChannelStats]:
    """Run ``model`` on ``batches`` of token ids (batch, tokens) and return the input
    statistics of each linear in ``names``. Batches must not be padded: every position of
    every row is a calibration token."""
    from tqdm.auto import tqdm

    names = list(names)
    stats: dict[str, ChannelStats] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)
        stats[name] = ChannelStats(module.in_features)

        def hook(_module, args, name=name):
            stats[name].update(args[0])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for ids in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
                model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    if any(s.samples == 0 for s in stats.values()):
        raise UserError("the calibration set is empty")
    return stats
