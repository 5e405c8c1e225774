"""`lepton dask-scheduler` and `lepton dask-worker`, started from a plain shell as an operator types them, and a
worker host that stops answering without closing its connections.

The host's processes (supervisor, nanny, worker) are stopped with SIGSTOP: its kernel still answers TCP, so no
connection breaks and only the heartbeats can tell (the worst case of a dead VM or a cut link, whose connections
the kernel's keepalive probes also close). The scheduler must give the host up within about a minute, and the
task it was running must finish on the host left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from lepton_tasks.config.settings import REPO_ROOT
from lepton_tasks.tools.airflow_env import free_port, wait_for
from tests.integration.hosts import stop_sessions

pytestmark = pytest.mark.slow

LEPTON = str(REPO_ROOT / ".venv" / "bin" / "lepton")
GIVEN_UP_WITHIN_S = 70  # "about a minute": worker-ttl 15 s, checked every 15 s, then 30 s for the nanny to answer


def _where(seconds: float) -> str:
    """Sleep, then name the worker that ran this (a task that outlives the fault)."""
    from distributed import get_worker

    time.sleep(seconds)
    return get_worker().name


@pytest.fixture
def hosts(tmp_path):
    """A scheduler and two single-worker hosts, each its own `lepton` command in its own session."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "LEPTON_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)  # the workers unpickle this module's function
    commands = {"scheduler": [LEPTON, "dask-scheduler", "--host", "127.0.0.1", "--port", str(port),
                              "--dashboard-address", f"127.0.0.1:{free_port()}"],
                **{name: [LEPTON, "dask-worker", address, "--nworkers", "1", "--name", name, "--host", "127.0.0.1"]
                   for name in ("host-a", "host-b")}}
    processes = {}
    for name, command in commands.items():
        with (tmp_path / f"{name}.log").open("w") as log:
            processes[name] = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True,
                                               stdout=log, stderr=subprocess.STDOUT)
    yield address, processes
    stop_sessions(processes.values())


def test_a_silent_worker_host_is_given_up_within_a_minute_and_its_task_finishes_on_the_other(hosts):
    from distributed import Client

    address, processes = hosts
    with Client(address, timeout="60s") as client:
        client.wait_for_workers(2, timeout=120)
        workers = client.scheduler_info()["workers"]
        by_name = {info["name"]: worker for worker, info in workers.items()}
        assert set(by_name) == {"host-a", "host-b"}
        # Lepton's settings reached the processes `lepton dask-*` started
        assert client.run_on_scheduler(lambda: __import__("dask").config.get("distributed.scheduler.worker-ttl")) \
            == "15s"
        preloaded = client.run(lambda: "lepton_tasks.orchestration.worker_preload" in __import__("sys").modules)
        assert all(preloaded.values()), preloaded
        assert {info["nthreads"] for info in workers.values()} == {1}

        task = client.submit(_where, 5, workers=["host-a"], allow_other_workers=True, pure=False)
        wait_for(lambda: client.processing()[by_name["host-a"]], 60, "the task running on host-a", every=0.2)
        host_a = psutil.Process(processes["host-a"].pid)
        tree = [host_a, *host_a.children(recursive=True)]
        assert client.run(os.getpid, workers=[by_name["host-a"]])[by_name["host-a"]] in {p.pid for p in tree}, \
            "the stopped processes must hold host-a's Dask worker"
        os.killpg(processes["host-a"].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: by_name["host-a"] not in client.scheduler_info()["workers"], GIVEN_UP_WITHIN_S,
                 "the scheduler giving host-a up", every=0.5)
        given_up_s = time.monotonic() - stopped
        assert all(p.status() == psutil.STATUS_STOPPED for p in tree), "host-a must have stayed silent throughout"
        assert task.result(timeout=60) == "host-b"
        print(f"host-a given up {given_up_s:.0f} s after it stopped answering")
