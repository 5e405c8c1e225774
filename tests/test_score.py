"""The consumer DAG's task on real stores: a champion registered by a real (in-process) run scores the night its
Asset event names, into a run-scoped Parquet file, logged once to MLflow however often it is retried."""

from types import SimpleNamespace

import pandas as pd
import pytest

from lepton_tasks.config.specs import find_spec
from lepton_tasks.core.errors import LeptonError
from lepton_tasks.orchestration import pipeline
from lepton_tasks.tools.demo_data import write_sensor_day

SENSORS = find_spec("lepton_sensors")
SMALL = {"num_shards": 2, "merge_rounds": 1, "local_epochs": 1, "hidden_size": 8}


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """One night's run and its champion, for every scoring run of the module (each with its own run id)."""
    root = tmp_path_factory.mktemp("score")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LEPTON_DATA_ROOT", str(root))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        for day in ("2026-11-10", "2026-11-11"):
            write_sensor_day(root / "landing" / "sensors", day, rows=300)
        ctx = pipeline.context(SENSORS, "scheduled__2026-11-10", SMALL, ds="2026-11-10")
        manifests, _ = pipeline.run_in_process(ctx)
        assert "champion" in manifests["register"].aliases
        yield root, manifests["register"]


def _task_context(run_id: str, run_after: str, events: list[dict]) -> dict:
    """What Airflow hands the task: its DAG, run and the Asset events that triggered the run."""
    return {"dag": SimpleNamespace(dag_id=SENSORS.spec.score_dag_id), "run_id": run_id,
            "dag_run": SimpleNamespace(run_after=pd.Timestamp(run_after).to_pydatetime()),
            "triggering_asset_events": {"champion": [SimpleNamespace(extra=e) for e in events]}}


def test_a_new_champion_scores_the_night_that_made_it_and_logs_one_mlflow_run(champion):
    from mlflow import MlflowClient

    root, registered = champion
    context = _task_context("asset_triggered__1", "2026-11-25T05:00:00+00:00", [{"ds": "2026-11-10"}])
    scored = pipeline.score(SENSORS, context)
    again = pipeline.score(SENSORS, context)  # a retry: the same MLflow run
    assert scored["rows"] == 300 and scored["model_version"] == registered.model_version
    assert scored["sources"] == ["landing/sensors/2026-11-10/*.parquet"]
    assert again["scoring_run_id"] == scored["scoring_run_id"]
    predictions = pd.read_parquet(scored["predictions_path"])
    assert len(predictions) == 300 and set(predictions["prediction"]) <= {"0", "1"}
    metrics = MlflowClient().get_run(scored["scoring_run_id"]).data.metrics
    assert metrics["scored_rows"] == 300
    assert sum(v for k, v in metrics.items() if k.startswith("prediction.share.")) == pytest.approx(1)
    assert "eval_accuracy" in metrics  # the night's rows carry the label


def test_a_scheduled_scoring_run_reads_its_own_date_and_a_missing_night_is_named(champion):
    on_schedule = _task_context("scheduled__2026-11-11", "2026-11-11T06:00:00+00:00", [])
    assert pipeline.score(SENSORS, {**on_schedule, "ds": "2026-11-11"})["sources"] == [
        "landing/sensors/2026-11-11/*.parquet"]
    with pytest.raises(Exception, match=r"landing/sensors/2026-11-12/\*\.parquet") as failed:
        pipeline.score(SENSORS, {**on_schedule, "ds": "2026-11-12", "run_id": "scheduled__2026-11-12"})
    assert not isinstance(failed.value, LeptonError) or not failed.value.retryable
