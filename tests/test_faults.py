"""Faults injected into real Dask workers, schedulers and processes: training survives, stops boundedly, or
resumes, and the weights are bit-equal to a clean run's (the determinism policy in `lepton_tasks.stages.train`)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from distributed.diagnostics.plugin import WorkerPlugin

from lepton_tasks.config.settings import RunParams
from lepton_tasks.core.errors import ClusterError, TrainingError
from lepton_tasks.core.storage import sha256_files
from lepton_tasks.data.manifests import ShardInfo
from lepton_tasks.ml.models import ModelShape, load_checkpoint
from lepton_tasks.stages.train import PROGRESS_TOPIC, check_memory, train
from lepton_tasks.tools.airflow_env import free_port
from tests.conftest import encoder_for, mnist_frame

ENCODER = encoder_for(mnist_frame(300)).to_dict()
SHAPE = ModelShape("mlp", 40, 10, 32)
PARAMS = RunParams(source_uri="x", local_epochs=25, merge_rounds=1, model_kind="mlp", hidden_size=32, batch_size=32)


def _write_shards(folder: Path, rows: list[int]) -> list[ShardInfo]:
    """Shard records as the shard stage's manifest has them (files, rows, checksum)."""
    made = []
    for i, count in enumerate(rows):
        path = folder / f"shard-{i:03d}" / "part-00000.parquet"
        path.parent.mkdir(parents=True)
        mnist_frame(count, seed=20 + i).to_parquet(path, index=False)
        made.append(ShardInfo(f"shard-{i:03d}", [str(path)], count, {}, sha256_files([path])))
    return made


@pytest.fixture
def shards(tmp_path):
    return _write_shards(tmp_path / "shards", [300, 300])


@pytest.fixture
def process_cluster():
    """Two worker processes under nannies (as in production): a killed worker is replaced."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    try:
        with Client(cluster) as client:
            yield client
    finally:
        _close_bounded(cluster)


def _close_bounded(cluster) -> None:
    """Close a cluster whose workers the test killed; its close can wait forever on dead nannies (seen once)."""
    try:
        cluster.close(timeout=30)
    except Exception as err:  # a cluster left half-closed by the faults: the test's outcome stands
        print(f"cluster close after fault injection: {type(err).__name__}: {err}")


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
    before = {s.name: _finished_epochs(client, s.name, PARAMS.local_epochs) for s in shards}
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
        assert _finished_epochs(client, shard.name, PARAMS.local_epochs) - before[shard.name] == 1


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
    with pytest.raises(TrainingError, match=r"shard-001 \(round 1\) killed its Dask worker on every attempt") as err:
        train(shards, ENCODER, SHAPE, PARAMS.model_copy(update={"merge_rounds": 2}), tmp_path / "stage", client)
    assert not err.value.retryable  # the same data would kill the retry's workers too
    assert time.monotonic() - started < 180
    round_one = tmp_path / "stage" / "round-01"
    assert not (round_one / "shard-001.safetensors").exists()
    assert (round_one / "shard-000.safetensors").exists()  # the healthy shard's work is kept for a resume
    assert not (round_one / "merged.safetensors").exists()  # the round never completed: nothing was merged


def _holder_of_finished(client, shard: str, other: str) -> str | None:
    """The worker holding `shard`'s finished result while `other` still trains, if that moment is now."""
    holders = [addr for key, addrs in client.who_has().items() if shard in str(key) for addr in addrs]
    still_training = any(other in str(k) for keys in client.processing().values() for k in keys)
    return holders[0] if holders and still_training else None


def test_a_finished_result_lost_with_its_worker_is_read_back_not_failed(tmp_path, process_cluster):
    """The fault that failed one `make up` run in four: a shard had finished, its result lived on the worker
    that died, and the future was 'lost' (neither finished nor failed)."""
    client = process_cluster
    small_and_big = _write_shards(tmp_path / "shards", [60, 900])
    clean = train(small_and_big, ENCODER, SHAPE, PARAMS, tmp_path / "clean", client)
    before = _finished_epochs(client, "shard-000", PARAMS.local_epochs)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(
        manifest=train(small_and_big, ENCODER, SHAPE, PARAMS, tmp_path / "faulty", client)))
    runner.start()
    deadline, holder = time.monotonic() + 120, None
    while holder is None and time.monotonic() < deadline and runner.is_alive():
        holder = _holder_of_finished(client, "shard-000", "shard-001")
        time.sleep(0.02)
    assert holder, "never saw shard-000 finished while shard-001 trained"
    os.kill(client.run(os.getpid, workers=[holder])[holder], signal.SIGKILL)
    runner.join(timeout=300)
    assert "manifest" in outcome, "training did not finish after the worker holding a result was killed"
    assert _weights(outcome["manifest"]) == _weights(clean)
    # Dask recomputed the lost key, which read the checkpoint back instead of training the shard again
    assert _finished_epochs(client, "shard-000", PARAMS.local_epochs) - before == 1


