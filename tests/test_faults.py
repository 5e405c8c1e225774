"""Faults injected into real Dask workers and real processes: training survives, stops boundedly, or resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from distributed.diagnostics.plugin import WorkerPlugin

from lepton_tasks.config import RunParams
from lepton_tasks.errors import TrainingError
from lepton_tasks.models import ModelShape, load_checkpoint
from lepton_tasks.train import PROGRESS_TOPIC, check_memory, train
from tests.conftest import encoder_for, mnist_frame

ENCODER = encoder_for(mnist_frame(300)).to_dict()
SHAPE = ModelShape("mlp", 40, 10, 32)
PARAMS = RunParams(source_uri="x", local_epochs=25, merge_rounds=1, model_kind="mlp", hidden_size=32, batch_size=32)


@pytest.fixture
def shards(tmp_path):
    made = []
    for i in range(2):
        path = tmp_path / "shards" / f"shard-{i:03d}" / "part-00000.parquet"
        path.parent.mkdir(parents=True)
        mnist_frame(300, seed=20 + i).to_parquet(path, index=False)
        made.append({"name": f"shard-{i:03d}", "files": [str(path)], "rows": 300})
    return made


@pytest.fixture
def process_cluster():
    """Two worker processes under nannies (as in production): a killed worker is replaced."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            yield client


def _weights(manifest) -> list[dict]:
    return [{k: v.tolist() for k, v in load_checkpoint(c["path"])[0].items()} for c in manifest.final_round]


def _finished_epochs(client, shard: str, epochs: int) -> int:
    """How many times `shard` was trained to its last epoch (from the workers' progress events)."""
    return sum(1 for _, msg in client.get_events(PROGRESS_TOPIC)
               if msg.get("shard") == shard and msg.get("epoch") == epochs)


def _kill_worker_running(client, shard: str, timeout: float = 60) -> int:
    """SIGKILL the worker process that is training `shard` as soon as it has reported its first epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = any(msg.get("shard") == shard for _, msg in client.get_events(PROGRESS_TOPIC))
        busy = [addr for addr, keys in client.processing().items() if any(shard in str(k) for k in keys)]
        if started and busy:
            pid = client.run(os.getpid, workers=busy)[busy[0]]
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.05)
    raise AssertionError(f"{shard} never started training")


def test_a_killed_worker_costs_only_its_shard_and_the_result_equals_a_clean_run(tmp_path, shards, process_cluster):
    client = process_cluster
    clean = train(shards, ENCODER, SHAPE, PARAMS, tmp_path / "clean", client)
    client.get_events(PROGRESS_TOPIC)  # (events of the clean run are told apart by count below)
    before = {s["name"]: _finished_epochs(client, s["name"], PARAMS.local_epochs) for s in shards}
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(
        manifest=train(shards, ENCODER, SHAPE, PARAMS, tmp_path / "faulty", client)))
    runner.start()
    killed = _kill_worker_running(client, "shard-000")
    runner.join(timeout=300)
    assert "manifest" in outcome, "training did not finish after the worker was killed"
    assert killed not in client.run(os.getpid).values()  # the worker really died and was replaced
    assert _weights(outcome["manifest"]) == _weights(clean)  # recomputed shard: same seed, same weights
    for shard in shards:  # each shard reached its last epoch exactly once in the faulty run
        assert _finished_epochs(client, shard["name"], PARAMS.local_epochs) - before[shard["name"]] == 1


class _PoisonShard(WorkerPlugin):
    """Worker plugin: a worker that starts training `shard` dies on the spot, every time (a real crash)."""

    name = "lepton-test-poison"

    def __init__(self, shard: str):
        self.shard = shard

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and self.shard in str(key):
            os._exit(13)


def test_a_shard_that_kills_every_worker_fails_boundedly_naming_it(tmp_path, shards, process_cluster):
    client = process_cluster
    client.register_plugin(_PoisonShard("shard-001"))
    started = time.monotonic()
    with pytest.raises(TrainingError, match=r"shard-001 \(round 1\) killed its Dask worker on every attempt"):
        train(shards, ENCODER, SHAPE, PARAMS, tmp_path / "stage", client)
    assert time.monotonic() - started < 180
    assert not (tmp_path / "stage" / "round-01" / "shard-001.safetensors").exists()
    assert not (tmp_path / "stage" / "round-01" / "merged.safetensors").exists()


def test_a_shard_too_big_for_the_workers_memory_limit_is_refused_naming_the_limit(tmp_path):
    from distributed import Client, LocalCluster

    from lepton_tasks.train import _job

    huge = {"name": "shard-000", "files": [], "rows": 2_000_000}
    job = _job(huge, 1, ENCODER, SHAPE, {"path": "-", "sha256": "-"}, tmp_path, PARAMS)
    with LocalCluster(n_workers=1, processes=False, memory_limit="256MiB", dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            with pytest.raises(TrainingError, match=r"shard-000 needs about 938 MiB .* memory limit of 256 MiB"):
                check_memory([job], client)
            check_memory([_job({**huge, "rows": 1000}, 1, ENCODER, SHAPE, {}, tmp_path, PARAMS)], client)


RESUMABLE = """
import sys, json
from pathlib import Path
from distributed import Client, LocalCluster
from lepton_tasks.config import RunParams
from lepton_tasks.models import ModelShape
from lepton_tasks.train import train
shards, encoder, stage = json.loads(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3])
params = RunParams.model_validate_json(sys.argv[4])
if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c, Client(c) as cl:
        train(shards, encoder, ModelShape("mlp", 40, 10, 32), params, stage, cl)
"""


def test_a_train_task_killed_after_a_round_resumes_without_retraining_and_ends_identical(tmp_path, shards,
                                                                                         process_cluster):
    import json

    params = PARAMS.model_copy(update={"local_epochs": 15, "merge_rounds": 3})
    stage = tmp_path / "stage"
    args = [json.dumps(shards), json.dumps(ENCODER), str(stage), params.model_dump_json()]
    task = subprocess.Popen([sys.executable, "-c", RESUMABLE, *args], cwd=Path(__file__).parents[1])
    first_round = stage / "round-01" / "merged.safetensors"
    deadline = time.monotonic() + 240
    while not first_round.exists() and task.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    task.send_signal(signal.SIGKILL)  # as a worker node or the OOM killer would
    task.wait()
    assert first_round.exists() and not (stage / "round-03" / "merged.safetensors").exists()
    assert not (stage / "round-03").exists() or len(list((stage / "round-03").glob("shard-*"))) < 2

    # every attempt trains in fresh single-threaded worker processes, as in production: bit-for-bit comparable
    resumed = train(shards, ENCODER, SHAPE, params, stage, process_cluster)
    assert all(c["resumed"] for c in resumed.rounds[0])  # round 1 was not trained again
    assert not all(c["resumed"] for c in resumed.rounds[-1])
    clean = train(shards, ENCODER, SHAPE, params, tmp_path / "clean", process_cluster)
    assert _weights(resumed) == _weights(clean)
    assert torch.equal(load_checkpoint(resumed.final_round[0]["path"])[0]["net.0.weight"],
                       load_checkpoint(clean.final_round[0]["path"])[0]["net.0.weight"])
