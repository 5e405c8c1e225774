"""The model kinds a pipeline can train, and their checkpoints (safetensors: tensors plus string metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lepton_tasks.core.errors import IntegrityError
from lepton_tasks.core.storage import atomic_file, sha256_file
from lepton_tasks.data.manifests import ModelShape


class MLP(nn.Module):
    """Two hidden layers: the MNIST-1D paper's MLP baseline."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(shape.in_features, shape.hidden), nn.ReLU(),
            nn.Linear(shape.hidden, shape.hidden), nn.ReLU(),
            nn.Linear(shape.hidden, shape.out_features),
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
        self.head = nn.Linear(ch * length, shape.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


class TargetScale(nn.Module):
    """Regression head: one output, rescaled from the unit scale the body learns on to the target's units."""

    def __init__(self, body: nn.Module, mean: float, std: float):
        super().__init__()
        self.body = body
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1) * self.std + self.mean


def build_model(shape: ModelShape) -> nn.Module:
    kinds = {"mlp": MLP, "cnn": CNN}
    if shape.kind not in kinds:
        raise ValueError(f"unknown model kind '{shape.kind}' (allowed: {', '.join(kinds)})")
    body = kinds[shape.kind](shape)
    return TargetScale(body, shape.target_mean, shape.target_std) if shape.task == "regression" else body


def loss_fn(shape: ModelShape, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, or MSE on the unit scale (so the learning rate means the same for any target's units)."""
    if shape.task == "regression":
        return nn.functional.mse_loss(outputs / shape.target_std, targets / shape.target_std)
    return nn.functional.cross_entropy(outputs, targets)


def init_weights(shape: ModelShape, seed: int) -> dict[str, torch.Tensor]:
    """The shared, seeded initialisation every shard starts from."""
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in build_model(shape).state_dict().items()}


META_KEY = "lepton"  # all metadata under one key, as sorted JSON: see save_checkpoint


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a safetensors checkpoint atomically; returns its sha256.

    safetensors keeps metadata in a hash map whose order changes from process to process, so several keys
    would give different bytes (and checksums) for the same checkpoint; one key holding sorted JSON does not.
    """
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={META_KEY: json.dumps(metadata, sort_keys=True)})
    return sha256_file(path)


def load_checkpoint(path: Path, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors checkpoint (never pickle), refusing one whose checksum differs from the manifest's."""
    from safetensors import safe_open

    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise IntegrityError(f"checkpoint '{path}' does not match the sha256 its manifest recorded")
    with safe_open(str(path), framework="pt") as handle:
        raw = dict(handle.metadata() or {})
        metadata = json.loads(raw[META_KEY]) if META_KEY in raw else raw  # a file not written by Lepton
        return {k: handle.get_tensor(k) for k in handle.keys()}, metadata


def load_model(shape: ModelShape, state: dict[str, torch.Tensor]) -> nn.Module:
    model = build_model(shape)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, features: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    return torch.cat([model(features[i:i + batch]) for i in range(0, len(features), batch)])


def evaluate(model: nn.Module, shape: ModelShape, features: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The task's held-out metrics (see `metrics.evaluate`)."""
    from lepton_tasks.ml.metrics import evaluate as score

    return score(shape.task, predict(model, features).numpy(), targets.numpy())
