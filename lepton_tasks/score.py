"""Score: load a pipeline's champion ONNX model from the MLflow Model Registry and score a batch of rows.

What a downstream DAG does when the champion-model Asset updates (see `dags/lepton_score_champion.py`). The
model is the ONNX file its run chose and its feature encoder (JSON); nothing is unpickled. Predictions land
atomically in a run-scoped Parquet file.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lepton_tasks.errors import BadSource, RegistryError
from lepton_tasks.features import Encoder
from lepton_tasks.storage import atomic_dir

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.parquet"
PREDICTION_COLUMN = "prediction"


@dataclass
class ScoreManifest:
    model_name: str
    model_version: str
    mlflow_run_id: str
    onnx_file: str
    rows: int
    predictions_path: str
    metrics: dict[str, float]  # when the batch carries the target column

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Champion:
    """The champion's ONNX model, encoder and where they came from."""

    name: str
    version: str
    run_id: str
    onnx_path: Path
    encoder: Encoder


def fetch_champion(tracking_uri: str, model_name: str, into: Path) -> Champion:
    """Download the version aliased `champion`: its chosen ONNX file and its encoder."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    try:
        version = MlflowClient(tracking_uri).get_model_version_by_alias(model_name, "champion")
        fetch = mlflow.artifacts.download_artifacts
        chosen = json.loads(Path(fetch(run_id=version.run_id, artifact_path="onnx/variants.json",
                                       dst_path=str(into))).read_text())
        onnx_path = Path(fetch(run_id=version.run_id, artifact_path=f"onnx/{Path(chosen['chosen_path']).name}",
                               dst_path=str(into)))
        encoder = json.loads(Path(fetch(run_id=version.run_id, artifact_path="model/encoder.json",
                                        dst_path=str(into))).read_text())
    except Exception as err:
        raise RegistryError(f"cannot load the champion of registered model '{model_name}': "
                            f"{type(err).__name__}: {err}") from err
    return Champion(model_name, str(version.version), version.run_id, onnx_path, Encoder.from_dict(encoder))


def read_batch(batch_uri: str, data_root: Path, rows: int):
    """The first `rows` rows of a CSV/Parquet/JSON-lines file, folder or glob (relative: under the data root)."""
    import pyarrow as pa

    from lepton_tasks.ingest import list_source_files, read_batches, resolve_uri

    fs, files = list_source_files(resolve_uri(batch_uri, data_root))
    batches, total = [], 0
    for path in files:
        for batch in read_batches(fs, path):
            batches.append(batch)
            total += batch.num_rows
            if total >= rows:
                return pa.Table.from_batches(batches).slice(0, rows).to_pandas()
    if not batches:
        raise BadSource(f"batch '{batch_uri}' holds no rows")
    return pa.Table.from_batches(batches).to_pandas()


def predict(champion: Champion, frame) -> np.ndarray:
    """Class labels (classification) or values (regression) for each row of `frame`."""
    import onnxruntime as ort

    missing = [c for c in champion.encoder.source_columns if c not in frame.columns]
    if missing:
        raise BadSource(f"the batch lacks column(s) {missing} that model '{champion.name}' v{champion.version} reads")
    session = ort.InferenceSession(str(champion.onnx_path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"features": champion.encoder.encode_features(frame)})[0]
    if champion.encoder.task == "regression":
        return outputs.reshape(-1)
    return np.asarray(champion.encoder.classes, dtype=object)[outputs.argmax(axis=1)]


def score(tracking_uri: str, model_name: str, batch_uri: str, data_root: Path, out_dir: Path,
          rows: int = 1000) -> ScoreManifest:
    """Score `rows` rows of `batch_uri` with the champion; predictions next to the input in `out_dir`."""
    from lepton_tasks.features import label_key
    from lepton_tasks.metrics import evaluate

    frame = read_batch(batch_uri, data_root, rows)
    with tempfile.TemporaryDirectory(prefix="lepton-champion-") as tmp:
        champion = fetch_champion(tracking_uri, model_name, Path(tmp))
        predictions = predict(champion, frame)
    metrics = {}
    target = champion.encoder.target
    if target in frame.columns:  # a labelled batch: say how the champion does on it
        if champion.encoder.task == "regression":
            outputs, truth = predictions.astype(np.float32), frame[target].astype("float64").to_numpy()
        else:
            outputs = np.eye(len(champion.encoder.classes))[[champion.encoder.classes.index(p) for p in predictions]]
            truth = np.array([champion.encoder.classes.index(label_key(v)) for v in frame[target]])
        metrics = evaluate(champion.encoder.task, outputs, truth)
    with atomic_dir(out_dir) as tmp:
        frame.assign(**{PREDICTION_COLUMN: predictions}).to_parquet(tmp / PREDICTIONS_FILE, index=False)
    log.info("scored %d rows of %s with %s v%s (%s): %s", len(frame), batch_uri, model_name, champion.version,
             champion.onnx_path.name, metrics or "no target column in the batch")
    return ScoreManifest(model_name, champion.version, champion.run_id, champion.onnx_path.name, len(frame),
                         str(Path(out_dir) / PREDICTIONS_FILE), metrics)
