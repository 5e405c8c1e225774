"""The DAG under Airflow's real scheduler (LocalExecutor), not only `airflow dags test`.

Task processes started by the scheduler have no metadata-DB access, and a Dask worker spawned from one would
re-import the `airflow` entry point; this test runs the pipeline the way the nightly schedule does, on the
local-cluster path (the run's own cluster, started by the setup task). Three faults, each proven to hit what it
names: a Dask worker of that cluster SIGKILLs itself while it writes a shard partition, another in round 1 of
training (both from inside the worker, `KillOnce`, and seen leaving by the scheduler, `LeftLog`), then the whole
cluster (scheduler, nannies, workers: its process group) in round 2: train's retry starts a cluster of its own and
resumes from the checkpoints written. The run's shards, checkpoints and merged model are then compared with a
fault-free run of the same params.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from lepton_tasks.config.settings import REPO_ROOT
from lepton_tasks.core.storage import sha256_file
from lepton_tasks.tools.airflow_env import (
    RUN_TIMEOUT_S,
    SMALL_CONF,
    AirflowEnv,
    read_report,
    unscheduled_specs,
    wait_for,
    write_demo,
)
from tests.integration.faults import (
    FaultDriver,
    KillOnce,
    cluster_processes,
    first_difference,
    killed_worker,
    left,
    watch,
)

pytestmark = pytest.mark.slow

LOGICAL_DATE = "2026-07-01T00:00:00+00:00"
RUN_ID = "triggered_by_test"


def _kill_the_run_cluster(run_dir: Path) -> str:
    """SIGKILL the run's cluster process group (scheduler, nannies, workers at once); which processes it held."""
    import psutil

    pid = json.loads((run_dir / "cluster" / "scheduler.json").read_text())["pid"]
    group = [p for p in psutil.process_iter(["cmdline"]) if _group_of(p) == pid]
    assert any("lepton_tasks.infra.cluster" in " ".join(p.info["cmdline"] or []) for p in group), \
        "not the run's cluster"
    os.killpg(pid, signal.SIGKILL)
    return " ".join(str(p.pid) for p in group)


def _group_of(process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except ProcessLookupError:
        return None


def _faults(run_dir: Path, markers: Path) -> list:
    """Watch the run's cluster once it is up (the kills fire inside its workers); kill it all in round 2."""
    cluster = run_dir / "cluster" / "scheduler.json"
    kills = [KillOnce("_write_partition", str(markers / "shard")),
             KillOnce("train-r1-shard-000", str(markers / "round1"))]
    return [
        ("watch the run's cluster", lambda: cluster.exists() and "pid" in json.loads(cluster.read_text()),
         lambda: watch(json.loads(cluster.read_text())["address"], markers / "left", kills)),
        ("cluster in round 2", lambda: (run_dir / "train" / "round-01" / "merged.safetensors").exists(),
         lambda: _kill_the_run_cluster(run_dir)),
    ]


def _fault_free_run(env: AirflowEnv, monkeypatch, pipelines: Path) -> Path:
    """The same params, stage by stage up to merge, in this process on a local cluster of its own."""
    from lepton_tasks.config.specs import find_spec
    from lepton_tasks.orchestration import pipeline

    for name, value in {"LEPTON_DATA_ROOT": str(env.data_root), "MLFLOW_TRACKING_URI": env.mlflow_uri,
                        "LEPTON_PIPELINES_DIR": str(pipelines)}.items():
        monkeypatch.setenv(name, value)
    pipeline.run_in_process(pipeline.context(find_spec("lepton_mnist1d"), "clean", SMALL_CONF), last="merge")
    return env.data_root / "lepton_mnist1d" / "clean"


def test_a_triggered_run_survives_worker_and_cluster_kills_with_the_model_of_a_fault_free_run(tmp_path,
                                                                                               monkeypatch):
    env = AirflowEnv.sqlite(tmp_path)
    write_demo(env.data_root, 1500)
    env.migrate()
    markers = tmp_path / "markers"
    markers.mkdir()
    run_dir = env.data_root / "lepton_mnist1d" / RUN_ID
    pipelines = unscheduled_specs(tmp_path / "pipelines")
    # a cluster that is gone for good fails train after 10 s (not 180); retried 3 s later. Validation partitions
    # (a tiny memory budget): it waits for the run's cluster, which starts beside it. The spec without its schedule:
    # unpausing then starts no scheduled run beside this one. The cluster's processes import the test's plugins.
    with env.serving(LEPTON_DASK_RECOVERY_S="10", LEPTON_VALIDATE_MEMORY_BYTES="1000",
                     LEPTON_PIPELINES_DIR=str(pipelines), PYTHONPATH=str(REPO_ROOT)) as extra:
        env.trigger(extra, RUN_ID, SMALL_CONF, LOGICAL_DATE)
        env.unpause(extra)
        with FaultDriver(_faults(run_dir, markers)) as driver:
            ended = env.finished_state(RUN_ID, RUN_TIMEOUT_S)
        assert ended == "success", f"run ended {ended}; component logs:\n{env.component_logs()}"
        assert set(driver.done) == {"watch the run's cluster", "cluster in round 2"}, (driver.done, driver.retried)
        assert env.task_state(RUN_ID, "stop_dask_cluster") == "success"
        wait_for(lambda: not cluster_processes(env.data_root), 60, "every cluster of the run to be stopped")

    # each worker kill hit a Dask worker, in the task it names, and the scheduler saw that worker leave
    for marker, key in (("shard", "_write_partition"), ("round1", "train-r1-shard-000")):
        pid, address, killed_key = killed_worker(markers / marker)
        assert key in killed_key and address in left(markers / "left"), (marker, killed_key, left(markers / "left"))
    assert killed_worker(markers / "shard")[1] != killed_worker(markers / "round1")[1]  # two workers, not one
    report = read_report(run_dir)
    assert report["status"] == "success" and report["stages"]["train"]["resumed"] > 0  # the retry resumed

    clean = _fault_free_run(env, monkeypatch, pipelines)
    assert first_difference(run_dir, clean) is None
    assert sha256_file(run_dir / "merge/merged.safetensors") == sha256_file(clean / "merge/merged.safetensors")
    validate_logs = env.task_logs("task_id=validate")
    assert "partition by partition" in validate_logs and "(the run's cluster)" in validate_logs
    task_logs = env.task_logs("task_id=train")
    assert "LocalCluster" in task_logs and "epoch" in task_logs  # the cluster choice and per-epoch progress
    assert "does not answer" in task_logs and "for this task" in task_logs  # the retry after the cluster kill
    assert "preloaded for the task processes" in (env.home / "scheduler.log").read_text()
