"""Register: log the run's artifacts and metrics in MLflow and register the merged model.

Idempotent by design: the parent run is found by its DAG-run tags before one is created, shard runs by their
shard tag, and the model version by its DAG-run tag, so a retried task completes the same run and version
instead of making new ones. Order matters for safety: everything is logged first, the version registered
second, aliases moved last; `champion` moves only when the new version's held-out metric is at least as good
as the current champion's.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lepton_tasks.metrics import at_least_as_good
from lepton_tasks.models import ModelShape, load_checkpoint, load_model

log = logging.getLogger(__name__)

TAG_DAG = "lepton.dag_id"
TAG_RUN = "lepton.dag_run_id"
TAG_SHARD = "lepton.shard"
TAG_SCORE = "lepton.eval_score"  # the held-out value of the pipeline's metric
TAG_METRIC = "lepton.metric"
TAG_SPEC, TAG_SPEC_SHA = "lepton.spec", "lepton.spec_sha256"
TAG_SOURCE, TAG_DATA_SHA = "lepton.source_uri", "lepton.data_sha256"
TAG_COMPLETE = "lepton.complete"
CANDIDATE, CHAMPION = "candidate", "champion"


@dataclass
class RunRecord:
    """Everything the earlier stages produced, as plain manifests (what came through XCom)."""

    dag_id: str
    run_id: str
    params: dict
    spec_path: str
    spec_sha256: str
    ingest: dict
    validation: dict
    shards: dict
    train: dict
    merge: dict
    compress: dict


@dataclass
class RegisterManifest:
    tracking_uri: str
    experiment_id: str
    run_id: str
    model_name: str
    model_version: str
    aliases: list[str] = field(default_factory=list)
    champion_before: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _lineage(record: RunRecord) -> dict[str, str]:
    """Which spec and which data made this model."""
    return {TAG_SPEC: Path(record.spec_path).stem, TAG_SPEC_SHA: record.spec_sha256,
            TAG_SOURCE: record.ingest["source_uri"], TAG_DATA_SHA: record.ingest["source_sha256"]}


def _experiment_id(client, name: str, artifact_root: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = f"{artifact_root}/{name}" if artifact_root else None
    return client.create_experiment(name, artifact_location=location)


def _find_run(client, experiment_id: str, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], query, max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0].info.run_id if runs else None


def _open_run(client, experiment_id: str, tags: dict[str, str], name: str, parent: str | None = None) -> str:
    """The run with these tags, created once."""
    run_id = _find_run(client, experiment_id, tags)
    if run_id is None:
        extra = {"mlflow.parentRunId": parent} if parent else {}
        run_id = client.create_run(experiment_id, run_name=name, tags={**tags, **extra}).info.run_id
    return run_id


def _log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for start in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[start:start + 500])


def summary_metrics(record: RunRecord) -> dict[str, float]:
    """The parent run's headline figures."""
    metrics = {
        "rows_ingested": record.ingest["rows"],
        "expectations_passed": record.validation["passed"],
        "expectations_failed": record.validation["failed"],
        "eval_rows": record.merge["eval_rows"],
        **{f"eval_{name}": value for name, value in record.merge["merged_metrics"].items()},
    }
    for variant in [record.compress["reference"], *record.compress["variants"]]:
        metrics.update({f"{variant['name']}_{name}": value for name, value in variant["metrics"].items()})
        for key in ("bytes", "latency_p50_ms", "latency_p99_ms"):
            metrics[f"{variant['name']}_{key}"] = variant[key]
    return metrics


def _log_shard_runs(client, experiment_id: str, parent: str, record: RunRecord) -> None:
    """One nested run per shard: per-epoch curves over all rounds, size, label mix and held-out metrics."""
    epochs_per_round = record.params["local_epochs"]
    by_shard = {s["name"]: s for s in record.shards["shards"]}
    for rnd in record.train["rounds"]:
        for ckpt in rnd:
            shard = ckpt["shard"]
            tags = {TAG_RUN: record.run_id, TAG_DAG: record.dag_id, TAG_SHARD: shard}
            run_id = _open_run(client, experiment_id, tags, shard, parent)
            for epoch in ckpt["epochs"]:
                step = (ckpt["round"] - 1) * epochs_per_round + epoch["epoch"]
                _log_metrics(client, run_id, {"loss": epoch["loss"]}, step)
    for shard, info in by_shard.items():
        run_id = _find_run(client, experiment_id, {TAG_RUN: record.run_id, TAG_DAG: record.dag_id, TAG_SHARD: shard})
        client.log_param(run_id, "rows", info["rows"])
        client.log_dict(run_id, info["label_histogram"], "label_histogram.json")
        _log_metrics(client, run_id, {f"eval_{k}": v for k, v in record.merge["shard_metrics"][shard].items()})
        client.set_terminated(run_id, "FINISHED")


