"""An operator's bad night on the Dask topology of `make up`, under Airflow's real scheduler.

A supervised `lepton dask-scheduler` and one supervised `lepton dask-worker` per worker (as `lepton up` runs
them), reached by the pipeline through the connection `dask_default`. During one triggered run: a worker is
SIGKILLed while it writes a shard partition, another as it starts training a shard in round 1 (at once: a shard
of this size trains in well under a second, so a later kill could land after its result), a whole `dask worker`
(nanny and worker) in round 2, and the `dask scheduler` itself in round 3 (its supervisor starts it again). The
run must succeed in its first attempt of each task, and its shards, checkpoints and merged model must be
bit-equal to those of a fault-free run of the same params on the same (restarted) Dask processes: the stage
functions the tasks call, up to merge, run in this process (what Airflow adds to the DAG run is what the faulty
run tests).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lepton_tasks.config.settings import REPO_ROOT
from lepton_tasks.core.storage import sha256_file
from lepton_tasks.infra.connections import dask_connection_env
from lepton_tasks.tools.airflow_env import (
    RUN_TIMEOUT_S,
    SMALL_CONF,
    AirflowEnv,
    free_port,
    unscheduled_specs,
    write_demo,
)
from lepton_tasks.tools.services import Deployment, dask_commands
from tests.integration.faults import (
    FaultDriver,
    KillOnce,
    first_difference,
    kill_dask_worker_process,
    kill_tree,
    killed_worker,
    left,
    supervised_child,
    watch,
)

pytestmark = pytest.mark.slow

CONF = {**SMALL_CONF, "merge_rounds": 3}


@pytest.fixture
def make_up_dask(tmp_path):
    """The supervised Dask processes of `lepton up`; workers see this repository (for the test's plugin)."""
    deployment = Deployment(tmp_path / "dask", tmp_path / "data", dask_port=free_port(), dashboard_port=free_port(),
                      dask_workers=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LEPTON"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    log = (tmp_path / "dask.log").open("w")
    supervisors = {name: subprocess.Popen(command, env=env, start_new_session=True, stdout=log,
                                          stderr=subprocess.STDOUT)
                   for name, command in dask_commands(deployment).items()}
    yield deployment, supervisors
    for process in supervisors.values():
        os.killpg(process.pid, 15)
        process.wait(timeout=60)


def _kill_the_dask_scheduler(supervisor_pid: int) -> str:
    """SIGKILL the `dask scheduler` process its supervisor runs now; its pid."""
    import psutil

    pid = supervised_child(supervisor_pid)
    assert "scheduler" in " ".join(psutil.Process(pid).cmdline()), "not the dask scheduler"
    kill_tree(pid)
    return str(pid)


def _fault_free_run(env: AirflowEnv, deployment: Deployment, monkeypatch, pipelines) -> Path:
    """The same params as the faulty run, stage by stage up to merge, on the same Dask scheduler and workers."""
    from lepton_tasks.config.specs import find_spec
    from lepton_tasks.orchestration import pipeline

    for name, value in {"LEPTON_DATA_ROOT": str(env.data_root), "MLFLOW_TRACKING_URI": env.mlflow_uri,
                        "LEPTON_DASK_ADDRESS": deployment.dask_address, "LEPTON_PIPELINES_DIR": str(pipelines)}.items():
        monkeypatch.setenv(name, value)
    pipeline.run_in_process(pipeline.context(find_spec("lepton_mnist1d"), "clean", CONF), last="merge")
    return env.data_root / "lepton_mnist1d" / "clean"


def _trigger(env: AirflowEnv, extra: dict, run_id: str) -> str:
    env.trigger(extra, run_id, CONF)
    return env.finished_state(run_id, RUN_TIMEOUT_S)


def test_a_run_survives_killed_workers_and_a_restarted_scheduler_with_the_same_model(tmp_path, make_up_dask,
                                                                                     monkeypatch):
    from distributed import Client

    deployment, supervisors = make_up_dask
    env = AirflowEnv.sqlite(tmp_path)
    write_demo(env.data_root, 1500)
    env.migrate()
    markers = tmp_path / "markers"
    markers.mkdir()
    with Client(deployment.dask_address, timeout="60s") as monitor:
        monitor.wait_for_workers(2, timeout=120)
    watch(deployment.dask_address, markers / "left", [
        KillOnce("_write_partition", str(markers / "shard"), delay_s=0.0),
        KillOnce("train-r1-shard-000", str(markers / "round1"))])
    faulty = env.data_root / "lepton_mnist1d" / "faulty"
    steps = [
        ("a whole dask worker in round 2", lambda: (faulty / "train/round-01/merged.safetensors").exists(),
         lambda: kill_dask_worker_process(supervised_child(supervisors["dask-worker-2"].pid), deployment.dask_address)),
        ("the dask scheduler in round 3", lambda: (faulty / "train/round-02/merged.safetensors").exists(),
         lambda: _kill_the_dask_scheduler(supervisors["dask-scheduler"].pid)),
    ]
    pipelines = unscheduled_specs(tmp_path / "pipelines")
    with env.serving(**dask_connection_env("127.0.0.1", deployment.dask_port),
                     LEPTON_PIPELINES_DIR=str(pipelines)) as extra:
        env.unpause(extra)
        with FaultDriver(steps) as driver:
            ended = _trigger(env, extra, "faulty")
        assert ended == "success", f"run ended {ended}; component logs:\n{env.component_logs()}"
        assert set(driver.done) == {s[0] for s in steps}, (driver.done, driver.retried)  # both faults happened
    # each kill hit Dask workers, in the task it names, and the scheduler saw them leave (before its own kill)
    gone = left(markers / "left")
    for marker, key in (("shard", "_write_partition"), ("round1", "train-r1-shard-000")):
        _, address, killed_key = killed_worker(markers / marker)
        assert key in killed_key and address in gone, (marker, killed_key, gone)
    assert set(driver.done["a whole dask worker in round 2"].split()) <= gone, (driver.done, gone)
    assert supervised_child(supervisors["dask-scheduler"].pid) != int(driver.done["the dask scheduler in round 3"])
    clean = _fault_free_run(env, deployment, monkeypatch, pipelines)
    assert first_difference(faulty, clean) is None
    # and byte for byte: a checkpoint's bytes are a function of its content (models.save_checkpoint)
    assert sha256_file(faulty / "merge/merged.safetensors") == sha256_file(clean / "merge/merged.safetensors")
    logs = env.task_logs("run_id=faulty")
    assert "the cluster is back" in logs  # the train task rode out the scheduler restart itself
    assert "attempt=2" not in str(list((env.home / "logs").rglob("*")))  # no task needed Airflow's retry
