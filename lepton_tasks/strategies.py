"""Merge strategies: how one round's shard models become the next global model.

Server side, each strategy is one function over state dicts (tensor name -> tensor), accumulated in float64.
Two strategies also change local training, in `train`: FedProx (a proximal term, `proximal_term`) and SCAFFOLD
(control variates, `control_variate` and `scaffold_correction`). `Server` holds what a strategy carries from round
to round (momentum, second moments) and applies the chosen one after every round.

| strategy       | server update                                  | paper                                  |
|----------------|------------------------------------------------|----------------------------------------|
| `fedavg`       | sample-weighted mean                           | McMahan et al. 2017                    |
| `fedprox`      | sample-weighted mean (local proximal term)     | Li et al. 2020                         |
| `fedavgm`      | server momentum over the averaged update       | Hsu et al. 2019                        |
| `fedadam`      | server Adam over the averaged update           | Reddi et al. 2021                      |
| `scaffold`     | sample-weighted mean (local drift correction)  | Karimireddy et al. 2020                |
| `median`       | coordinate-wise median                         | Yin et al. 2018                        |
| `trimmed_mean` | coordinate-wise trimmed mean                   | Yin et al. 2018                        |
| `greedy_soup`  | sample-weighted mean; the final model a soup   | Wortsman et al. 2022                   |
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lepton_tasks.config import MergeStrategy

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
# server learning rate where the param is left empty: FedAvgM's 1 makes it FedAvg plus momentum; Adam's steps
# are about the learning rate per weight from the first round on, so FedAdam needs a small one
DEFAULT_SERVER_LEARNING_RATE = {"fedavgm": 1.0, "fedadam": 0.01}
ADAM_BETA2, ADAM_TAU = 0.99, 1e-3  # Reddi et al. 2021's defaults (tau bounds the adaptivity)


def _check(states: list[State], weights: list[float] | None = None) -> None:
    if not states:
        raise ValueError("need at least one model to merge")
    if weights is not None:
        if len(states) != len(weights):
            raise ValueError(f"need one weight per state, got {len(states)} states and {len(weights)} weights")
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    keys = states[0].keys()
    for i, state in enumerate(states[1:], start=1):
        if state.keys() != keys:
            raise ValueError(f"state {i} has other tensors than state 0: {sorted(set(state) ^ set(keys))}")


def _per_tensor(states: list[State], combine: Callable[[torch.Tensor], torch.Tensor]) -> State:
    """`combine` over each tensor's values stacked along a new first axis (float64), cast back; tensors that are
    not floating point (counters) are taken from the first state."""
    merged = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            merged[key] = first.clone()
            continue
        merged[key] = combine(torch.stack([s[key].to(torch.float64) for s in states])).to(first.dtype)
    return merged


def fedavg(states: list[State], weights: list[float]) -> State:
    """w = sum_k (n_k / n) w_k: each tensor averaged over the models, weighted by `weights` (the shards' sample
    counts). McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data"."""
    _check(states, weights)
    shares = torch.tensor(weights, dtype=torch.float64) / float(sum(weights))
    return _per_tensor(states, lambda stacked: torch.tensordot(shares, stacked, dims=1))


def coordinate_median(states: list[State]) -> State:
    """w[j] = median_k w_k[j], each coordinate on its own (the mean of the two middle values for an even count).
    Unweighted: a bad shard moves no coordinate past the good ones. Yin et al. 2018, "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates"."""
    _check(states)

    def median(stacked: torch.Tensor) -> torch.Tensor:
        ordered, n = stacked.sort(dim=0).values, len(stacked)
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2

    return _per_tensor(states, median)


