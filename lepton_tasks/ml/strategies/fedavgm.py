"""FedAvgM: FedAvg with server momentum over the averaged update. Hsu et al. 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification"."""

from __future__ import annotations

from dataclasses import dataclass, field

from lepton_tasks.ml.strategies.base import State, delta, step
from lepton_tasks.ml.strategies.fedavg import FedAvg, fedavg


def fedavgm(current: State, averaged: State, momentum: State | None, learning_rate: float,
            beta: float) -> tuple[State, State]:
    """delta = avg - w, v = beta * v + delta, w = w + lr * v (v starts at 0; lr 1 and beta 0 give FedAvg).
    Returns the new weights and v."""
    update = delta(averaged, current)
    velocity = {k: beta * momentum[k] + d for k, d in update.items()} if momentum else update
    return step(current, lambda k: learning_rate * velocity[k]), velocity


@dataclass
class FedAvgM(FedAvg):
    name = "fedavgm"
    title = "FedAvgM"
    summary = "server momentum over the averaged update"
    paper = "Hsu et al. 2019"
    order = 2
    paper_local_optimizer = "sgd"
    default_server_learning_rate = 1.0  # FedAvg plus momentum
    learning_rate: float = default_server_learning_rate
    momentum: float = 0.9
    velocity: State | None = field(default=None, repr=False)  # carried from round to round

    @classmethod
    def from_params(cls, params) -> FedAvgM:
        return cls(learning_rate=cls.server_learning_rate(params), momentum=params.server_momentum)

    def aggregate(self, current: State, states: list[State], weights: list[float]) -> State:
        merged, self.velocity = fedavgm(current, fedavg(states, weights), self.velocity, self.learning_rate,
                                        self.momentum)
        return merged
