"""
### Lepton pipelines: one DAG per YAML spec in `dags/pipelines/`

Each spec (see `lepton_tasks/specs.py`) becomes a DAG with the spec's name, schedule, owner and tags, and a
trigger form whose defaults are the spec's values. Every task is one call into `lepton_tasks.pipeline`; every
output lands under `{LEPTON_DATA_ROOT}/{dag_id}/{run_id}/{stage}/` and `report.json` sums it up.

wait (deferred until the run's window of data has landed) → ingest → validate (Great Expectations) → drift
(against the champion's data) → shard (Dask) → train (one model per shard on Dask workers, R rounds of the run's
merge strategy, from scratch or the champion) → merge → compress (pruning, ONNX, int8) → register (MLflow;
`champion` moves only on a better model) → publish_champion (the Asset `NAME.champion`, only when `champion`
moved), and beside it report.
Beside ingest and validate, the setup task dask_cluster starts the run's Dask cluster, used by shard, train and
validate (which waits for it only when it partitions); the teardown stop_dask_cluster stops it after train,
whatever happened.
The spec's `notify:` notifiers hear of failures, champion changes and drift.

A spec that does not validate becomes an import error naming its file and fields; the others still load.
"""

import pendulum
from airflow.sdk import DAG, Asset, Param, dag, get_parsing_context, setup, task, teardown

from lepton_tasks import notify, pipeline
from lepton_tasks.config import airflow_param_specs
from lepton_tasks.errors import SpecError
from lepton_tasks.prebuilt import build_once
from lepton_tasks.specs import LoadedSpec, load_all
from lepton_tasks.wait import WaitForWindow

MANIFEST = {"multiple_outputs": False}  # a task's manifest is one XCom value, not one per key (a call each)

# the first retry waits [core] default_task_retry_delay (30 s in airflow.cfg; a deployment or test may set its own)
DEFAULT_ARGS = {
    "retries": 2,
    "retry_exponential_backoff": True,
    "max_retry_delay": pendulum.duration(minutes=10),
}


def assets(loaded: LoadedSpec) -> tuple[Asset, Asset]:
    """The pipeline's validated data, and its champion model (what a downstream DAG schedules on)."""
    spec = loaded.spec
    return (Asset(name=f"{spec.name}.validated_data", uri=spec.validated_data_asset_uri),
            Asset(name=f"{spec.name}.champion", uri=spec.champion_asset_uri))


