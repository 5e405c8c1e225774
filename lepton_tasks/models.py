"""The model kinds a pipeline can train, and their checkpoints (safetensors: tensors plus string metadata)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lepton_tasks.errors import IntegrityError
from lepton_tasks.storage import atomic_file, sha256_file


@dataclass(frozen=True)
class ModelShape:
    """Everything needed to rebuild a model before loading its weights."""

    kind: str  # "mlp" or "cnn"
    in_features: int
    num_classes: int
    hidden: int


class MLP(nn.Module):
    """Two hidden layers: the MNIST-1D paper's MLP baseline."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(shape.in_features, shape.hidden), nn.ReLU(),
            nn.Linear(shape.hidden, shape.hidden), nn.ReLU(),
            nn.Linear(shape.hidden, shape.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Three 1-D convolutions and a linear head, after the MNIST-1D paper's CNN."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        ch = shape.hidden
        self.features = nn.Sequential(
            nn.Conv1d(1, ch, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(ch, ch, 3, stride=1, padding=1), nn.ReLU(),
            nn.Conv1d(ch, ch, 3, stride=1, padding=1), nn.ReLU(),
        )
        length = (shape.in_features + 2 - 5) // 2 + 1
        self.head = nn.Linear(ch * length, shape.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


def build_model(shape: ModelShape) -> nn.Module:
    kinds = {"mlp": MLP, "cnn": CNN}
    if shape.kind not in kinds:
        raise ValueError(f"unknown model kind '{shape.kind}' (allowed: {', '.join(kinds)})")
    return kinds[shape.kind](shape)


def init_weights(shape: ModelShape, seed: int) -> dict[str, torch.Tensor]:
    """The shared, seeded initialisation every shard starts from."""
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in build_model(shape).state_dict().items()}


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a safetensors checkpoint atomically; returns its sha256."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    return sha256_file(path)


def load_checkpoint(path: Path, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors checkpoint (never pickle), refusing one whose checksum differs from the manifest's."""
    from safetensors import safe_open

    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise IntegrityError(f"checkpoint '{path}' does not match the sha256 its manifest recorded")
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def load_model(shape: ModelShape, state: dict[str, torch.Tensor]) -> nn.Module:
    model = build_model(shape)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch: int = 4096) -> float:
    correct = sum(
        (model(features[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
        for i in range(0, len(labels), batch)
    )
    return correct / max(1, len(labels))