def trimmed_count(models: int, trim_fraction: float) -> int:
    """Values dropped at each end: floor(trim_fraction * models), leaving at least one."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    return min(math.floor(trim_fraction * models), (models - 1) // 2)


def trimmed_mean(states: list[State], trim_fraction: float) -> State:
    """w[j] = mean of the w_k[j] left after dropping the b largest and b smallest, b = floor(trim_fraction * K)
    of the K models (so 0.2 trims nothing from 4 models, one from each end of 8). Unweighted. Yin et al. 2018,
    "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"."""
    _check(states)
    cut = trimmed_count(len(states), trim_fraction)
    return _per_tensor(states, lambda stacked: stacked.sort(dim=0).values[cut:len(stacked) - cut].mean(dim=0))


def _delta(averaged: State, current: State) -> State:
    return {k: averaged[k].to(torch.float64) - current[k].to(torch.float64) for k in current}


def fedavgm(current: State, averaged: State, momentum: State | None, learning_rate: float,
            beta: float) -> tuple[State, State]:
    """FedAvg with server momentum: delta = avg - w, v = beta * v + delta, w = w + lr * v (v starts at 0; lr 1
    and beta 0 give FedAvg). Returns the new weights and v. Hsu et al. 2019, "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification"."""
    delta = _delta(averaged, current)
    velocity = {k: beta * momentum[k] + d for k, d in delta.items()} if momentum else delta
    return _step(current, lambda k: learning_rate * velocity[k]), velocity


def fedadam(current: State, averaged: State, moments: tuple[State, State] | None, learning_rate: float,
            beta1: float, beta2: float = ADAM_BETA2, tau: float = ADAM_TAU) -> tuple[State, tuple[State, State]]:
    """Adam on the server over the averaged update: delta = avg - w, m = beta1 * m + (1 - beta1) * delta,
    v = beta2 * v + (1 - beta2) * delta^2, w = w + lr * m / (sqrt(v) + tau) (m and v start at 0). Returns the
    new weights and (m, v). Reddi et al. 2021, "Adaptive Federated Optimization" (Algorithm 2)."""
    delta = _delta(averaged, current)
    first = {k: (beta1 * moments[0][k] if moments else 0) + (1 - beta1) * d for k, d in delta.items()}
    second = {k: (beta2 * moments[1][k] if moments else 0) + (1 - beta2) * d * d for k, d in delta.items()}
    return _step(current, lambda k: learning_rate * first[k] / (second[k].sqrt() + tau)), (first, second)


def _step(current: State, update: Callable[[str], torch.Tensor]) -> State:
    """current + update(name) for every floating-point tensor (others unchanged), in the current dtypes."""
    return {k: (v.to(torch.float64) + update(k)).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in current.items()}


def greedy_soup(candidates: list[tuple[str, State]], score: Callable[[State], float],
                higher_is_better: bool = True) -> tuple[State, list[str]]:
    """Greedy model soup: order the candidates by their own held-out score, start from the best, and add each
    next one only when the uniform average with it scores at least as well. Returns the soup and its
    ingredients' names. Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models
    improves accuracy without increasing inference time" (Recipe 1)."""
    if not candidates:
        raise ValueError("greedy_soup needs at least one candidate")
    sign = 1.0 if higher_is_better else -1.0
    scored = sorted(((sign * score(state), index, name, state) for index, (name, state) in enumerate(candidates)),
                    key=lambda item: (-item[0], item[1]))
    best, _, first_name, first_state = scored[0]
    ingredients, names = [first_state], [first_name]
    for _, _, name, state in scored[1:]:
        tried = fedavg([*ingredients, state], [1.0] * (len(ingredients) + 1))
        tried_score = sign * score(tried)
        if tried_score >= best:
            ingredients.append(state)
            names.append(name)
            best = tried_score
    return fedavg(ingredients, [1.0] * len(ingredients)), names


def proximal_term(model: torch.nn.Module, start: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's local penalty mu/2 * ||w - w_global||^2 over the trainable parameters (`start`: the round's
    global weights, in `model.parameters()` order). Li et al. 2020, "Federated Optimization in Heterogeneous
    Networks"."""
    return mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start, strict=True))


def control_variate(model: torch.nn.Module, batches, loss: Callable) -> State:
    """SCAFFOLD's option I: c_i = the shard's full gradient at the round's global weights (the mean over
    `batches` of each batch's gradient, weighted by its rows). Karimireddy et al. 2020, "SCAFFOLD: Stochastic
    Controlled Averaging for Federated Learning"."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in model.named_parameters() if p.requires_grad}
    rows = 0
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss(model(x), y).backward()
        for name, p in model.named_parameters():
            if name in total:
                total[name] += p.grad.to(torch.float64) * len(y)
        rows += len(y)
    model.zero_grad(set_to_none=True)
    return {name: (total[name] / max(rows, 1)).to(torch.float32) for name in names}


def scaffold_correction(model: torch.nn.Module, server_control: State, own_control: State) -> None:
    """SCAFFOLD's local step uses g(y) - c_i + c: add c - c_i to each parameter's gradient (before the
    optimizer's step)."""
    for name, p in model.named_parameters():
        if p.grad is not None and name in server_control:
            p.grad += (server_control[name] - own_control[name]).to(p.grad.device, p.grad.dtype)


@dataclass
class Server:
    """The server side of a strategy across rounds: `aggregate` turns a round's shard models into the next
    global model and keeps what the strategy carries over (FedAvgM's momentum, FedAdam's moments)."""

    strategy: MergeStrategy = "fedavg"
    learning_rate: float | None = None  # None: DEFAULT_SERVER_LEARNING_RATE
    momentum: float = 0.9  # FedAvgM's beta, FedAdam's beta1
    trim_fraction: float = 0.2
    carried: object = field(default=None, repr=False)

    @property
    def server_learning_rate(self) -> float:
        return self.learning_rate or DEFAULT_SERVER_LEARNING_RATE.get(self.strategy, 1.0)

    def aggregate(self, current: State, states: list[State], weights: list[float]) -> State:
        if self.strategy == "median":
            return coordinate_median(states)
        if self.strategy == "trimmed_mean":
            return trimmed_mean(states, self.trim_fraction)
        averaged = fedavg(states, weights)
        if self.strategy == "fedavgm":
            merged, self.carried = fedavgm(current, averaged, self.carried, self.server_learning_rate, self.momentum)
            return merged
        if self.strategy == "fedadam":
            merged, self.carried = fedadam(current, averaged, self.carried, self.server_learning_rate, self.momentum)
            return merged
        return averaged  # fedavg, fedprox and scaffold average; greedy_soup's soup is the merge stage's
