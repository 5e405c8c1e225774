"""FedProx: FedAvg's mean, with a proximal term in local training that keeps each shard near the round's global
model. Li et al. 2020, "Federated Optimization in Heterogeneous Networks"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lepton_tasks.ml.strategies.fedavg import FedAvg

if TYPE_CHECKING:
    import torch


def proximal_term(model: torch.nn.Module, start: list[torch.Tensor], mu: float) -> torch.Tensor:
    """mu/2 * ||w - w_global||^2 over the trainable parameters (`start`: the round's global weights, in
    `model.parameters()` order)."""
    return mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start, strict=True))


@dataclass
class FedProx(FedAvg):
    name = "fedprox"
    title = "FedProx"
    summary = "the mean, plus a proximal term in local training"
    paper = "Li et al. 2020"
    order = 1
    paper_local_optimizer = "sgd"
    changes_local_training = True
    mu: float = 0.01

    @classmethod
    def from_params(cls, params) -> FedProx:
        return cls(mu=params.fedprox_mu)

    @property
    def proximal_mu(self) -> float:
        return self.mu
