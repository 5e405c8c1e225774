"""A run whose hosts share nothing but an object store: the store (moto's S3 server), the Dask scheduler and two worker
hosts, each in its own network namespace (`hosts.Network`); the worker hosts see the checkout's `var/` and pytest's
temporary folders as empty tmpfs mounts of their own (`unshare -m`), so no byte passes through a shared disk. The
working area is `LEPTON_DATA_ROOT=s3://lepton/work`, the credentials only the standard AWS settings. Airflow, on
this machine's own namespace, reaches the scheduler through the connection `dask_default`; the run is triggered over
the REST API under Airflow's real scheduler.

Faults, in one run: host-b's link throttled to 10 Mbit/s from the start (tc tbf); once round 1 is merged, the
store's link cut for 30 s (training's writes wait for it: its last model reaches the store only after) and
host-a's link cut (`ip link set ... down`: nothing is closed, packets just stop). The run must finish on throttled
host-b, in each task's first attempt, with the scheduler having given host-a up on its own; its model must be
bit-equal to the same run on one host with a local working area; the store's secret key must be in no file the run
wrote nor log.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from lepton_tasks.config.settings import REPO_ROOT
from lepton_tasks.config.specs import find_spec
from lepton_tasks.core.storage import sha256_file
from lepton_tasks.orchestration import pipeline
from lepton_tasks.tools.airflow_env import (
    RUN_TIMEOUT_S,
    SMALL_CONF,
    AirflowEnv,
    unscheduled_specs,
    wait_for,
)
from lepton_tasks.tools.demo_data import write_mnist1d
from lepton_tasks.tools.s3_server import BUCKET, S3Store
from tests.integration import hosts
from tests.integration.faults import FaultDriver, left, watch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(hosts.available() is not None, reason=str(hosts.available()))]

LEPTON = str(REPO_ROOT / ".venv" / "bin" / "lepton")
PORT = 8786
CONF = {**SMALL_CONF, "local_epochs": 8}  # 2 rounds, each long enough for a fault to land inside it
WORK = f"s3://{BUCKET}/work"
STORE_OUTAGE_S = 30


def _hidden(tmp_path: Path) -> tuple[Path, ...]:
    """What a worker host sees empty: the checkout's var/, and pytest's temporary folders (this test's Airflow,
    its copy of the working area, every other test's files)."""
    pytest_root = next(p for p in tmp_path.parents if p.name.startswith("pytest-of-"))
    return REPO_ROOT / "var", pytest_root


@pytest.fixture
def network(tmp_path):
    """The store host, the scheduler host and two worker hosts, their processes running; the worker hosts with
    the working area's settings and the store's credentials, as an operator starts them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "LEPTON_", "AIRFLOW", "AWS_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)  # the scheduler unpickles the test's LeftLog plugin
    with hosts.Network.create() as net:
        store_host = net.host("store")
        store = S3Store.start(tmp_path, store_host.address, tuple(store_host.command([])))
        scheduler = net.host("sched")
        address = f"tcp://{scheduler.address}:{PORT}"
        worker_env = {**env, **store.environ(), "LEPTON_DATA_ROOT": WORK, "LEPTON_SCRATCH": str(tmp_path / "scratch")}
        commands = {scheduler: ([LEPTON, "dask-scheduler", "--port", str(PORT), "--dashboard-address", ":0"], env),
                    **{net.host(name): ([LEPTON, "dask-worker", address, "--nworkers", "1", "--name", f"host-{name}"],
                                        worker_env) for name in ("a", "b")}}
        processes = {}
        for host, (command, host_env) in commands.items():
            with (tmp_path / f"{host.name}.log").open("w") as log:
                hidden = _hidden(tmp_path) if host_env is worker_env else ()
                processes[host.name] = host.popen(command, hidden, env=host_env, cwd="/", stdout=log,
                                                  stderr=subprocess.STDOUT)
        try:
            yield net, address, processes, store
        finally:
            hosts.stop_sessions(processes.values())
            store.stop()


def _workers_by_name(address: str) -> dict[str, str]:
    from distributed import Client

    with Client(address, timeout="30s") as client:
        return {info["name"]: worker for worker, info in client.scheduler_info()["workers"].items()}


def _land_demo_data(tmp_path: Path, store: S3Store, rows: int) -> Path:
    """The demo data, made outside the working area and uploaded where the spec's relative source points."""
    local = write_mnist1d(tmp_path / "outside", rows)
    store.upload(local, f"work/landing/mnist1d/{local.name}")
    return local.parent


def _store_writes(log: Path) -> dict[str, float]:
    """When the store received each PUT of the run (its access log; whole seconds), by key under the run."""
    written = {}
    for line in log.read_text().splitlines():
        if '"PUT /lepton/work/lepton_mnist1d/cut/' in line:
            stamp = line.split("[", 1)[1].split("]", 1)[0]
            key = line.split('"PUT /lepton/work/lepton_mnist1d/cut/', 1)[1].split(" ", 1)[0]
            written[key] = time.mktime(time.strptime(stamp, "%d/%b/%Y %H:%M:%S"))
    return written


def _cut_for(host: hosts.Host, seconds: float) -> str:
    host.cut()
    threading.Timer(seconds, host.restore).start()
    return host.link


def test_a_run_on_hosts_sharing_only_the_store_survives_a_store_outage_a_cut_host_and_a_throttled_one(
        tmp_path, network, monkeypatch):
    from distributed import Client

    net, address, processes, store = network
    with Client(address, timeout="60s") as client:
        client.wait_for_workers(2, timeout=120)
    workers = _workers_by_name(address)
    assert {info.split(":")[1].strip("/") for info in workers.values()} == {net.hosts["a"].address,
                                                                            net.hosts["b"].address}
    watch(address, tmp_path / "left", [])
    net.hosts["b"].throttle(10)
    env = AirflowEnv.sqlite(tmp_path)
    landed = _land_demo_data(tmp_path, store, 1500)
    env.migrate()
    run = tmp_path / "scratch" / "lepton_mnist1d" / "cut"  # this host's copy of the run's folder on the store
    cut_at: list[float] = []

    def cut() -> str:
        net.hosts["a"].cut()
        cut_at.append(time.time())
        return net.hosts["a"].link

    store_cut_at: list[float] = []

    def cut_store() -> str:
        store_cut_at.append(time.time())
        return _cut_for(net.hosts["store"], STORE_OUTAGE_S)

    round_1_merged = run / "train/round-01/merged.safetensors"
    steps = [("the store's link cut for 30 s in round 2", round_1_merged.exists, cut_store),
             ("host-a's link cut in round 2", round_1_merged.exists, cut)]  # both waited out at once
    connection = json.dumps({"conn_type": "generic", "host": net.hosts["sched"].address, "port": PORT})
    pipelines = unscheduled_specs(tmp_path / "pipelines")
    with env.serving(AIRFLOW_CONN_DASK_DEFAULT=connection, LEPTON_PIPELINES_DIR=str(pipelines), LEPTON_DATA_ROOT=WORK,
                     LEPTON_SCRATCH=str(tmp_path / "scratch"), **store.environ()) as extra:
        env.unpause(extra)
        with FaultDriver(steps) as driver:
            env.trigger(extra, "cut", CONF)
            wait_for(lambda: workers["host-a"] in left(tmp_path / "left"), RUN_TIMEOUT_S,
                     "the scheduler giving host-a up", every=0.5)
            given_up_s = time.time() - cut_at[0]
            ended = env.finished_state("cut", RUN_TIMEOUT_S)
        assert ended == "success", f"run ended {ended}; component logs:\n{env.component_logs()}"
        assert set(driver.done) == {name for name, _, _ in steps}, (driver.done, driver.retried)
    assert given_up_s < 70, f"host-a given up {given_up_s:.0f} s after its link was cut"
    assert (run / "train/round-02/merged.safetensors").stat().st_mtime > cut_at[0], "the cut missed training"
    # the outage hit training: its first checkpoint reached the store before it, its last only once it was over
    written = _store_writes(store.log)
    assert written["train/init.safetensors"] <= store_cut_at[0] + 1, written
    assert written["train/round-02/merged.safetensors"] >= store_cut_at[0] + STORE_OUTAGE_S - 1, written
    # host-a was cut off, not killed: its `lepton dask-worker` (the supervisor; the Dask worker under it exits when
    # it cannot reach its scheduler, and is started again) lived through the run
    host_a = psutil.Process(processes[net.hosts["a"].name].pid)
    assert host_a.is_running() and host_a.status() != psutil.STATUS_ZOMBIE
    assert "lepton_tasks.tools.supervisor" in " ".join(host_a.cmdline())
    assert workers["host-b"] not in left(tmp_path / "left")
    assert "attempt=2" not in str(list((env.home / "logs").rglob("*")))  # no task needed Airflow's retry
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "moto.log"]
    assert not [str(p) for p in written if store.secret.encode() in p.read_bytes()]

    # the same run on one host, its working area on local disk: the same model, bit for bit
    monkeypatch.setenv("LEPTON_DATA_ROOT", str(tmp_path / "one-host"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'one-host.db'}")
    one_host = pipeline.context(find_spec("lepton_mnist1d"), "one-host", {**CONF, "source_uri": str(landed)})
    manifests, _ = pipeline.run_in_process(one_host, last="train")
    assert manifests["train"].merged[-1]["sha256"] == sha256_file(run / "train/round-02/merged.safetensors")
    print(f"host-a given up {given_up_s:.0f} s after its link was cut")
