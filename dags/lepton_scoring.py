"""
### Score with the champion: one consumer DAG `NAME_score` per pipeline spec with a `score:` section

Runs whenever the pipeline moves its `champion` alias (the Asset `NAME.champion`, updated by its
`publish_champion` task) and, when `score.schedule` is set, on that schedule too. It loads the champion's ONNX
model and encoder from the MLflow Model Registry, scores the night's rows (`score.uri`, templated on the run's
date like `source.uri`) into `{LEPTON_DATA_ROOT}/NAME_score/{run_id}/score/predictions.parquet`, and logs the row
count and the prediction distribution to an MLflow run in the pipeline's experiment.
"""

import pendulum
from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable, dag, task

from lepton_tasks.config.specs import LoadedSpec, load_all
from lepton_tasks.orchestration import pipeline


def build(loaded: LoadedSpec) -> DAG:
    spec = loaded.spec
    champion = Asset(name=f"{spec.name}.champion", uri=spec.champion_asset_uri)  # as lepton_pipelines declares it
    cron = spec.score.schedule
    schedule = AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=champion) \
        if cron else [champion]

    @dag(
        dag_id=spec.score_dag_id,
        schedule=schedule,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args={"owner": spec.owner, "retries": 2},
        tags=["lepton", "consumer", spec.name],
        doc_md=f"Scores `{spec.score.uri}` with `{spec.registered_model_name}@champion`.\n{__doc__}",
    )
    def lepton_score():
        @task
        def score(**context) -> dict:
            """Score the night's rows with the champion ONNX model; predictions in the run folder, row count and
            prediction distribution in MLflow."""
            return pipeline.score(loaded, context)

        score()

    return lepton_score()


for each in load_all()[0]:
    if each.spec.score is not None:
        globals()[each.spec.score_dag_id] = build(each)
