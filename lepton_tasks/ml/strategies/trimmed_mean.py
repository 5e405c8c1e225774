"""Coordinate-wise trimmed mean: robust to a shard that misbehaves. Yin et al. 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates"."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lepton_tasks.ml.strategies.base import State, Strategy, check, per_tensor


def trimmed_count(models: int, trim_fraction: float) -> int:
    """Values dropped at each end: floor(trim_fraction * models), leaving at least one."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    return min(math.floor(trim_fraction * models), (models - 1) // 2)


def trimmed_mean(states: list[State], trim_fraction: float) -> State:
    """w[j] = mean of the w_k[j] left after dropping the b largest and b smallest, b = floor(trim_fraction * K)
    of the K models (so 0.2 trims nothing from 4 models, one from each end of 8). Unweighted."""
    check(states)
    cut = trimmed_count(len(states), trim_fraction)
    return per_tensor(states, lambda stacked: stacked.sort(dim=0).values[cut:len(stacked) - cut].mean(dim=0))


@dataclass
class TrimmedMean(Strategy):
    name = "trimmed_mean"
    title = "Trimmed mean"
    summary = "coordinate-wise trimmed mean, robust to a bad shard"
    paper = "Yin et al. 2018"
    order = 6
    trim_fraction: float = 0.2

    @classmethod
    def from_params(cls, params) -> TrimmedMean:
        return cls(trim_fraction=params.trim_fraction)

    def aggregate(self, current: State, states: list[State], weights: list[float]) -> State:
        return trimmed_mean(states, self.trim_fraction)
