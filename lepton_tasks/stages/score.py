"""Score: load a pipeline's champion ONNX model from the MLflow Model Registry and score a night's rows.

What the consumer DAG `NAME_score` (see `dags/lepton_scoring.py`) does for a spec with a `score:` section, when
the champion-model Asset updates and on its own schedule. The model is the ONNX file its run chose and its
feature encoder (JSON); nothing is unpickled. Predictions land atomically in a run-scoped Parquet file; the row
count and the prediction distribution are logged to an MLflow run of the pipeline's experiment.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lepton_tasks.core.errors import BadSource, RegistryError
from lepton_tasks.core.storage import atomic_dir
from lepton_tasks.data.manifests import ScoreManifest
from lepton_tasks.ml.features import Encoder

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.parquet"
PREDICTION_COLUMN = "prediction"


@dataclass
class Champion:
    """The champion's ONNX model, encoder and where they came from."""

    name: str
    version: str
    run_id: str
    onnx_path: Path
    encoder: Encoder


def fetch_champion(tracking_uri: str, model_name: str, into: Path) -> Champion:
    """Download the version aliased `champion`: the ONNX file and the encoder registered with that version
    (`models:/NAME/VERSION`), never its run's artifacts, which a later attempt of the run could log again."""
    import mlflow
    from mlflow import MlflowClient

    from lepton_tasks.ml.champion import CHAMPION, ENCODER, VARIANTS, version_file

    mlflow.set_tracking_uri(tracking_uri)
    try:
        version = MlflowClient(tracking_uri).get_model_version_by_alias(model_name, CHAMPION)
        number = str(version.version)  # resolved once: the alias may move while the files download
        chosen = json.loads(version_file(model_name, number, VARIANTS, into).read_text())
        onnx_path = version_file(model_name, number, Path(chosen["chosen_path"]).name, into)
        encoder = json.loads(version_file(model_name, number, ENCODER, into).read_text())
    except Exception as err:
        raise RegistryError(f"cannot load the champion of registered model '{model_name}': "
                            f"{type(err).__name__}: {err}") from err
    return Champion(model_name, str(version.version), version.run_id, onnx_path, Encoder.from_dict(encoder))


def read_batch(batch_uris: list[str], data_root: Path, rows: int | None = None):
    """The rows (the first `rows`, if given) of CSV/Parquet/JSON-lines files, folders or globs (relative: under the
    data root), in order."""
    import pyarrow as pa

    from lepton_tasks.data.sources import list_source_files, read_batches, resolve_uri

    batches, total = [], 0
    for uri in batch_uris:
        fs, files = list_source_files(resolve_uri(uri, data_root))
        for path in files:
            for batch in read_batches(fs, path):
                batches.append(batch)
                total += batch.num_rows
                if rows is not None and total >= rows:
                    return pa.Table.from_batches(batches).slice(0, rows).to_pandas()
    if not batches:
        raise BadSource(f"batch {batch_uris} holds no rows")
    return pa.Table.from_batches(batches).to_pandas()


def distribution(predictions: np.ndarray, task: str, classes: list[str]) -> dict[str, float]:
    """What was predicted: each class's share, or the values' mean and quantiles."""
    if task == "classification":
        return {f"share.{c}": float(np.mean(predictions == c)) for c in classes}
    values = predictions.astype("float64")
    return {"mean": float(values.mean()), **{f"p{q}": float(np.percentile(values, q)) for q in (5, 25, 50, 75, 95)}}


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


def score(tracking_uri: str, model_name: str, batch_uris: list[str], data_root: Path, out_dir: Path,
          rows: int | None = None) -> ScoreManifest:
    """Score the rows of `batch_uris` (the first `rows`, if given) with the champion; predictions next to the
    input in `out_dir`."""
    from lepton_tasks.ml.features import label_key
    from lepton_tasks.ml.metrics import evaluate

    frame = read_batch(batch_uris, data_root, rows)
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
    log.info("scored %d rows of %s with %s v%s (%s): %s", len(frame), batch_uris, model_name, champion.version,
             champion.onnx_path.name, metrics or "no target column in the batch")
    return ScoreManifest(model_name, champion.version, champion.run_id, champion.onnx_path.name, len(frame),
                         str(Path(out_dir) / PREDICTIONS_FILE), metrics, list(batch_uris),
                         distribution(predictions, champion.encoder.task, champion.encoder.classes))


def log_scoring(tracking_uri: str, experiment: str, artifact_root: str | None, dag_id: str, run_id: str,
                manifest: ScoreManifest) -> str:
    """One MLflow run per scoring DAG run (found again by its tags on a retry): rows, distribution, metrics."""
    from mlflow import MlflowClient

    from lepton_tasks.infra.tracking import TAG_DAG, TAG_RUN, ensure_experiment, log_metrics, open_run

    client = MlflowClient(tracking_uri)
    mlflow_run = open_run(client, ensure_experiment(client, experiment, artifact_root),
                          {TAG_DAG: dag_id, TAG_RUN: run_id}, f"score {run_id}")
    client.set_tag(mlflow_run, "lepton.kind", "scoring")
    client.set_tag(mlflow_run, "lepton.model_version", manifest.model_version)
    log_metrics(client, mlflow_run, {"scored_rows": manifest.rows,
                                     **{f"prediction.{k}": v for k, v in manifest.distribution.items()},
                                     **{f"eval_{k}": v for k, v in manifest.metrics.items()}})
    client.log_dict(mlflow_run, manifest.to_dict(), "scoring/manifest.json")
    client.set_terminated(mlflow_run, "FINISHED")
    return mlflow_run
