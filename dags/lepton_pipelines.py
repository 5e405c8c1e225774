"""
### Lepton pipelines: one DAG per YAML spec in `dags/pipelines/`

Each spec (see `lepton_tasks/specs.py`) becomes a DAG with the spec's name, schedule, owner and tags, and a
trigger form whose defaults are the spec's values. Every task is one call into `lepton_tasks.pipeline`; every
output lands under `{LEPTON_DATA_ROOT}/{dag_id}/{run_id}/{stage}/` and `report.json` sums it up.

ingest → validate (Great Expectations) → shard (Dask) → train (one model per shard on Dask workers, R rounds)
→ merge (FedAvg) → compress (pruning, ONNX, int8) → register (MLflow; `champion` moves only on a better model).

A spec that does not validate becomes an import error naming its file and fields; the others still load.
"""

import pendulum
from airflow.sdk import DAG, Param, dag, task

from lepton_tasks import pipeline
from lepton_tasks.config import airflow_param_specs
from lepton_tasks.errors import SpecError
from lepton_tasks.specs import LoadedSpec, load_all

DEFAULT_ARGS = {
    "retries": 2,
    "retry_delay": pendulum.duration(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": pendulum.duration(minutes=10),
}


def build(loaded: LoadedSpec) -> DAG:
    spec = loaded.spec

    @dag(
        dag_id=spec.name,
        schedule=spec.schedule,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args={**DEFAULT_ARGS, "owner": spec.owner},
        params={name: Param(**kw) for name, kw in airflow_param_specs(spec.run_defaults()).items()},
        tags=sorted({"lepton", *spec.tags}),
        doc_md=f"{spec.description}\n\nSpec: `{loaded.path.name}` (sha256 `{loaded.sha256[:12]}`)\n{__doc__}",
    )
    def lepton_pipeline():
        @task
        def ingest(**context) -> dict:
            return pipeline.ingest(pipeline.from_airflow(context, loaded))

        @task
        def validate(ingested: dict, **context) -> dict:
            return pipeline.validate(pipeline.from_airflow(context, loaded), ingested)

        @task
        def shard(validated: dict, **context) -> dict:
            return pipeline.shard(pipeline.from_airflow(context, loaded), validated)

        @task
        def train(shards: dict, **context) -> dict:
            return pipeline.train(pipeline.from_airflow(context, loaded), shards)

        @task
        def merge(shards: dict, trained: dict, **context) -> dict:
            return pipeline.merge(pipeline.from_airflow(context, loaded), shards, trained)

        @task
        def compress(shards: dict, merged: dict, **context) -> dict:
            return pipeline.compress(pipeline.from_airflow(context, loaded), shards, merged)

        @task
        def register(manifests: dict, **context) -> dict:
            return pipeline.register(pipeline.from_airflow(context, loaded), manifests)

        @task(trigger_rule="all_done", retries=0)
        def report(**context) -> str:
            return pipeline.finish(pipeline.from_airflow(context, loaded))

        ingested = ingest()
        validated = validate(ingested)
        shards = shard(validated)  # the validated rows: the stage, or its clean part after a quarantine
        trained = train(shards)
        merged = merge(shards, trained)
        compressed = compress(shards, merged)
        registered = register({"ingest": ingested, "validate": validated, "shard": shards, "train": trained,
                               "merge": merged, "compress": compressed})
        registered >> report()

    return lepton_pipeline()


class InvalidSpecs(DAG):
    """Stands in for the specs that did not load: Airflow bags each DAG of a file on its own, so this one's
    failed validation shows as this file's import error (naming each spec, field and what is allowed) while
    every valid pipeline still loads."""

    def __init__(self, errors: dict):
        super().__init__(dag_id="lepton_invalid_specs", schedule=None)
        self.spec_errors = "\n\n".join(str(err) for err in errors.values())

    def validate(self):
        raise SpecError(self.spec_errors)


valid, invalid = load_all()
for each in valid:
    globals()[each.name] = build(each)
if invalid:
    invalid_specs = InvalidSpecs(invalid)
