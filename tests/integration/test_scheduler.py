"""The DAG under Airflow's real scheduler (LocalExecutor), not only `airflow dags test`.

Task processes started by the scheduler have no metadata-DB access, and a Dask worker spawned from one would
re-import the `airflow` entry point; this test runs the pipeline the way the nightly schedule does.
"""

from __future__ import annotations

import json
import subprocess
from contextlib import ExitStack

import pytest

from tests.integration.airflow_env import BIN, SMALL_CONF, AirflowEnv, free_port, read_report, wait_for, write_demo

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 420


def _start(env: AirflowEnv, extra: dict, *command: str) -> subprocess.Popen:
    log = open(env.home / f"{command[0]}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([str(BIN / "airflow"), *command], env=env.env(**extra), stdout=log,
                            stderr=subprocess.STDOUT, cwd=env.home)


def _runs(env: AirflowEnv, extra: dict) -> list[dict]:
    done = env.airflow("dags", "list-runs", "lepton_mnist1d", "-o", "json", check=False, **extra)
    rows = [line for line in done.stdout.splitlines() if line.startswith("[")]  # warnings precede the JSON
    return json.loads(rows[-1]) if done.returncode == 0 and rows else []


LOGICAL_DATE = "2026-07-01T00:00:00+00:00"


def _state(env: AirflowEnv, extra: dict) -> str | None:
    return next((r["state"] for r in _runs(env, extra) if r["run_id"] == "triggered_by_test"), None)


def _merged_and_registry(env: AirflowEnv) -> tuple[str, int, int]:
    """The run's merged-model checksum, and how many parent MLflow runs and model versions exist for it."""
    from mlflow import MlflowClient

    report = read_report(env.data_root / "lepton_mnist1d" / "triggered_by_test")
    client = MlflowClient(env.mlflow_uri)
    experiment = client.get_experiment_by_name("lepton_mnist1d")
    parents = client.search_runs([experiment.experiment_id], "tags.`lepton.dag_run_id` = 'triggered_by_test' and "
                                 "tags.`mlflow.parentRunId` IS NULL")
    versions = client.search_model_versions("name = 'lepton-mnist1d' and tags.`lepton.dag_run_id` = "
                                            "'triggered_by_test'")  # (unpausing also starts a scheduled run)
    merged = json.loads((env.data_root / "lepton_mnist1d" / "triggered_by_test" / "summaries" / "merge.json")
                        .read_text())
    assert report["status"] == "success"
    return json.dumps(merged["merged_metrics"]), len(parents), len(versions)


def test_triggered_run_succeeds_under_the_scheduler_and_a_cleared_rerun_duplicates_nothing(tmp_path):
    env = AirflowEnv.sqlite(tmp_path)
    port = free_port()
    extra = {"AIRFLOW__API__PORT": str(port), "AIRFLOW__CORE__EXECUTION_API_SERVER_URL":
             f"http://127.0.0.1:{port}/execution/", "AIRFLOW__CORE__PARALLELISM": "4"}
    write_demo(env.data_root, 1500)
    env.migrate()
    with ExitStack() as stack:
        for command in (("api-server", "--port", str(port)), ("scheduler",), ("dag-processor",)):
            process = _start(env, extra, *command)
            stack.callback(process.wait, 30)
            stack.callback(process.terminate)
        wait_for(lambda: env.airflow("dags", "details", "lepton_mnist1d", check=False, **extra).returncode == 0,
                  120, "the dag-processor to serialise lepton_mnist1d")
        env.airflow("dags", "trigger", "lepton_mnist1d", "--run-id", "triggered_by_test", "--logical-date",
                    LOGICAL_DATE, "-c", json.dumps(SMALL_CONF), **extra)
        env.airflow("dags", "unpause", "lepton_mnist1d", **extra)

        wait_for(lambda: _state(env, extra) in ("success", "failed"), RUN_TIMEOUT_S, "the triggered run to finish")
        state = _state(env, extra)
        logs = "\n".join(p.read_text()[-3000:] for p in env.home.glob("*.log"))
        assert state == "success", f"run ended {state}; component logs:\n{logs}"
        first = _merged_and_registry(env)
        assert first[1:] == (1, 1)

        # clear every task of the finished run: the scheduler runs it all again
        env.airflow("tasks", "clear", "lepton_mnist1d", "--yes", "--start-date", LOGICAL_DATE, "--end-date",
                    LOGICAL_DATE, **extra)
        wait_for(lambda: _state(env, extra) not in ("success", "failed"), 60, "the cleared run to restart")
        wait_for(lambda: _state(env, extra) in ("success", "failed"), RUN_TIMEOUT_S, "the rerun to finish")
        assert _state(env, extra) == "success"
    assert _merged_and_registry(env) == first  # same model, still one MLflow run and one version
    report = read_report(env.data_root / "lepton_mnist1d" / "triggered_by_test")
    assert report["stages"]["train"]["resumed"] > 0  # the rerun reused the finished checkpoints
    task_logs = "\n".join(p.read_text() for p in (env.home / "logs").rglob("*.log") if "task_id=train" in str(p))
    assert "LocalCluster" in task_logs and "epoch" in task_logs  # the cluster choice and per-epoch progress
