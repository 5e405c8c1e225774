"""GPU path: LocalCUDACluster workers train a shard on the device. Skipped where torch can use no CUDA device
(a CPU build of torch on a machine with a driver skips too: NVML alone does not decide)."""

from pathlib import Path

import pytest

from lepton_tasks.infra.cluster import gpu_count, make_local_cluster
from tests.conftest import has_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not has_gpu(), reason="torch can use no CUDA device here")]


def test_local_cuda_cluster_is_chosen_with_one_worker_per_gpu():
    cluster, kind = make_local_cluster(None, 1)
    try:
        assert kind == "LocalCUDACluster" and len(cluster.workers) == gpu_count()
    finally:
        cluster.close()


def test_a_shard_trains_on_the_gpu(tmp_path):
    import torch
    from distributed import Client

    from tests.conftest import mnist_frame
    from tests.test_train import _job

    path = tmp_path / "shard.parquet"
    mnist_frame(400).to_parquet(path, index=False)
    job = _job(tmp_path, {"name": "shard-000", "files": [str(path)], "rows": 400})
    cluster, _ = make_local_cluster(None, 1)
    try:
        with Client(cluster) as client:
            from lepton_tasks.stages.train import train_shard

            result = client.submit(train_shard, job).result()
            assert client.submit(torch.cuda.is_available).result()
        assert result["epochs"][-1]["loss"] < result["epochs"][0]["loss"]
        # where it trained, as recorded by the code that trained it (and in the checkpoint)
        from lepton_tasks.ml.models import load_checkpoint

        assert result["device"].startswith("cuda") and not result["resumed"]
        assert load_checkpoint(Path(result["path"]))[1]["device"].startswith("cuda")
    finally:
        cluster.close()


def test_gpu_out_of_memory_falls_back_to_a_smaller_batch(tmp_path, caplog):
    import logging

    import torch

    from lepton_tasks.stages.train import train_shard
    from tests.conftest import mnist_frame
    from tests.test_train import _job

    path = tmp_path / "shard.parquet"
    mnist_frame(4000).to_parquet(path, index=False)
    job = _job(tmp_path, {"name": "shard-000", "files": [str(path)], "rows": 4000}, epochs=1)
    job.batch_size = 4000
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(int(free * 0.999) // 4 - (4 << 20), dtype=torch.float32, device="cuda")  # leave ~16 MiB
    try:
        with caplog.at_level(logging.WARNING, logger="lepton_tasks.stages.train"):
            result = train_shard(job)
    finally:
        del ballast
    assert result["epochs"][-1]["batch_size"] < 4000 and "GPU out of memory" in caplog.text
