"""FedAvg: the sample-weighted mean of the shard models. McMahan et al. 2017, "Communication-Efficient Learning of
Deep Networks from Decentralized Data"."""

from __future__ import annotations

from dataclasses import dataclass

from lepton_tasks.ml.strategies.base import State, Strategy, check, per_tensor


def fedavg(states: list[State], weights: list[float]) -> State:
    """w = sum_k (n_k / n) w_k: each tensor averaged over the models, weighted by `weights` (the shards' sample
    counts)."""
    import torch

    check(states, weights)
    shares = torch.tensor(weights, dtype=torch.float64) / float(sum(weights))
    return per_tensor(states, lambda stacked: torch.tensordot(shares, stacked, dims=1))


@dataclass
class FedAvg(Strategy):
    name = "fedavg"
    title = "FedAvg"
    summary = "sample-weighted mean"
    paper = "McMahan et al. 2017"
    order = 0
    # no paper_local_optimizer: the mean is of whatever the shards trained, and Adam trains these models best

    def aggregate(self, current: State, states: list[State], weights: list[float]) -> State:
        return fedavg(states, weights)
