"""The local cluster runs in its own process and falls back to CPU, saying so."""

import logging

from lepton_tasks.cluster import dask_client, gpu_count, make_local_cluster
from lepton_tasks.config import Settings


def test_without_a_gpu_the_cpu_cluster_is_used_and_logged(caplog):
    if gpu_count():
        return  # covered by tests/test_gpu.py
    with caplog.at_level(logging.INFO, logger="lepton_tasks.cluster"):
        cluster, kind = make_local_cluster(1, 1)
        cluster.close()
    assert kind == "LocalCluster" and "no GPU visible" in caplog.text


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
