"""The DAG under Airflow's real scheduler (LocalExecutor), not only `airflow dags test`.

Task processes started by the scheduler have no metadata-DB access, and a Dask worker spawned from one would
re-import the `airflow` entry point; this test runs the pipeline the way the nightly schedule does, on the
local-cluster path (the run's own cluster, started by the setup task), SIGKILLing a worker of that cluster during
shard and in round 1, then the whole cluster (scheduler, nannies, workers) in round 2: train's retry starts a
cluster of its own and resumes from the checkpoints written.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.airflow_env import (
    RUN_TIMEOUT_S,
    SMALL_CONF,
    AirflowEnv,
    read_report,
    unscheduled_specs,
    wait_for,
    write_demo,
)
from tests.integration.faults import FaultDriver, local_cluster_workers

pytestmark = pytest.mark.slow

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
                                            "'triggered_by_test'")
    merged = json.loads((env.data_root / "lepton_mnist1d" / RUN_ID / "summaries" / "merge.json").read_text())
    assert report["status"] == "success"
    return json.dumps(merged["merged_metrics"]), len(parents), len(versions)


def _kill_a_local_worker(pause_s: float = 0.0) -> str:
    import os
    import signal
    import time

    time.sleep(pause_s)
    pid = local_cluster_workers()[0]
    os.kill(pid, signal.SIGKILL)
    return str(pid)


def _kill_the_run_cluster(run_dir) -> str:
    """SIGKILL the run's cluster process group: its scheduler, nannies and workers at once."""
    import os
    import signal

    pid = json.loads((run_dir / "cluster" / "scheduler.json").read_text())["pid"]
    os.killpg(pid, signal.SIGKILL)
    return str(pid)


def _faults(run_dir) -> list:
    """A worker during shard (its output not yet there) and in round 1; the whole run cluster in round 2."""
    return [
        ("during shard", lambda: (run_dir / "validate").exists() and not (run_dir / "shard").exists()
         and bool(local_cluster_workers()), _kill_a_local_worker),
        ("in round 1", lambda: (run_dir / "summaries" / "shard.json").exists() and bool(local_cluster_workers()),
         lambda: _kill_a_local_worker(pause_s=1.0)),
        ("cluster in round 2", lambda: (run_dir / "train" / "round-01" / "merged.safetensors").exists(),
         lambda: _kill_the_run_cluster(run_dir)),
    ]


def test_triggered_run_survives_worker_kills_and_a_cleared_rerun_duplicates_nothing(tmp_path):
    env = AirflowEnv.sqlite(tmp_path)
    write_demo(env.data_root, 1500)
    env.migrate()
    # a cluster that is gone for good fails train after 10 s (not 180); retried 3 s later. Validation partitions
    # (a tiny memory budget): it waits for the run's cluster, which starts beside it. The spec without its schedule:
    # unpausing then starts no scheduled run beside this one (whose workers the faults could hit instead)
    with env.serving(LEPTON_DASK_RECOVERY_S="10", LEPTON_VALIDATE_MEMORY_BYTES="1000",
                     LEPTON_PIPELINES_DIR=str(unscheduled_specs(tmp_path / "pipelines"))) as extra:
        env.trigger(extra, RUN_ID, SMALL_CONF, LOGICAL_DATE)
        env.unpause(extra)
        with FaultDriver(_faults(env.data_root / "lepton_mnist1d" / RUN_ID)) as driver:
            ended = env.finished_state(RUN_ID, RUN_TIMEOUT_S)
        assert ended == "success", f"run ended {ended}; component logs:\n{env.component_logs()}"
        assert {"during shard", "in round 1", "cluster in round 2"} <= set(driver.done), driver.done
        assert env.task_state(RUN_ID, "stop_dask_cluster") == "success"
        wait_for(lambda: not local_cluster_workers(), 60, "every cluster of the run to be stopped")
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
    validate_logs = env.task_logs("task_id=validate")
    assert "partition by partition" in validate_logs and "(the run's cluster)" in validate_logs
    task_logs = env.task_logs("task_id=train")
    assert "LocalCluster" in task_logs and "epoch" in task_logs  # the cluster choice and per-epoch progress
    assert "does not answer" in task_logs and "for this task" in task_logs  # the retry after the cluster kill
    assert "preloaded for the task processes" in (env.home / "scheduler.log").read_text()
