"""FedAdam: Adam on the server over the averaged update. Reddi et al. 2021, "Adaptive Federated Optimization"
(Algorithm 2), with Adam's bias correction of the step (Kingma & Ba 2015), as Flower's FedAdam and most
implementations have it: without it the first rounds' steps are ten times smaller than the learning rate says."""

from __future__ import annotations

from dataclasses import dataclass, field

from lepton_tasks.ml.strategies.base import State, delta, step
from lepton_tasks.ml.strategies.fedavg import FedAvg, fedavg

ADAM_BETA2, ADAM_TAU = 0.99, 1e-3  # the paper's defaults (tau bounds the adaptivity)


def fedadam(current: State, averaged: State, moments: tuple[State, State] | None, learning_rate: float,
            beta1: float, beta2: float = ADAM_BETA2, tau: float = ADAM_TAU,
            round_number: int = 1) -> tuple[State, tuple[State, State]]:
    """delta = avg - w, m = beta1 * m + (1 - beta1) * delta, v = beta2 * v + (1 - beta2) * delta^2,
    w = w + lr_t * m / (sqrt(v) + tau), lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t) at round t (m and v start
    at 0; Flower counts t one round ahead). Returns the new weights and (m, v)."""
    update = delta(averaged, current)
    first = {k: (beta1 * moments[0][k] if moments else 0) + (1 - beta1) * d for k, d in update.items()}
    second = {k: (beta2 * moments[1][k] if moments else 0) + (1 - beta2) * d * d for k, d in update.items()}
    corrected = learning_rate * (1 - beta2 ** round_number) ** 0.5 / (1 - beta1 ** round_number)
    return step(current, lambda k: corrected * first[k] / (second[k].sqrt() + tau)), (first, second)


@dataclass
class FedAdam(FedAvg):
    name = "fedadam"
    title = "FedAdam"
    summary = "server Adam over the averaged update"
    paper = "Reddi et al. 2021"
    order = 3
    paper_local_optimizer = "sgd"
    # Adam's steps are about the learning rate per weight from the first round on: a small one
    default_server_learning_rate = 0.01
    learning_rate: float = default_server_learning_rate
    beta1: float = 0.9
    moments: tuple[State, State] | None = field(default=None, repr=False)  # carried from round to round
    rounds: int = field(default=0, repr=False)

    @classmethod
    def from_params(cls, params) -> FedAdam:
        return cls(learning_rate=cls.server_learning_rate(params), beta1=params.server_momentum)

    def aggregate(self, current: State, states: list[State], weights: list[float]) -> State:
        self.rounds += 1
        merged, self.moments = fedadam(current, fedavg(states, weights), self.moments, self.learning_rate,
                                       self.beta1, round_number=self.rounds)
        return merged
