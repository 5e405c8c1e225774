"""A run whose Dask cluster spans hosts: the scheduler and two worker hosts, each in its own network namespace
(`hosts.Network`), started with `lepton dask-scheduler` and `lepton dask-worker`; Airflow on this machine's own
namespace reaches the scheduler through the connection `dask_default`, and the run is triggered over the REST API
under Airflow's real scheduler.

Faults, in one run: host-b's link throttled to 10 Mbit/s from the start (tc tbf), and host-a's link cut in round
2 of training (`ip link set ... down`: nothing is closed, packets just stop). The run must finish on throttled
host-b, in each task's first attempt, with the scheduler having given host-a up on its own.

The hosts still share this machine's disk (the working area is a local path): what crosses the network is Dask's
traffic (tasks, results, heartbeats), not the data.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import psutil
import pytest

from lepton_tasks.config.settings import REPO_ROOT
from lepton_tasks.tools.airflow_env import (
    RUN_TIMEOUT_S,
    SMALL_CONF,
    AirflowEnv,
    unscheduled_specs,
    wait_for,
    write_demo,
)
from tests.integration import hosts
from tests.integration.faults import FaultDriver, left, watch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(hosts.available() is not None, reason=str(hosts.available()))]

LEPTON = str(REPO_ROOT / ".venv" / "bin" / "lepton")
PORT = 8786
CONF = {**SMALL_CONF, "merge_rounds": 3}


@pytest.fixture
def network(tmp_path):
    """The scheduler host and two worker hosts, their Dask processes running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "LEPTON_", "AIRFLOW"))}
    env["PYTHONPATH"] = str(REPO_ROOT)  # the scheduler unpickles the test's LeftLog plugin
    with hosts.Network.create() as net:
        scheduler = net.host("sched")
        address = f"tcp://{scheduler.address}:{PORT}"
        commands = {scheduler: [LEPTON, "dask-scheduler", "--port", str(PORT), "--dashboard-address", ":0"],
                    net.host("a"): [LEPTON, "dask-worker", address, "--nworkers", "1", "--name", "host-a"],
                    net.host("b"): [LEPTON, "dask-worker", address, "--nworkers", "1", "--name", "host-b"]}
        processes = {}
        for host, command in commands.items():
            with (tmp_path / f"{host.name}.log").open("w") as log:
                processes[host.name] = host.popen(command, env=env, cwd=tmp_path, stdout=log,
                                                  stderr=subprocess.STDOUT)
        try:
            yield net, address, processes
        finally:
            hosts.stop_sessions(processes.values())


def _workers_by_name(address: str) -> dict[str, str]:
    from distributed import Client

    with Client(address, timeout="30s") as client:
        return {info["name"]: worker for worker, info in client.scheduler_info()["workers"].items()}


def test_a_run_finishes_on_a_throttled_host_when_the_other_hosts_link_is_cut(tmp_path, network):
    from distributed import Client

    net, address, processes = network
    with Client(address, timeout="60s") as client:
        client.wait_for_workers(2, timeout=120)
    workers = _workers_by_name(address)
    assert {info.split(":")[1].strip("/") for info in workers.values()} == {net.hosts["a"].address,
                                                                            net.hosts["b"].address}
    watch(address, tmp_path / "left", [])
    net.hosts["b"].throttle(10)
    env = AirflowEnv.sqlite(tmp_path)
    write_demo(env.data_root, 1500)
    env.migrate()
    run = env.data_root / "lepton_mnist1d" / "cut"
    cut_at: list[float] = []

    def cut() -> str:
        net.hosts["a"].cut()
        cut_at.append(time.time())
        return net.hosts["a"].link

    steps = [("host-a's link cut in round 2", lambda: (run / "train/round-01/merged.safetensors").exists(), cut)]
    connection = json.dumps({"conn_type": "generic", "host": net.hosts["sched"].address, "port": PORT})
    pipelines = unscheduled_specs(tmp_path / "pipelines")
    with env.serving(AIRFLOW_CONN_DASK_DEFAULT=connection, LEPTON_PIPELINES_DIR=str(pipelines)) as extra:
        env.unpause(extra)
        with FaultDriver(steps) as driver:
            env.trigger(extra, "cut", CONF)
            wait_for(lambda: workers["host-a"] in left(tmp_path / "left"), RUN_TIMEOUT_S,
                     "the scheduler giving host-a up", every=0.5)
            given_up_s = time.time() - cut_at[0]
            ended = env.finished_state("cut", RUN_TIMEOUT_S)
        assert ended == "success", f"run ended {ended}; component logs:\n{env.component_logs()}"
        assert set(driver.done) == {steps[0][0]}, (driver.done, driver.retried)
    assert given_up_s < 70, f"host-a given up {given_up_s:.0f} s after its link was cut"
    assert (run / "train/round-02/merged.safetensors").stat().st_mtime > cut_at[0], "the cut missed training"
    # host-a was cut off, not killed: its `lepton dask-worker` (the supervisor; the Dask worker under it exits when
    # it cannot reach its scheduler, and is started again) lived through the run
    host_a = psutil.Process(processes[net.hosts["a"].name].pid)
    assert host_a.is_running() and host_a.status() != psutil.STATUS_ZOMBIE
    assert "lepton_tasks.tools.supervisor" in " ".join(host_a.cmdline())
    assert workers["host-b"] not in left(tmp_path / "left")
    assert "attempt=2" not in str(list((env.home / "logs").rglob("*")))  # no task needed Airflow's retry
    print(f"host-a given up {given_up_s:.0f} s after its link was cut")
