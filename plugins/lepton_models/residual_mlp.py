"""A residual MLP for tabular rows: the bundled example of a pipeline's own model (`lepton_house_prices_resmlp`).

The contract (see `lepton_tasks.ml.models`): built as `ResidualMLP(in_features=F, out_features=K, **model_kwargs)`,
`forward` maps (batch, F) float32 features to (batch, K) outputs.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """x + Linear(ReLU(Linear(LayerNorm(x)))): a pre-norm block (LayerNorm, not BatchNorm: DP-SGD can train it)."""

    def __init__(self, width: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, width * expansion)
        self.down = nn.Linear(width * expansion, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class ResidualMLP(nn.Module):
    def __init__(self, in_features: int, out_features: int, width: int = 64, blocks: int = 2, expansion: int = 2):
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width, expansion) for _ in range(blocks)))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
