"""The local cluster runs in its own process and falls back to CPU, saying so."""

import json
import logging
import os

import pytest

from lepton_tasks.config.settings import Settings
from lepton_tasks.infra.cluster import dask_client, gpu_count, make_local_cluster


@pytest.mark.skipif(gpu_count() > 0, reason="covered by tests/test_gpu.py")
def test_without_a_gpu_torch_can_use_the_cpu_cluster_is_sized_by_cores_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="lepton_tasks.infra.cluster"):
        cluster, kind = make_local_cluster((os.cpu_count() or 1) + 6, 1)
        workers = len(cluster.workers)
        cluster.close()
    assert kind == "LocalCluster" and "no GPU usable by torch" in caplog.text
    assert workers == os.cpu_count()  # more shards than cores: one worker per core, not one per shard


def test_dask_client_starts_and_stops_a_cluster_process(tmp_path):
    settings = Settings(tmp_path, None, None, 2)
    with dask_client(settings) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        assert client.submit(lambda x: x + 1, 41).result() == 42
        scheduler = client.scheduler.address
    assert not _answers(scheduler), "the cluster outlived its block"


def test_a_stages_own_error_is_not_taken_for_a_cluster_fault():
    """A task's missing file is an OSError too: it must fail at once, not be retried as if the scheduler had gone."""
    from lepton_tasks.infra.cluster import recovering

    calls = []

    def body(attempt: int):
        calls.append(attempt)
        raise FileNotFoundError("part-00000.parquet")

    with pytest.raises(FileNotFoundError):
        recovering(None, "shard", body, timeout_s=60)
    assert calls == [0]


def _answers(address: str) -> bool:
    from distributed import Client

    try:
        Client(address, timeout="3s").close()
        return True
    except OSError:
        return False


def _logged(caplog, capsys) -> str:
    """What was logged, by stdlib logging or (once Airflow has configured it) structlog on stdout."""
    return caplog.text + capsys.readouterr().out


def test_the_run_cluster_is_shared_kept_by_a_retry_stopped_by_teardown(tmp_path, caplog, capsys):
    from concurrent.futures import ThreadPoolExecutor

    from lepton_tasks.infra.cluster import await_run_cluster, start_run_cluster, stop_run_cluster

    settings = Settings(tmp_path, None, None, None)
    with ThreadPoolExecutor(1) as beside:  # a task beside the setup task (validate) waits for the cluster to answer
        awaited = beside.submit(await_run_cluster, settings, tmp_path / "cluster", 120)
        run_cluster = start_run_cluster(settings, tmp_path / "cluster", 2)
        assert awaited.result() == run_cluster
    try:
        assert run_cluster["n_workers"] == min(2, os.cpu_count()) and _answers(run_cluster["address"])
        for _ in range(2):  # two tasks, one cluster: no start-up of their own
            with caplog.at_level(logging.INFO, logger="lepton_tasks.infra.cluster"), \
                    dask_client(settings, 2, run_cluster) as client:
                assert client.scheduler.address == run_cluster["address"]
                assert client.submit(lambda x: x + 1, 41).result() == 42
        logged = _logged(caplog, capsys)
        assert logged.count("(the run's cluster)") == 2 and "for this task" not in logged
        assert start_run_cluster(settings, tmp_path / "cluster", 2) == run_cluster  # the setup task retried
    finally:
        stop_run_cluster(run_cluster)
    assert not _answers(run_cluster["address"])
    stop_run_cluster(run_cluster)  # a teardown that runs twice is harmless
    assert await_run_cluster(settings, tmp_path / "cluster", 1) is None  # a stopped one is not awaited
    assert await_run_cluster(settings, tmp_path / "none", 1) is None  # nor one never started


def test_a_task_whose_run_cluster_was_killed_starts_its_own(tmp_path, caplog, capsys):
    import signal

    from lepton_tasks.infra.cluster import start_run_cluster

    settings = Settings(tmp_path, None, None, None)
    run_cluster = start_run_cluster(settings, tmp_path / "cluster", 1)
    os.killpg(run_cluster["pid"], signal.SIGKILL)  # scheduler, nanny and worker: the whole session
    with (caplog.at_level(logging.INFO, logger="lepton_tasks.infra.cluster"),
          dask_client(settings, 1, run_cluster) as client):
        assert client.scheduler.address != run_cluster["address"]
        assert client.submit(lambda x: x * 2, 21).result() == 42
    logged = _logged(caplog, capsys)
    assert "does not answer" in logged and "for this task" in logged
    again = start_run_cluster(settings, tmp_path / "cluster", 1)  # a retried setup task replaces the dead one
    try:
        assert again["pid"] != run_cluster["pid"] and _answers(again["address"])
    finally:
        from lepton_tasks.infra.cluster import stop_run_cluster

        stop_run_cluster(again)


def test_a_run_cluster_whose_teardown_never_came_stops_itself_when_idle(tmp_path):
    import subprocess
    import sys
    import time

    scheduler_file = tmp_path / "scheduler.json"
    process = subprocess.Popen([sys.executable, "-m", "lepton_tasks.infra.cluster", "--scheduler-file",
                                str(scheduler_file), "--workers", "1", "--idle-timeout", "2"], start_new_session=True)
    try:
        started = time.monotonic()
        assert process.wait(timeout=60) == 0 and scheduler_file.exists()
        assert time.monotonic() - started > 2
    finally:
        process.kill()


