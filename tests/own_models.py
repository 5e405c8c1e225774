"""Model classes a test pipeline names as its own (`training.model: "tests.own_models:Name"`): ones that keep the
contract, and ones that break it in the ways a data engineer's first try does."""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Module):
    """The smallest model that keeps the contract."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.layer = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WrongWidth(Linear):
    """Returns one output too many."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features + 1)


class WithBatchNorm(nn.Module):
    """Fine for training; Opacus cannot make BatchNorm private (it mixes the rows of a batch)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class NeedsSize:
    """Not a torch.nn.Module at all."""

    def __init__(self, in_features: int, out_features: int):
        self.size = (in_features, out_features)
