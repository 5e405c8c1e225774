"""The DAG under Airflow's real scheduler (LocalExecutor), not only `airflow dags test`.

Task processes started by the scheduler have no metadata-DB access, and a Dask worker spawned from one would
re-import the `airflow` entry point; this test runs the pipeline the way the nightly schedule does.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.airflow_env import SMALL_CONF, AirflowEnv, read_report, wait_for, write_demo

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 420
LOGICAL_DATE = "2026-07-01T00:00:00+00:00"
RUN_ID = "triggered_by_test"


def _merged_and_registry(env: AirflowEnv) -> tuple[str, int, int]:
    """The run's merged-model checksum, and how many parent MLflow runs and model versions exist for it."""
    from mlflow import MlflowClient

    report = read_report(env.data_root / "lepton_mnist1d" / RUN_ID)
    client = MlflowClient(env.mlflow_uri)
    experiment = client.get_experiment_by_name("lepton_mnist1d")
    parents = client.search_runs([experiment.experiment_id], "tags.`lepton.dag_run_id` = 'triggered_by_test' and "
                                 "tags.`mlflow.parentRunId` IS NULL")
    versions = client.search_model_versions("name = 'lepton-mnist1d' and tags.`lepton.dag_run_id` = "
                                            "'triggered_by_test'")  # (unpausing also starts a scheduled run)
    merged = json.loads((env.data_root / "lepton_mnist1d" / RUN_ID / "summaries" / "merge.json").read_text())
    assert report["status"] == "success"
    return json.dumps(merged["merged_metrics"]), len(parents), len(versions)


def test_triggered_run_succeeds_under_the_scheduler_and_a_cleared_rerun_duplicates_nothing(tmp_path):
    env = AirflowEnv.sqlite(tmp_path)
    write_demo(env.data_root, 1500)
    env.migrate()
    with env.serving() as extra:
        env.airflow("dags", "trigger", "lepton_mnist1d", "--run-id", RUN_ID, "--logical-date", LOGICAL_DATE,
                    "-c", json.dumps(SMALL_CONF), **extra)
        env.airflow("dags", "unpause", "lepton_mnist1d", **extra)
        ended = env.finished_state(RUN_ID, RUN_TIMEOUT_S)
        assert ended == "success", f"run ended {ended}; component logs:\n{env.component_logs()}"
        first = _merged_and_registry(env)
        assert first[1:] == (1, 1)

        # clear every task of the finished run: the scheduler runs it all again
        env.airflow("tasks", "clear", "lepton_mnist1d", "--yes", "--start-date", LOGICAL_DATE, "--end-date",
                    LOGICAL_DATE, **extra)
        wait_for(lambda: env.run_state(RUN_ID) not in ("success", "failed"), 60, "the cleared run to restart")
        assert env.finished_state(RUN_ID, RUN_TIMEOUT_S) == "success"
    assert _merged_and_registry(env) == first  # same model, still one MLflow run and one version
    report = read_report(env.data_root / "lepton_mnist1d" / RUN_ID)
    assert report["stages"]["train"]["resumed"] > 0  # the rerun reused the finished checkpoints
    task_logs = "\n".join(p.read_text() for p in (env.home / "logs").rglob("*.log") if "task_id=train" in str(p))
    assert "LocalCluster" in task_logs and "epoch" in task_logs  # the cluster choice and per-epoch progress
    assert "preloaded for the task processes" in (env.home / "scheduler.log").read_text()
