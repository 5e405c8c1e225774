"""
### Score with the champion: a downstream DAG scheduled on a new champion model

Runs whenever `lepton_mnist1d` moves its `champion` alias (the Asset `lepton_mnist1d.champion`, updated by that
DAG's `publish_champion` task). It loads the champion's ONNX model and encoder from the MLflow Model Registry
and scores a batch of rows into `{LEPTON_DATA_ROOT}/lepton_score_champion/{run_id}/score/predictions.parquet`.
Copy it for another pipeline by changing `PIPELINE`.
"""

import pendulum
from airflow.sdk import Asset, Param, dag, task

from lepton_tasks import pipeline
from lepton_tasks.specs import find_spec

PIPELINE = "lepton_mnist1d"
upstream = find_spec(PIPELINE).spec


@dag(
    schedule=[Asset(name=f"{upstream.name}.champion", uri=upstream.champion_asset_uri)],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": upstream.owner, "retries": 1, "retry_delay": pendulum.duration(seconds=30)},
    params={
        "batch_uri": Param(upstream.source.uri, type="string", minLength=1, title="Batch URI",
                           description="Rows to score: file, folder or glob (relative: under the data root)."),
        "rows": Param(1000, type="integer", minimum=1, maximum=1_000_000, title="Rows",
                      description="How many rows of the batch to score."),
    },
    tags=["lepton", "consumer", upstream.name],
    doc_md=__doc__,
)
def lepton_score_champion():
    @task
    def score(**context) -> dict:
        """Load the champion ONNX model and score the batch; predictions (and metrics if labelled) in the run."""
        return pipeline.score_champion(upstream, context["run_id"], dict(context["params"]))

    score()


lepton_score_champion()
