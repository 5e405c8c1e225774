"""
### MNIST-1D: shard, train locally, merge, compress, register

Nightly at 02:00 UTC, or triggered from the UI with the form below. Each task is one call into `lepton_tasks`;
every output lands under `{LEPTON_DATA_ROOT}/lepton_mnist1d/{run_id}/{stage}/` and `report.json` sums it up.

ingest → validate (Great Expectations) → shard (Dask) → train (one model per shard on Dask workers, R rounds)
→ merge (FedAvg) → compress (pruning, ONNX, int8) → register (MLflow; `champion` moves only on a better model).
"""

import pendulum
from airflow.sdk import Param, dag, task

from lepton_tasks import pipeline
from lepton_tasks.config import airflow_param_specs

DEFAULT_ARGS = {
    "owner": "lepton",
    "retries": 2,
    "retry_delay": pendulum.duration(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": pendulum.duration(minutes=10),
}


@dag(
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={name: Param(**spec) for name, spec in airflow_param_specs().items()},
    tags=["lepton", "mnist1d", "fedavg"],
    doc_md=__doc__,
)
def lepton_mnist1d():
    @task
    def ingest(**context) -> dict:
        return pipeline.ingest(pipeline.from_airflow(context))

    @task
    def validate(ingested: dict, **context) -> dict:
        return pipeline.validate(pipeline.from_airflow(context), ingested)

    @task
    def shard(ingested: dict, **context) -> dict:
        return pipeline.shard(pipeline.from_airflow(context), ingested)

    @task
    def train(shards: dict, **context) -> dict:
        return pipeline.train(pipeline.from_airflow(context), shards)

    @task
    def merge(shards: dict, trained: dict, **context) -> dict:
        return pipeline.merge(pipeline.from_airflow(context), shards, trained)

    @task
    def compress(shards: dict, merged: dict, **context) -> dict:
        return pipeline.compress(pipeline.from_airflow(context), shards, merged)

    @task
    def register(manifests: dict, **context) -> dict:
        return pipeline.register(pipeline.from_airflow(context), manifests)

    @task(trigger_rule="all_done", retries=0)
    def report(**context) -> str:
        return pipeline.finish(pipeline.from_airflow(context))

    ingested = ingest()
    validated = validate(ingested)
    shards = shard(ingested)
    validated >> shards
    trained = train(shards)
    merged = merge(shards, trained)
    compressed = compress(shards, merged)
    registered = register({"ingest": ingested, "validate": validated, "shard": shards, "train": trained,
                           "merge": merged, "compress": compressed})
    registered >> report()


lepton_mnist1d()
