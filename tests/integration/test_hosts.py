"""A run whose hosts share nothing but an object store: the store (moto's S3 server), the Dask scheduler and two worker
hosts, each in its own network namespace (`hosts.Network`); the worker hosts see the checkout's `var/` and pytest's
temporary folders as empty tmpfs mounts of their own (`unshare -m`), so no byte passes through a shared disk. The
working area is `LEPTON_DATA_ROOT=s3://lepton/work`, the credentials only the standard AWS settings. Airflow, on
this machine's own namespace, reaches the scheduler through the connection `dask_default`; the run is triggered over
the REST API under Airflow's real scheduler.

Faults, in one run: host-b's link throttled to 10 Mbit/s from the start (tc tbf); once a worker host has fetched
round 1's model, the store's link cut for 30 s (training's reads and writes wait for it: its last model reaches the
store only after) and host-a's link cut (`ip link set ... down`: nothing is closed, packets just stop). The run must
finish on throttled host-b, in each task's first attempt, with the scheduler having given host-a up on its own; its
model must be bit-equal to the same run on one host with a local working area. MLflow is a tracking server proxying
its artifacts to the store (the Airflow side reaches it through `mlflow_default`, whose password is planted);
neither the store's secret key nor that password may be in any file the run wrote, any log, the metadata DB (XCom)
or an MLflow param or tag. Then, on the same deployment, the store's key revoked: a run fails at once naming the
setting, with nothing written; and the store gone for good: a run fails after Airflow's retries naming the store,
nothing registered.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from lepton_tasks.config.settings import REPO_ROOT
from lepton_tasks.config.specs import find_spec
from lepton_tasks.core.storage import sha256_file
from lepton_tasks.infra.connections import dask_connection_env
from lepton_tasks.infra.tracking import TAG_RUN
from lepton_tasks.orchestration import pipeline
from lepton_tasks.tools.airflow_env import (
    RUN_TIMEOUT_S,
    SMALL_CONF,
    AirflowEnv,
    TrackingServer,
    read_report,
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
# how long Airflow's tasks wait for the store (LEPTON_STORE_PATIENCE_S; the worker hosts keep the default 60 s): the
# outage starts once the workers train round 2, when only they use the store, and the failing runs fail sooner
PATIENCE_S = 10
RETRIES = 2  # dags/lepton_pipelines.py's default_args
FIRST_WRITER = "wait"  # the run's first task: its summary is the run's first write to the store


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


def _store_writes(log: Path, run: str) -> dict[str, float]:
    """When the store took each PUT of the run (its access log; whole seconds), by key under the run; refused
    ones are not there."""
    written, request = {}, f"PUT /lepton/work/lepton_mnist1d/{run}/"
    for line in log.read_text().splitlines():
        if request in line and '" 200 ' in line:
            stamp = line.split("[", 1)[1].split("]", 1)[0]
            key = line.split(request, 1)[1].split(" ", 1)[0]
            written[key] = time.mktime(time.strptime(stamp, "%d/%b/%Y %H:%M:%S"))
    return written


def _fetched(log: Path, run: str, key: str, clients: tuple[str, ...]) -> bool:
    """Whether one of `clients` (addresses) has read the run's object `key` (the store's access log)."""
    request = f'"GET /lepton/work/lepton_mnist1d/{run}/{key} '
    return any(line.startswith(clients) and request in line and '" 200 ' in line
               for line in log.read_text().splitlines())


def _cut_for(host: hosts.Host, seconds: float) -> str:
    host.cut()
    threading.Timer(seconds, host.restore).start()
    return host.link


@pytest.fixture
def tracking(tmp_path, network):
    """MLflow's tracking server on this host, its artifacts on the store (it alone holds the store's credentials
    for them: clients upload through it)."""
    store = network[3]
    server = TrackingServer(tmp_path / "mlflow", f"s3://{BUCKET}/mlartifacts", store.environ())
    server.root.mkdir()
    server.start()
    yield server
    server.stop()


def test_a_run_on_hosts_sharing_only_the_store_survives_a_store_outage_a_cut_host_and_a_throttled_one(
        tmp_path, network, tracking, monkeypatch):
    from distributed import Client

    net, address, processes, store = network
    with Client(address, timeout="60s") as client:
        client.wait_for_workers(2, timeout=120)
    workers = _workers_by_name(address)
    assert {info.split(":")[1].strip("/") for info in workers.values()} == {net.hosts["a"].address,
                                                                            net.hosts["b"].address}
    watch(address, tmp_path / "left", [])
    net.hosts["b"].throttle(10)
    planted = f"planted-{uuid.uuid4().hex}"
    mlflow_connection = {"conn_type": "http", "host": "127.0.0.1", "port": tracking.port, "login": "lepton",
                         "password": planted}
    env = AirflowEnv(tmp_path, tmp_path / "data", f"sqlite:///{tmp_path / 'airflow.db'}", tracking.uri)
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

    def round_2_started() -> bool:  # a worker host has fetched round 1's model: its training of round 2 is on
        return _fetched(store.log, "cut", "train/round-01/merged.safetensors",
                        (net.hosts["a"].address, net.hosts["b"].address))

    steps = [("the store's link cut for 30 s in round 2", round_2_started, cut_store),
             ("host-a's link cut in round 2", round_2_started, cut)]  # both waited out at once
    pipelines = unscheduled_specs(tmp_path / "pipelines")
    with env.serving(**dask_connection_env(net.hosts["sched"].address, PORT),
                     AIRFLOW_CONN_MLFLOW_DEFAULT=json.dumps(mlflow_connection),
                     LEPTON_PIPELINES_DIR=str(pipelines), LEPTON_DATA_ROOT=WORK,
                     LEPTON_SCRATCH=str(tmp_path / "scratch"), LEPTON_STORE_PATIENCE_S=str(PATIENCE_S),
                     **store.environ()) as extra:
        env.unpause(extra)
        with FaultDriver(steps) as driver:
            env.trigger(extra, "cut", CONF)
            wait_for(lambda: workers["host-a"] in left(tmp_path / "left"), RUN_TIMEOUT_S,
                     "the scheduler giving host-a up", every=0.5)
            given_up_s = time.time() - cut_at[0]
            ended = env.finished_state("cut", RUN_TIMEOUT_S)
        assert ended == "success", f"run ended {ended}; component logs:\n{env.component_logs()}"
        assert set(driver.done) == {name for name, _, _ in steps}, (driver.done, driver.retried)
        _no_secret_in_mlflow_nor_on_the_store(tracking, store, run, (store.secret, planted))
        _a_revoked_key_and_a_store_gone_for_good_fail_the_next_runs(env, extra, store, tmp_path)
    assert given_up_s < 70, f"host-a given up {given_up_s:.0f} s after its link was cut"
    assert (run / "train/round-02/merged.safetensors").stat().st_mtime > cut_at[0], "the cut missed training"
    # the outage hit training: its first checkpoint reached the store before it, its last only once it was over
    written = _store_writes(store.log, "cut")
    assert written["train/init.safetensors"] <= store_cut_at[0] + 1, written
    assert written["train/round-02/merged.safetensors"] >= store_cut_at[0] + STORE_OUTAGE_S - 1, written
    # host-a was cut off, not killed: its `lepton dask-worker` (the supervisor; the Dask worker under it exits when
    # it cannot reach its scheduler, and is started again) lived through the run
    host_a = psutil.Process(processes[net.hosts["a"].name].pid)
    assert host_a.is_running() and host_a.status() != psutil.STATUS_ZOMBIE
    assert "lepton_tasks.tools.supervisor" in " ".join(host_a.cmdline())
    assert workers["host-b"] not in left(tmp_path / "left")
    assert set(env.attempt_logs("cut")) == {"attempt=1.log"}  # no task needed Airflow's retry
    # every file here: Airflow's logs and metadata DB (XCom), the components' logs, this host's copy of the working
    # area, MLflow's database and log, the failed runs' logs
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "moto.log"]
    assert [p for p in written if "run_id=down" in str(p)] and [p for p in written if p.name == "mlflow.db"]
    for secret in (store.secret, planted):
        assert not [str(p) for p in written if secret.encode() in p.read_bytes()]

    # the same run on one host, its working area on local disk: the same model, bit for bit
    monkeypatch.setenv("LEPTON_DATA_ROOT", str(tmp_path / "one-host"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'one-host.db'}")
    one_host = pipeline.context(find_spec("lepton_mnist1d"), "one-host", {**CONF, "source_uri": str(landed)})
    manifests, _ = pipeline.run_in_process(one_host, last="train")
    assert manifests["train"].merged[-1]["sha256"] == sha256_file(run / "train/round-02/merged.safetensors")
    print(f"host-a given up {given_up_s:.0f} s after its link was cut")


def _no_secret_in_mlflow_nor_on_the_store(tracking: TrackingServer, store: S3Store, run: Path,
                                          secrets: tuple[str, ...]) -> None:
    """The run registered through the tracking server, its artifacts on the store; no secret in its params and
    tags, nor in any object on the store."""
    from mlflow import MlflowClient

    report = read_report(run)
    assert report["status"] == "success" and report["mlflow"]["tracking_uri"] == tracking.uri
    mlflow_run = MlflowClient(tracking.uri).get_run(report["mlflow"]["run_id"])
    recorded = json.dumps({"params": mlflow_run.data.params, "tags": mlflow_run.data.tags})
    s3 = store.client("s3")
    keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for item in page.get("Contents", [])]
    assert any(k.startswith("mlartifacts/") and k.endswith("model.onnx") for k in keys), keys
    for key in keys:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert not [secret for secret in secrets if secret.encode() in body], key
    assert not [secret for secret in secrets if secret in recorded]


def _a_revoked_key_and_a_store_gone_for_good_fail_the_next_runs(env: AirflowEnv, extra: dict, store: S3Store,
                                                                  tmp_path: Path) -> None:
    """After the run above, on the same deployment: its key deleted at the store, then the store stopped."""
    import mlflow

    store.revoke()
    env.trigger(extra, "denied", CONF)
    assert env.finished_state("denied", RUN_TIMEOUT_S) == "failed"
    first = env.attempt_logs("denied", FIRST_WRITER)  # one attempt of its three: a retry would not help
    assert env.task_state("denied", FIRST_WRITER) == "failed" and set(first) == {"attempt=1.log"}, first
    said = first["attempt=1.log"]
    assert "StoreAccessDenied" in said and "AWS_SECRET_ACCESS_KEY" in said and "s3://lepton at" in said, said
    assert _store_writes(store.log, "denied") == {}  # every write refused: nothing of the run on the store

    store.stop()
    started = time.monotonic()
    env.trigger(extra, "down", CONF)
    assert env.finished_state("down", RUN_TIMEOUT_S) == "failed"
    tries = env.attempt_logs("down", FIRST_WRITER)  # retried by Airflow (a store may come back), each naming it
    assert len(tries) == RETRIES + 1 and all(
        "StoreUnavailable" in said and f"s3://lepton at {store.endpoint}" in said for said in tries.values()), tries
    report = read_report(tmp_path / "scratch/lepton_mnist1d/down")  # kept on this host
    assert report["failed_stage"] == FIRST_WRITER and "StoreUnavailable" in report["store_error"]
    registry = mlflow.MlflowClient(env.mlflow_uri)
    versions = registry.search_model_versions("name = 'lepton-mnist1d'")
    assert [registry.get_run(v.run_id).data.tags[TAG_RUN] for v in versions] == ["cut"]  # the first run's only
    print(f"the store gone for good: the run failed after {time.monotonic() - started:.0f} s")
