import pytest
import torch

from lepton_tasks.config import RunParams
from lepton_tasks.errors import IntegrityError
from lepton_tasks.models import ModelShape, init_weights, load_checkpoint, save_checkpoint
from lepton_tasks.train import ShardJob, finished_checkpoint, train, train_shard
from tests.conftest import encoder_for, mnist_frame

ENCODER = encoder_for(mnist_frame(200)).to_dict()


@pytest.fixture
def shard_files(tmp_path):
    files = []
    for i in range(2):
        path = tmp_path / f"shard-{i:03d}" / "part-00000.parquet"
        path.parent.mkdir()
        mnist_frame(200, seed=10 + i).to_parquet(path, index=False)
        files.append({"name": f"shard-{i:03d}", "files": [str(path)], "rows": 200})
    return files


def _job(tmp_path, shard, epochs=3):
    shape = ModelShape("mlp", 40, 10, 32)
    start = tmp_path / "init.safetensors"
    sha = save_checkpoint(start, init_weights(shape, 0), {})
    return ShardJob(shard["name"], 1, shard["files"], shard["rows"], ENCODER, shape,
                    {"path": str(start), "sha256": sha}, str(tmp_path / "out.safetensors"), epochs, 0.01, 32, 5, "d")


def test_one_shard_trains_and_its_checkpoint_describes_itself(tmp_path, shard_files):
    job = _job(tmp_path, shard_files[0])
    result = train_shard(job)
    losses = [e["loss"] for e in result["epochs"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    _, meta = load_checkpoint(tmp_path / "out.safetensors", result["sha256"])
    assert meta["shard"] == "shard-000" and meta["rows"] == "200" and meta["start_sha256"] == job.start["sha256"]
    resumed = finished_checkpoint(job)
    assert resumed["resumed"] and resumed["sha256"] == result["sha256"] and resumed["epochs"] == result["epochs"]
    assert finished_checkpoint(_job(tmp_path / "..", shard_files[0], epochs=4)) is None  # other params: retrain


def test_a_tampered_start_checkpoint_is_refused(tmp_path, shard_files):
    job = _job(tmp_path, shard_files[0])
    with open(job.start["path"], "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x00\x00\x01")
    with pytest.raises(IntegrityError, match="init.safetensors"):
        train_shard(job)


def _weights(checkpoints):
    states = [load_checkpoint(c["path"])[0] for c in checkpoints]
    return [{k: v.tolist() for k, v in state.items()} for state in states]


def test_rounds_on_the_cluster_are_reproducible_and_resume(tmp_path, shard_files, dask_client):
    shape = ModelShape("mlp", 40, 10, 16)
    params = RunParams(source_uri="x", local_epochs=1, merge_rounds=2, model_kind="mlp", hidden_size=16)
    first = train(shard_files, ENCODER, shape, params, tmp_path / "a", dask_client)
    again = train(shard_files, ENCODER, shape, params, tmp_path / "b", dask_client)
    assert _weights(first.final_round) == _weights(again.final_round)  # metadata holds timings; weights must match
    assert len(first.rounds) == 2 and not any(c["resumed"] for r in first.rounds for c in r)
    resumed = train(shard_files, ENCODER, shape, params, tmp_path / "a", dask_client)
    assert all(c["resumed"] for r in resumed.rounds for c in r)
    assert [c["sha256"] for c in resumed.final_round] == [c["sha256"] for c in first.final_round]
    state, _ = load_checkpoint(tmp_path / "a" / "round-01" / "merged.safetensors")
    assert not torch.equal(state["net.0.weight"], init_weights(shape, params.seed)["net.0.weight"])
