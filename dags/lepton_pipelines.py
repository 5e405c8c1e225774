"""
### Lepton pipelines: one DAG per YAML spec in `dags/pipelines/`

Each spec (see `lepton_tasks/config/specs.py`) becomes a DAG with the spec's name, schedule, owner and tags, and a
trigger form whose defaults are the spec's values. The stages and their order come from the one graph,
`lepton_tasks.orchestration.pipeline.GRAPH`; every task is one call into that module; every output lands under
`{LEPTON_DATA_ROOT}/{dag_id}/{run_id}/{stage}/` and `report.json` sums it up.

wait (deferred until the run's window of data has landed) → ingest → validate (Great Expectations) → drift
(against the champion's data) → shard (Dask) → train (one model per shard on Dask workers, R rounds of the run's
merge strategy, from scratch or the champion) → merge → compress (pruning, ONNX, int8) → register (MLflow;
`champion` moves only on a better model) → publish_champion (the Asset `NAME.champion`, only when `champion`
moved), and beside it report; with `promotion: {approval: required}`, request_approval starts a run of
NAME_approval (dags/lepton_approvals.py) where a person approves the candidate, and `champion` moves there.
Beside ingest and validate, the setup task dask_cluster starts the run's Dask cluster, used by shard, train and
validate (which waits for it only when it partitions); the teardown stop_dask_cluster stops it after train,
whatever happened.
The spec's `notify:` notifiers hear of failures, champion changes and drift.

A spec that does not validate becomes an import error naming its file and fields; the others still load.
"""

import pendulum
from airflow.sdk import DAG, Asset, Param, dag, get_parsing_context, setup, task, teardown

from lepton_tasks.config.settings import airflow_param_specs
from lepton_tasks.config.specs import LoadedSpec, load_all
from lepton_tasks.core.errors import SpecError
from lepton_tasks.data.manifests import RegisterManifest
from lepton_tasks.orchestration import notify, pipeline
from lepton_tasks.orchestration.approval import RequestApproval
from lepton_tasks.orchestration.prebuilt import build_once
from lepton_tasks.orchestration.wait import WaitForWindow

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


def stage_task(stage: pipeline.Stage, loaded: LoadedSpec, outlets: list[Asset]):
    """The task of one stage of `pipeline.GRAPH`: its manifest is one XCom value, typed on either side of it."""

    def run(*upstream: dict, **context) -> dict:
        return pipeline.run_task(stage, loaded, context, upstream)

    return task(run, task_id=stage.name, multiple_outputs=False, outlets=outlets, doc_md=stage.doc)


def build(loaded: LoadedSpec) -> DAG:
    spec = loaded.spec
    validated_data, champion_model = assets(loaded)
    outlets = {"validated_data": [validated_data]}

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
        # deferred to the triggerer while it waits: no worker slot is held (params wait_timeout_minutes, ...). Retried
        # as every task is where a service failed (the store, a database); a day that never landed is not retried
        wait = WaitForWindow(task_id="wait", loaded=loaded,
                             doc_md="Wait for every day of the run's window (params.window_days ending with `ds`) "
                                    "to land; fail naming the missing day(s) after params.wait_timeout_minutes.")

        @setup
        @task(multiple_outputs=False)
        def dask_cluster(**context) -> dict:
            """Start the run's Dask cluster (or name the external one): started once, used by validate, shard and
            train; a task whose cluster is gone starts its own."""
            return pipeline.start_cluster(pipeline.from_airflow(context, loaded))

        @teardown
        @task(retries=0)
        def stop_dask_cluster(run_cluster: dict) -> None:
            """Stop the run's Dask cluster once train is done, whether the run succeeded or not."""
            pipeline.stop_cluster(run_cluster)

        @task(outlets=[champion_model], retries=0, on_success_callback=notify.notifiers(spec, "champion_change"))
        def publish_champion(registered: dict, **context) -> None:
            """Update the champion-model Asset when this run moved `champion`; skipped otherwise."""
            context["outlet_events"][champion_model].extra = pipeline.champion_event(
                pipeline.from_airflow(context, loaded).day, RegisterManifest.from_dict(registered))

        @task(trigger_rule="all_done", retries=0, on_failure_callback=notify.notifiers(spec, "failure"))
        def report(**context) -> str:
            """Write report.json from every stage's summary; fail the DAG run if a stage failed."""
            return pipeline.finish(pipeline.from_airflow(context, loaded))

        run_cluster = dask_cluster()
        done = {}
        for stage in pipeline.GRAPH:  # ingest → validate → drift → shard → train → merge → compress → register
            upstream = [done[name] for name in stage.inputs] + ([run_cluster] if stage.cluster == "after" else [])
            done[stage.name] = stage_task(stage, loaded, outlets[stage.outlet] if stage.outlet else [])(*upstream)
        wait >> [done["ingest"], run_cluster]  # validate runs beside the cluster's start, awaited only to partition
        done["train"] >> stop_dask_cluster(run_cluster)
        publish_champion(done["register"])
        done["register"] >> report()  # beside publish_champion, not after it: the run ends a scheduling step sooner
        if spec.approval_required:  # a person decides in a run of NAME_approval; this run does not wait for it
            done["register"] >> RequestApproval(task_id="request_approval", loaded=loaded, retries=2)

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