def test_a_shard_too_big_for_the_workers_memory_limit_is_refused_naming_the_limit(tmp_path):
    from distributed import Client, LocalCluster

    from lepton_tasks.stages.train import _job

    huge = ShardInfo("shard-000", [], 2_000_000, {}, "-")
    job = _job(huge, 1, ENCODER, SHAPE, {"path": "-", "sha256": "-"}, tmp_path, PARAMS)
    with LocalCluster(n_workers=1, processes=False, memory_limit="256MiB", dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            with pytest.raises(TrainingError, match=r"shard-000 needs about 938 MiB .* memory limit of 256 MiB"):
                check_memory([job], client)
            check_memory([_job(replace(huge, rows=1000), 1, ENCODER, SHAPE, {}, tmp_path, PARAMS)], client)


RESUMABLE = """
import sys, json
from pathlib import Path
from distributed import Client, LocalCluster
from lepton_tasks.config.settings import RunParams
from lepton_tasks.data.manifests import ShardInfo
from lepton_tasks.ml.models import ModelShape
from lepton_tasks.stages.train import train
shards = [ShardInfo(**shard) for shard in json.loads(sys.argv[1])]
encoder, stage = json.loads(sys.argv[2]), Path(sys.argv[3])
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
    args = [json.dumps([asdict(s) for s in shards]), json.dumps(ENCODER), str(stage), params.model_dump_json()]
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


@pytest.fixture
def supervised_cluster(tmp_path):
    """The Dask topology of `make up`: a `dask scheduler` and two `dask worker` processes, each under
    `lepton_tasks.tools.supervisor`; yields (the supervisor processes by name, a client)."""
    from distributed import Client

    from lepton_tasks.tools.services import Deployment, dask_commands

    deployment = Deployment(tmp_path / "state", tmp_path / "data", dask_port=free_port(),
                            dashboard_port=free_port(), dask_workers=2)
    log = (tmp_path / "dask.log").open("w")
    supervisors = {name: subprocess.Popen(command, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
                   for name, command in dask_commands(deployment).items()}
    client = Client(deployment.dask_address, timeout="60s")
    client.wait_for_workers(2, timeout=120)
    yield supervisors, client
    client.close()
    for process in supervisors.values():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


def _kill_child(supervisor: subprocess.Popen) -> int:
    """SIGKILL the process a supervisor runs (the real `dask scheduler`); returns its pid."""
    import psutil

    [child] = psutil.Process(supervisor.pid).children()
    child.kill()
    return child.pid


def _wait_for(path: Path, runner: threading.Thread, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert runner.is_alive() and time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _train_in_thread(shards: list[ShardInfo], stage: Path, params: RunParams, client) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def body() -> None:
        try:
            outcome["manifest"] = train(shards, ENCODER, SHAPE, params, stage, client)
        except Exception as err:
            outcome["error"] = err

    runner = threading.Thread(target=body)
    runner.start()
    return runner, outcome


def test_scheduler_restarted_mid_training_then_gone_for_good(tmp_path, shards, supervised_cluster, monkeypatch,
                                                              caplog):
    supervisors, client = supervised_cluster
    address = client.scheduler.address  # a client that gave up on a long outage forgets its scheduler
    caplog.set_level(logging.INFO, logger="lepton_tasks")
    # rounds long enough (~1 s on a laptop core) that the kill lands inside round 2, not after the last round
    params = PARAMS.model_copy(update={"local_epochs": 80, "merge_rounds": 3})
    clean = train(shards, ENCODER, SHAPE, params, tmp_path / "clean", client)

    # 1. the scheduler process dies in round 2 and its supervisor starts it again: the same call recovers
    runner, outcome = _train_in_thread(shards, tmp_path / "restarted", params, client)
    _wait_for(tmp_path / "restarted" / "round-01" / "merged.safetensors", runner)
    time.sleep(0.1)
    _kill_child(supervisors["dask-scheduler"])
    runner.join(timeout=300)
    assert "manifest" in outcome, f"training did not survive the scheduler restart: {outcome.get('error')!r}"
    assert _weights(outcome["manifest"]) == _weights(clean)
    assert "the Dask cluster failed under it" in caplog.text and "the cluster is back" in caplog.text

    # 2. the scheduler goes and stays gone past the recovery window: a retryable error, and the retry resumes
    monkeypatch.setenv("LEPTON_DASK_RECOVERY_S", "8")
    runner, outcome = _train_in_thread(shards, tmp_path / "outage", params, client)
    _wait_for(tmp_path / "outage" / "round-01" / "merged.safetensors", runner)
    os.killpg(supervisors["dask-scheduler"].pid, signal.SIGKILL)  # the supervisor too: it stays down
    runner.join(timeout=120)
    assert isinstance(outcome.get("error"), ClusterError) and outcome["error"].retryable, outcome
    from distributed import Client

    supervisors["dask-scheduler"] = subprocess.Popen(supervisors["dask-scheduler"].args, start_new_session=True,
                                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with Client(address, timeout="60s") as retry_client:  # what Airflow's retry does
        retry_client.wait_for_workers(1, timeout=120)
        resumed = train(shards, ENCODER, SHAPE, params, tmp_path / "outage", retry_client)
    assert all(c["resumed"] for c in resumed.rounds[0])
    assert _weights(resumed) == _weights(clean)
