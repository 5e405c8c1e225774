"""The models a pipeline can train, and their checkpoints (safetensors: tensors plus string metadata).

Built in: `mlp` and `cnn` (`training.model_kind`). A pipeline's own model is any `torch.nn.Module` importable in
the deployment, named in its spec as `training.model: "package.module:ClassName"` (with `training.model_kwargs`);
the project's `plugins/` folder is importable everywhere Lepton runs, Dask workers included. The contract:

- `ClassName(in_features=F, out_features=K, **model_kwargs)` builds it: F is the encoded feature width (numeric
  columns, then one-hot categories), K the number of classes, or 1 for a regression target;
- `forward(x)` takes float32 features of shape (batch, F) and returns (batch, K): logits for classification
  (softmax and cross-entropy are Lepton's), or the prediction on a unit scale for regression (Lepton rescales it to
  the target's units);
- it is deterministic given its weights (no dropout at `eval()`), its state dict holds every weight (what the
  merge strategies average), and `torch.onnx.export` (dynamo) and `torch.export` can trace it (compression,
  the registered model). With `dp_epsilon`, Opacus must be able to make it private (no BatchNorm, say).
`check_model` tries all of this on a dummy batch when a spec is checked (`lepton validate-spec`) and before a run
ingests anything.
"""

from __future__ import annotations

import importlib
import io
import json
import re
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from lepton_tasks.config.settings import MODEL_CLASS_PATH, PLUGINS_DIR
from lepton_tasks.core import store
from lepton_tasks.core.errors import IntegrityError, SpecError
from lepton_tasks.core.storage import atomic_file, sha256_file
from lepton_tasks.data.manifests import ModelShape

BUILT_IN = ("mlp", "cnn")


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


def model_class(path: str) -> type[nn.Module]:
    """The `torch.nn.Module` subclass that "package.module:ClassName" names (`plugins/` importable)."""
    if not re.match(MODEL_CLASS_PATH, path):
        raise ValueError(f"'{path}' is not a class path like 'package.module:ClassName'")
    if str(PLUGINS_DIR) not in sys.path:  # as Airflow's own processes have it; Dask workers do not
        sys.path.append(str(PLUGINS_DIR))
    module_name, class_name = path.split(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import '{path}': {type(err).__name__}: {err}") from None
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise ValueError(f"'{path}' is not a torch.nn.Module subclass")
    return found


def build_model(shape: ModelShape) -> nn.Module:
    if shape.kind == "mlp":
        body = MLP(shape)
    elif shape.kind == "cnn":
        body = CNN(shape)
    elif ":" in shape.kind:
        body = model_class(shape.kind)(in_features=shape.in_features, out_features=shape.out_features,
                                       **shape.kwargs)
    else:
        raise ValueError(f"unknown model kind '{shape.kind}' (allowed: {', '.join(BUILT_IN)} or a class path)")
    return TargetScale(body, shape.target_mean, shape.target_std) if shape.task == "regression" else body


def check_spec_model(spec, params) -> None:
    """`check_model` for a spec (`PipelineSpec`) with a model of its own, at a plausible width (each feature one
    column: the encoded width is only known from the data); nothing to check for the built-in kinds."""
    if spec.training.model is None:
        return
    classes = len(spec.target.classes) if spec.target.task == "classification" else 1
    shape = ModelShape(spec.training.model, len(spec.features), classes, params.hidden_size, spec.target.task,
                       kwargs=spec.training.model_kwargs)
    check_model(shape, private=params.dp_epsilon is not None)


def check_model(shape: ModelShape, private: bool = False) -> None:
    """Build the model, run a dummy batch through it, export it to ONNX and (`private`) ask Opacus whether DP-SGD
    can train it; a SpecError naming the field (`training.model`, or `training.dp_epsilon`) and what failed."""
    field = "training.model"
    try:
        model = build_model(shape).eval()
        with torch.no_grad():
            out = model(torch.zeros(2, shape.in_features))
    except Exception as err:
        raise SpecError(f"field '{field}': building {shape.kind} or running a batch through it failed: "
                        f"{type(err).__name__}: {err}") from None
    want = (2,) if shape.task == "regression" else (2, shape.out_features)
    if tuple(out.shape) != want:
        raise SpecError(f"field '{field}': {shape.kind} returned shape {tuple(out.shape)} for a batch of 2 rows of "
                        f"{shape.in_features} features; the contract is (batch, {shape.out_features})")
    try:
        with warnings.catch_warnings():  # the exporter's deprecation notices are torch's, not the model's
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(2, shape.in_features),), io.BytesIO(), input_names=["features"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
    except Exception as err:
        raise SpecError(f"field '{field}': {shape.kind} cannot be exported to ONNX (compression needs it): "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if private:
        from opacus.validators import ModuleValidator

        problems = ModuleValidator.validate(build_model(shape), strict=False)
        if problems:
            raise SpecError(f"field 'training.dp_epsilon': Opacus cannot make {shape.kind} private: "
                            + "; ".join(str(p) for p in problems))


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

    store.fetch(path)
    if expected_sha256 is not None and sha256_file(path) != expected_sha256 and not (
            store.fetch(path, refresh=True) and sha256_file(path) == expected_sha256):  # a stale copy on this host
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