def build(loaded: LoadedSpec) -> DAG:
    spec = loaded.spec
    validated_data, champion_model = assets(loaded)

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
        # deferred to the triggerer while it waits: no worker slot is held (params wait_timeout_minutes, ...)
        wait = WaitForWindow(task_id="wait", loaded=loaded, retries=0,
                             doc_md="Wait for every day of the run's window (params.window_days ending with `ds`) "
                                    "to land; fail naming the missing day(s) after params.wait_timeout_minutes.")

        @task(**MANIFEST)
        def ingest(**context) -> dict:
            """Copy the source (params.source_uri) into this run's immutable Parquet stage; row count, schema and
            checksums in the manifest."""
            return pipeline.ingest(pipeline.from_airflow(context, loaded))

        @setup
        @task(**MANIFEST)
        def dask_cluster(**context) -> dict:
            """Start the run's Dask cluster (or name the external one): started once, used by validate, shard and
            train; a task whose cluster is gone starts its own."""
            return pipeline.start_cluster(pipeline.from_airflow(context, loaded))

        @teardown
        @task(retries=0)
        def stop_dask_cluster(run_cluster: dict) -> None:
            """Stop the run's Dask cluster once train is done, whether the run succeeded or not."""
            pipeline.stop_cluster(run_cluster)

        @task(outlets=[validated_data], **MANIFEST)
        def validate(ingested: dict, **context) -> dict:
            """Run the pipeline's Great Expectations suite; result JSON and HTML data docs in the run folder (extra
            link *Data docs*). A failed expectation stops the run, naming it and its column. A stage too large for
            memory is validated on the run's cluster, waited for only then."""
            ctx = pipeline.from_airflow(context, loaded)
            validated = pipeline.validate(ctx, ingested, lambda: pipeline.await_cluster(ctx))
            context["outlet_events"][validated_data].extra = pipeline.validated_event(validated)
            return validated

        @task(**MANIFEST)
        def drift(validated: dict, **context) -> dict:
            """Compare the validated rows with the champion's data (PSI per feature and label; extra link *Drift
            report*); over params.drift_max, notify, and stop here when params.drift_action is `fail`."""
            return pipeline.drift(pipeline.from_airflow(context, loaded), validated,
                                  lambda text: notify.send(spec, "drift", context, text))

        @task(**MANIFEST)
        def shard(validated: dict, drifted: dict, run_cluster: dict, **context) -> dict:
            """Split the validated rows on Dask into stratified Parquet shards and a held-out split, with a
            manifest (rows, label histograms, checksums); a warm start encodes with the champion's encoder."""
            return pipeline.shard(pipeline.from_airflow(context, loaded), validated, drifted, run_cluster)

        @task(**MANIFEST)
        def train(shards: dict, run_cluster: dict, **context) -> dict:
            """Train one model per shard on the Dask workers, round after round from the last merge; a retry
            resumes from the checkpoints that exist (extra link *Dask dashboard*)."""
            return pipeline.train(pipeline.from_airflow(context, loaded), shards, run_cluster)

        @task(**MANIFEST)
        def merge(shards: dict, trained: dict, **context) -> dict:
            """The last round's global model (or a greedy soup); score it and the shard models on held-out rows."""
            return pipeline.merge(pipeline.from_airflow(context, loaded), shards, trained)

        @task(**MANIFEST)
        def compress(shards: dict, merged: dict, **context) -> dict:
            """Prune, export to ONNX, quantize to int8; keep the smallest variant within the tolerance."""
            return pipeline.compress(pipeline.from_airflow(context, loaded), shards, merged)

        @task(**MANIFEST)
        def register(manifests: dict, **context) -> dict:
            """Log the run to MLflow (one run per DAG run), register the model, move `candidate`, and `champion`
            only if it is at least as good on the same held-out rows (extra links *MLflow run*, *model version*)."""
            return pipeline.register(pipeline.from_airflow(context, loaded), manifests)

        @task(outlets=[champion_model], retries=0, on_success_callback=notify.notifiers(spec, "champion_change"))
        def publish_champion(registered: dict, **context) -> None:
            """Update the champion-model Asset when this run moved `champion`; skipped otherwise."""
            context["outlet_events"][champion_model].extra = pipeline.champion_event(
                pipeline.from_airflow(context, loaded), registered)

        @task(trigger_rule="all_done", retries=0, on_failure_callback=notify.notifiers(spec, "failure"))
        def report(**context) -> str:
            """Write report.json from every stage's summary; fail the DAG run if a stage failed."""
            return pipeline.finish(pipeline.from_airflow(context, loaded))

        ingested = ingest()
        run_cluster = dask_cluster()
        wait >> [ingested, run_cluster]
        validated = validate(ingested)  # beside the cluster's start, which it waits for only to partition
        drifted = drift(validated)
        shards = shard(validated, drifted, run_cluster)  # the validated rows (their clean part after a quarantine)
        trained = train(shards, run_cluster)
        trained >> stop_dask_cluster(run_cluster)
        merged = merge(shards, trained)
        compressed = compress(shards, merged)
        registered = register({"ingest": ingested, "validate": validated, "drift": drifted, "shard": shards,
                               "train": trained, "merge": merged, "compress": compressed})
        publish_champion(registered)
        registered >> report()  # beside publish_champion, not after it: the run ends a scheduling step sooner

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


valid, invalid = load_all(only=get_parsing_context().dag_id)  # a task's parse builds its own DAG only
for each in valid:
    globals()[each.name] = build_once(each, build, __file__)  # or takes the one its scheduler built (prebuilt.py)
if invalid:
    invalid_specs = InvalidSpecs(invalid)
