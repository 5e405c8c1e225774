"""What a merge strategy is: the base every strategy module subclasses, and the tensor helpers they share.

A strategy says three things, as Flower's `Strategy` does with `configure_fit` and `aggregate_fit`:
- how it changes local training: `paper_local_optimizer` (the optimizer `local_optimizer: auto` trains with),
  `proximal_mu` (FedProx's local penalty), `control_variates` (SCAFFOLD's local correction);
- how one round's shard models become the next global model: `aggregate`, with whatever the strategy carries
  from round to round (momentum, moments) kept on the instance;
- whether it chooses the run's final model among trained ones: `select_fraction` > 0 and `choose_final`.

Nothing here imports torch at module level: the DAG files read the registry (names, help) when Airflow parses
them, and that parse stays free of torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

State = dict[str, "torch.Tensor"]  # a model's state dict: tensor name -> tensor


@dataclass
class Strategy:
    """One merge strategy (subclass per module; the registry in `lepton_tasks.ml.strategies` finds it)."""

    name: ClassVar[str]  # the param value (`merge_strategy`), the spec's and the form's
    title: ClassVar[str]  # as people write it (MLflow's model version description)
    summary: ClassVar[str]  # one phrase for the form's help: what the server does
    paper: ClassVar[str]
    order: ClassVar[int]  # place in the form's dropdown
    paper_local_optimizer: ClassVar[str | None] = None  # "sgd" where the paper's step assumes local SGD; None: Adam
    control_variates: ClassVar[bool] = False  # SCAFFOLD: each shard also writes its control variate
    # local training adds a term of its own to the gradient, which DP-SGD would not privatise: refused with it
    changes_local_training: ClassVar[bool] = False
    select_fraction: ClassVar[float] = 0.0  # > 0: the final model is chosen on this share of the training side
    default_server_learning_rate: ClassVar[float | None] = None  # strategies with a server step

    @classmethod
    def from_params(cls, params) -> Strategy:
        """The strategy with the run's settings (`RunParams`: the fields it reads are its own business)."""
        return cls()

    @classmethod
    def server_learning_rate(cls, params) -> float | None:
        """The run's server learning rate (`server_learning_rate`), empty meaning this strategy's default."""
        return params.server_learning_rate or cls.default_server_learning_rate

    @property
    def proximal_mu(self) -> float:
        """Weight of a proximal term in local training (FedProx); 0: none."""
        return 0.0

    def aggregate(self, current: State, states: list[State], weights: list[float]) -> State:
        """The next global model from `current` and one round's shard models (`weights`: their rows)."""
        raise NotImplementedError

    def choose_final(self, merged: State, candidates: list[tuple[str, State]], score: Callable[[State], float],
                     higher_is_better: bool) -> tuple[State, list[str] | None]:
        """The run's final model: the last global model, unless the strategy chooses (then also what it chose)."""
        return merged, None


def check(states: list[State], weights: list[float] | None = None) -> None:
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


def per_tensor(states: list[State], combine: Callable) -> State:
    """`combine` over each tensor's values stacked along a new first axis (float64), cast back; tensors that are
    not floating point (counters) are taken from the first state."""
    import torch

    merged = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            merged[key] = first.clone()
            continue
        merged[key] = combine(torch.stack([s[key].to(torch.float64) for s in states])).to(first.dtype)
    return merged


def delta(averaged: State, current: State) -> State:
    """The round's update, averaged - current, in float64 (the server optimizers' pseudo-gradient)."""
    import torch

    return {k: averaged[k].to(torch.float64) - current[k].to(torch.float64) for k in current}


def step(current: State, update: Callable[[str], torch.Tensor]) -> State:
    """current + update(name) for every floating-point tensor (others unchanged), in the current dtypes."""
    import torch

    return {k: (v.to(torch.float64) + update(k)).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in current.items()}
