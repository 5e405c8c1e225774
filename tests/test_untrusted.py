"""Nothing is unpickled from a place a user can write: checkpoints are safetensors, checked against manifests."""

import ast
from pathlib import Path

import pytest

from lepton_tasks.config.settings import REPO_ROOT
from lepton_tasks.core.errors import IntegrityError
from lepton_tasks.ml.models import ModelShape, init_weights, load_checkpoint, save_checkpoint

SOURCES = [*(REPO_ROOT / "lepton_tasks").glob("*.py"), *(REPO_ROOT / "dags").glob("*.py")]
UNSAFE_CALLS = {"pickle.load", "pickle.loads", "torch.load", "joblib.load", "mlflow.pytorch.load_model",
                "mlflow.pyfunc.load_model", "cloudpickle.load", "cloudpickle.loads", "dill.load"}


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = f"{owner.id}.{node.func.attr}" if isinstance(owner, ast.Name) else node.func.attr
            if isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name):
                name = f"{owner.value.id}.{owner.attr}.{node.func.attr}"
            yield name, node


def test_no_code_path_unpickles_or_torch_loads_without_weights_only():
    found = []
    for path in SOURCES:
        for name, node in _calls(path):
            weights_only = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                               for k in node.keywords)
            if name in UNSAFE_CALLS and not (name == "torch.load" and weights_only):
                found.append(f"{path.name}:{node.lineno} {name}")
    assert found == []


def test_mlflow_pickle_deserialization_is_switched_off_for_registration(monkeypatch):
    import os

    from lepton_tasks.infra.tracking import limit_retries

    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    limit_retries()
    from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION

    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    assert MLFLOW_ALLOW_PICKLE_DESERIALIZATION.get() is False


def test_a_tampered_checkpoint_is_refused_against_its_manifest_checksum(tmp_path):
    path = tmp_path / "merged.safetensors"
    recorded = save_checkpoint(path, init_weights(ModelShape("mlp", 40, 10, 16), 0), {})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the weights
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="merged.safetensors' does not match the sha256"):
        load_checkpoint(path, recorded)
