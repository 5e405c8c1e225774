"""The local cluster runs in its own process and falls back to CPU, saying so."""

import logging
import os

import pytest

from lepton_tasks.cluster import dask_client, gpu_count, make_local_cluster
from lepton_tasks.config import Settings


@pytest.mark.skipif(gpu_count() > 0, reason="covered by tests/test_gpu.py")
def test_without_a_gpu_torch_can_use_the_cpu_cluster_is_sized_by_cores_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="lepton_tasks.cluster"):
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
    from distributed import Client

    try:  # the cluster process is gone with the block
        Client(scheduler, timeout="2s").close()
        raise AssertionError("the cluster outlived its block")
    except OSError:
        pass


def test_a_stages_own_error_is_not_taken_for_a_cluster_fault():
    """A task's missing file is an OSError too: it must fail at once, not be retried as if the scheduler had gone."""
    from lepton_tasks.cluster import recovering

    calls = []

    def body(attempt: int):
        calls.append(attempt)
        raise FileNotFoundError("part-00000.parquet")

    with pytest.raises(FileNotFoundError):
        recovering(None, "shard", body, timeout_s=60)
    assert calls == [0]
