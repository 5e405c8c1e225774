"""MLflow tracking, as the stages use it: Lepton's run tags, one experiment per pipeline, one run per DAG run
(found again by its tags on a retry), metrics logged in batches."""

from __future__ import annotations

TAG_DAG = "lepton.dag_id"
TAG_RUN = "lepton.dag_run_id"
TAG_SHARD = "lepton.shard"
TAG_SCORE = "lepton.eval_score"  # the held-out value of the pipeline's metric
TAG_METRIC = "lepton.metric"
TAG_SPEC, TAG_SPEC_SHA = "lepton.spec", "lepton.spec_sha256"
TAG_SOURCE, TAG_DATA_SHA = "lepton.source_uri", "lepton.data_sha256"
TAG_COMPLETE = "lepton.complete"
TAG_MODEL_SHA = "lepton.model_sha256"  # the merged checkpoint's: with the DAG-run tags, it names a registration
TAG_SUPERSEDES = "lepton.supersedes"  # earlier MLflow runs of the same DAG run, from another model
TAG_CHAMPION_UNUSABLE = "lepton.champion_unusable"  # why the champion could not be read when this run started
TAG_WINDOW, TAG_INIT, TAG_INIT_FALLBACK = "lepton.window", "lepton.init_from", "lepton.warm_start_fallback"


def ensure_experiment(client, name: str, artifact_root: str | None) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = f"{artifact_root}/{name}" if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # a concurrent run created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def find_run(client, experiment_id: str, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], query, max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0].info.run_id if runs else None


def open_run(client, experiment_id: str, tags: dict[str, str], name: str, parent: str | None = None) -> str:
    """The run with these tags, created once."""
    return find_or_create_run(client, experiment_id, tags, name, parent)[0]


def find_or_create_run(client, experiment_id: str, tags: dict[str, str], name: str,
                        parent: str | None = None) -> tuple[str, bool]:
    """(run id, whether it was created now)."""
    run_id = find_run(client, experiment_id, {**tags, "mlflow.parentRunId": parent} if parent else tags)
    if run_id is not None:
        return run_id, False
    extra = {"mlflow.parentRunId": parent} if parent else {}
    return client.create_run(experiment_id, run_name=name, tags={**tags, **extra}).info.run_id, True


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for start in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[start:start + 500])


def limit_retries() -> None:
    """Fail within seconds, not minutes, when the tracking server is down (the Airflow retry waits instead),
    and never unpickle a model. Explicit settings in the environment win."""
    import os

    for name, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}.items():
        os.environ.setdefault(name, value)