SETUP_TASK = """
import json, sys
from pathlib import Path
from lepton_tasks.infra.cluster import start_run_cluster
from lepton_tasks.config.settings import Settings
print(json.dumps(start_run_cluster(Settings(Path(sys.argv[1]), None, None, None), Path(sys.argv[1]) / "cluster", 1)))
"""


def test_the_run_cluster_outlives_the_setup_task_without_holding_its_standard_streams(tmp_path):
    """Under Airflow a task's stdin, stdout and stderr are sockets to its supervisor, which reports the task ended
    once they close: a cluster still holding one kept that supervisor (a LocalExecutor worker slot) to the run's
    end."""
    import socket
    import subprocess
    import sys

    from lepton_tasks.infra.cluster import stop_run_cluster

    ours, the_tasks = socket.socketpair()
    task = subprocess.Popen([sys.executable, "-c", SETUP_TASK, str(tmp_path)], stdin=the_tasks, stdout=the_tasks,
                            stderr=subprocess.DEVNULL)
    the_tasks.close()
    ours.settimeout(120)
    received = b""
    while chunk := ours.recv(65536):  # ends at EOF: when no process holds the task's end any more
        received += chunk
    assert task.wait(timeout=60) == 0
    run_cluster = json.loads(received.decode().strip().splitlines()[-1])
    try:
        assert _answers(run_cluster["address"])  # the task has ended, its streams are closed, its cluster runs on
    finally:
        stop_run_cluster(run_cluster)


def _imported(client, module: str) -> set[bool]:
    import sys

    return set(client.run(lambda: module in sys.modules).values())


def test_a_run_whose_validation_will_be_partitioned_gets_workers_that_imported_gx_as_they_started(tmp_path,
                                                                                                  monkeypatch):
    """Every worker imports torch and the train stage as it starts; GX too when the source, sized before ingest
    (Parquet footers), is over the validation memory budget, as validate will then partition on them; once
    validation is done they are restarted without it."""
    from distributed import Client

    from lepton_tasks.config.specs import find_spec
    from lepton_tasks.infra.cluster import restart_without_validation, stop_run_cluster
    from lepton_tasks.orchestration import pipeline
    from tests.conftest import mnist_frame

    monkeypatch.setenv("LEPTON_DATA_ROOT", str(tmp_path))
    (tmp_path / "landing" / "mnist1d").mkdir(parents=True)
    mnist_frame(300).to_parquet(tmp_path / "landing" / "mnist1d" / "mnist1d.parquet", index=False)
    ctx = pipeline.context(find_spec("lepton_mnist1d"), "sized", {"num_shards": 2})
    decoded = pipeline.source_decoded_bytes(ctx)
    assert 300 * 40 * 4 <= decoded < 300 * 41 * 8 + 4096  # 40 float32 features and a label, from the footer
    assert not pipeline.validation_partitioned(ctx)  # far under the 512 MiB default

    monkeypatch.setenv("LEPTON_VALIDATE_MEMORY_BYTES", str(decoded - 1))
    small_budget = pipeline.context(find_spec("lepton_mnist1d"), "sized", {"num_shards": 2})
    assert pipeline.validation_partitioned(small_budget)
    run_cluster = pipeline.start_cluster(small_budget)
    try:
        with Client(run_cluster["address"], timeout="60s") as client:
            from lepton_tasks.orchestration import worker_preload, worker_preload_validation

            # on threads of their own: the workers answered before the imports finished
            assert set(client.run(worker_preload.preloaded, 120).values()) == {True}
            assert set(client.run(worker_preload_validation.preloaded, 120).values()) == {True}
            assert _imported(client, "torch") == _imported(client, "lepton_tasks.stages.train") == {True}
            assert _imported(client, "great_expectations") == {True}

            # validation done (`pipeline.validate` on the run's own cluster): the workers start again without GX
            validating = set(client.run(os.getpid).values())
            restart_without_validation(client)
            restarted = set(client.run(os.getpid).values())
            assert len(restarted) == 2 and not restarted & validating, "the same worker processes"
            assert set(client.run(worker_preload.preloaded, 120).values()) == {True}
            assert _imported(client, "torch") == {True} and _imported(client, "great_expectations") == {False}
    finally:
        stop_run_cluster(run_cluster)


def test_a_stage_gives_the_memory_its_partitions_freed_back_to_the_os(tmp_path):
    """Arrow's pool keeps what a finished task freed (a few hundred MB here without the release);
    `release_worker_memory`, which shard calls on its workers before train loads its shards there,
    gives it back. (The functions are nested: the workers cannot import this test module.)"""
    from lepton_tasks.infra.cluster import release_worker_memory

    def worker_rss() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def read_and_drop_a_table() -> int:  # what a validate or shard partition does to a worker's memory
        import numpy as np
        import pyarrow as pa

        table = pa.table({f"c{i}": np.random.default_rng(i).standard_normal(4_000_000) for i in range(8)})
        frame = table.to_pandas()
        del table, frame
        return worker_rss()

    with dask_client(Settings.from_env(), 1) as client:
        before = client.submit(worker_rss, pure=False).result()
        held = client.submit(read_and_drop_a_table, pure=False).result()
        assert held - before > 200 * 2**20, "the allocation should have stayed with the worker's allocator"
        release_worker_memory(client)
        [after] = client.run(worker_rss).values()
    assert held - after > 150 * 2**20, f"released only {(held - after) >> 20} MB of {(held - before) >> 20} MB"
