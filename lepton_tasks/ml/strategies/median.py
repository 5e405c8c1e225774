"""Coordinate-wise median: robust to a shard that misbehaves. Yin et al. 2018, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates"."""

from __future__ import annotations

from dataclasses import dataclass

from lepton_tasks.ml.strategies.base import State, Strategy, check, per_tensor


def coordinate_median(states: list[State]) -> State:
    """w[j] = median_k w_k[j], each coordinate on its own (the mean of the two middle values for an even count).
    Unweighted: a bad shard moves no coordinate past the good ones."""
    check(states)

    def median(stacked):
        ordered, n = stacked.sort(dim=0).values, len(stacked)
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2

    return per_tensor(states, median)


@dataclass
class Median(Strategy):
    name = "median"
    title = "Coordinate-wise median"
    summary = "coordinate-wise median, robust to a bad shard"
    paper = "Yin et al. 2018"
    order = 5

    def aggregate(self, current: State, states: list[State], weights: list[float]) -> State:
        return coordinate_median(states)