def _log_artifacts(client, run_id: str, record: RunRecord) -> None:
    client.log_artifacts(run_id, str(Path(record.validation["result_path"]).parent), "validation")
    client.log_dict(run_id, record.shards, "shards/manifest.json")
    client.log_dict(run_id, record.shards["encoder"], "model/encoder.json")  # how to turn rows into model input
    client.log_artifact(run_id, record.spec_path, "spec")
    client.log_dict(run_id, record.ingest, "ingest/manifest.json")
    client.log_artifacts(run_id, record.train["stage_dir"], "checkpoints")
    client.log_artifact(run_id, record.merge["merged_path"], "merged")
    client.log_artifact(run_id, record.compress["chosen_path"], "onnx")
    client.log_dict(run_id, record.compress, "onnx/variants.json")


def _log_dataset(run_id: str, record: RunRecord) -> None:
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    source = resolve_dataset_source(record.ingest["source_uri"])
    staged = MetaDataset(source, name="ingested", digest=record.ingest["sha256"][:36])
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(staged, context="training")


def _log_model(run_id: str, record: RunRecord, eval_features) -> str:
    """Log the merged model (pt2, with signature and a 2-row input example); returns its model URI."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    shape = ModelShape(**record.train["shape"])
    model = load_model(shape, load_checkpoint(Path(record.merge["merged_path"]), record.merge["merged_sha256"])[0])
    example = eval_features[:2].numpy()  # pt2 export needs a batch of at least 2
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                                        serialization_format="pt2",
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return info.model_uri


def _existing_version(client, model_name: str, record: RunRecord):
    query = f"name = '{model_name}' and tags.`{TAG_RUN}` = '{record.run_id}'"
    versions = [v for v in client.search_model_versions(query) if v.tags.get(TAG_DAG) == record.dag_id]
    return versions[0] if versions else None


def _register_version(client, model_name: str, model_uri: str, run_id: str, record: RunRecord):
    import mlflow

    metric = record.merge["metric"]
    score = record.merge["merged_metrics"][metric]
    tags = {TAG_RUN: record.run_id, TAG_DAG: record.dag_id, TAG_METRIC: metric, TAG_SCORE: repr(score),
            **_lineage(record)}
    version = mlflow.register_model(model_uri, model_name, tags=tags)
    client.update_model_version(
        model_name, version.version,
        description=(f"FedAvg of {len(record.shards['shards'])} shards over {record.merge['rounds']} round(s); "
                     f"held-out {metric} {score:.4f} on {record.merge['eval_rows']} rows. "
                     f"Spec {Path(record.spec_path).name} (sha256 {record.spec_sha256[:12]}), data "
                     f"{record.ingest['source_uri']} (sha256 {record.ingest['source_sha256'][:12]}). "
                     f"DAG {record.dag_id}, run {record.run_id}, MLflow run {run_id}."),
    )
    return version


def _champion_score(champion, metric: str) -> float | None:
    """The champion's score on `metric`, or None when it was scored on another metric (then any model wins)."""
    if champion.tags.get(TAG_METRIC, "accuracy") != metric or TAG_SCORE not in champion.tags:
        return None
    return float(champion.tags[TAG_SCORE])


def _move_aliases(client, model_name: str, version, metric: str, score: float) -> tuple[list[str], str | None]:
    """`candidate` always; `champion` only if this version scores at least as well as the current champion."""
    client.set_registered_model_alias(model_name, CANDIDATE, version.version)
    try:
        champion = client.get_model_version_by_alias(model_name, CHAMPION)
    except Exception:  # no champion yet
        champion = None
    before = champion.version if champion else None
    best = _champion_score(champion, metric) if champion else None
    same_or_none = champion is None or champion.version == version.version or best is None
    if same_or_none or at_least_as_good(metric, score, best):
        client.set_registered_model_alias(model_name, CHAMPION, version.version)
        log.info("champion -> version %s (was %s)", version.version, before)
    else:
        log.info("champion stays at version %s (%s %.4f beats %.4f)", before, metric, best, score)
    aliases = client.get_model_version(model_name, version.version).aliases
    return sorted(aliases), before


def register(record: RunRecord, tracking_uri: str, experiment_name: str, model_name: str,
             artifact_root: str | None, eval_features) -> RegisterManifest:
    """Log the whole run to MLflow (idempotently) and register its merged model."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = _experiment_id(client, experiment_name, artifact_root)
    tags = {TAG_RUN: record.run_id, TAG_DAG: record.dag_id}
    run_id = _open_run(client, experiment_id, tags, record.run_id)
    client.update_run(run_id, status="RUNNING")
    for key, value in _lineage(record).items():
        client.set_tag(run_id, key, value)
    for key, value in record.params.items():
        client.log_param(run_id, key, value)
    _log_metrics(client, run_id, summary_metrics(record))
    _log_shard_runs(client, experiment_id, run_id, record)
    _log_artifacts(client, run_id, record)
    _log_dataset(run_id, record)
    version = _existing_version(client, model_name, record)
    if version is None:
        version = _register_version(client, model_name, _log_model(run_id, record, eval_features), run_id, record)
    metric = record.merge["metric"]
    aliases, before = _move_aliases(client, model_name, version, metric, record.merge["merged_metrics"][metric])
    client.set_tag(run_id, TAG_COMPLETE, "true")
    client.set_terminated(run_id, "FINISHED")
    return RegisterManifest(tracking_uri, experiment_id, run_id, model_name, str(version.version), aliases, before)
