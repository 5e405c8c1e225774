from dataclasses import replace

import pytest
import torch

from lepton_tasks.config.settings import RunParams
from lepton_tasks.core.errors import IntegrityError
from lepton_tasks.core.storage import sha256_files
from lepton_tasks.data.manifests import ShardInfo
from lepton_tasks.ml.models import ModelShape, init_weights, load_checkpoint, save_checkpoint
from lepton_tasks.stages.train import ShardJob, finished_checkpoint, train, train_shard
from tests.conftest import encoder_for, mnist_frame

ENCODER = encoder_for(mnist_frame(200)).to_dict()


@pytest.fixture
def shard_files(tmp_path):
    files = []
    for i in range(2):
        path = tmp_path / f"shard-{i:03d}" / "part-00000.parquet"
        path.parent.mkdir()
        mnist_frame(200, seed=10 + i).to_parquet(path, index=False)
        files.append(ShardInfo(f"shard-{i:03d}", [str(path)], 200, {}, sha256_files([path])))
    return files


def _job(tmp_path, shard, epochs=3, encoder=ENCODER):
    shape = ModelShape("mlp", 40, 10, 32)
    start = tmp_path / "init.safetensors"
    sha = save_checkpoint(start, init_weights(shape, 0), {})
    return ShardJob(shard.name, 1, shard.files, shard.rows, encoder, shape,
                    {"path": str(start), "sha256": sha}, str(tmp_path / "out.safetensors"), epochs, 0.01, 32, 5,
                    f"epochs-{epochs}", shard.sha256)


def test_one_shard_trains_and_its_checkpoint_describes_itself(tmp_path, shard_files):
    job = _job(tmp_path, shard_files[0])
    result = train_shard(job)
    losses = [e["loss"] for e in result["epochs"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result["device"] == "cpu" and not result["resumed"]  # where it trained, said by the code that trained
    _, meta = load_checkpoint(tmp_path / "out.safetensors", result["sha256"])
    assert meta["shard"] == "shard-000" and meta["rows"] == "200" and meta["start_sha256"] == job.start["sha256"]
    assert meta["data_sha256"] == shard_files[0].sha256 and meta["device"] == "cpu" and meta["threads"] == "1"
    resumed = finished_checkpoint(job)
    assert resumed["resumed"] and resumed["sha256"] == result["sha256"]
    assert [e["loss"] for e in resumed["epochs"]] == [e["loss"] for e in result["epochs"]]
    assert train_shard(job)["resumed"]  # a recomputed job (a result lost with its worker) reads the checkpoint
    # the same job trained again elsewhere writes the same bytes: a late stale attempt cannot break a checksum
    again = train_shard(_job(tmp_path / "..", shard_files[0]))
    assert again["sha256"] == result["sha256"] and not again["resumed"]


def test_a_checkpoint_is_reused_only_for_the_same_params_data_and_encoder(tmp_path, shard_files):
    job = _job(tmp_path, shard_files[0])
    train_shard(job)
    assert finished_checkpoint(job) is not None  # the same job at the same path: resumable
    other_params = _job(tmp_path, shard_files[0], epochs=4)
    assert other_params.out_path == job.out_path and finished_checkpoint(other_params) is None
    # a cleared run over new data with the same row count: the shard's checksum differs, so it trains again
    changed = mnist_frame(200, seed=99)
    changed.to_parquet(shard_files[0].files[0], index=False)
    new_data = _job(tmp_path, replace(shard_files[0], sha256=sha256_files(shard_files[0].files)))
    assert new_data.rows == job.rows and finished_checkpoint(new_data) is None
    refit = encoder_for(mnist_frame(300, seed=1)).to_dict()
    assert finished_checkpoint(_job(tmp_path, shard_files[0], encoder=refit)) is None
    assert not train_shard(new_data)["resumed"]


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


def test_rounds_on_the_cluster_are_bit_equal_and_resume(tmp_path, shard_files, dask_client):
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


def test_the_clusters_scheduler_never_imports_the_training_stack(tmp_path, shard_files):
    """Dask's scheduler unpickles every task it is given: a train task that named its module (or carried a ShardJob)
    made the scheduler import torch, 1.4 s here before any shard could start."""
    import sys

    from lepton_tasks.config.settings import Settings
    from lepton_tasks.infra.cluster import dask_client

    shape = ModelShape("mlp", 40, 10, 16)
    params = RunParams(source_uri="x", local_epochs=1, merge_rounds=1, model_kind="mlp", hidden_size=16)
    with dask_client(Settings(tmp_path, None, None, 2), 2) as client:  # the scheduler in its own process
        trained = train(shard_files, ENCODER, shape, params, tmp_path / "t", client)
        stage_modules = {"torch", "lepton_tasks.stages.train"}
        on_scheduler = client.run_on_scheduler(lambda: sorted(stage_modules & set(sys.modules)))
    assert on_scheduler == [] and [c["shard"] for c in trained.final_round] == ["shard-000", "shard-001"]


def _distance(state, start):
    return sum(float(((state[k] - start[k]) ** 2).sum()) for k in start) ** 0.5


def test_fedprox_keeps_shard_models_near_the_global_model(tmp_path, shard_files, dask_client):
    shape = ModelShape("mlp", 40, 10, 16)
    base = {"source_uri": "x", "local_epochs": 2, "merge_rounds": 1, "model_kind": "mlp", "hidden_size": 16,
            "local_optimizer": "sgd", "learning_rate": 0.05}  # FedProx's paper trains with SGD: both alike
    plain = train(shard_files, ENCODER, shape, RunParams(**base), tmp_path / "plain", dask_client)
    prox = train(shard_files, ENCODER, shape, RunParams(**base, merge_strategy="fedprox", fedprox_mu=10.0),
                 tmp_path / "prox", dask_client)
    start = init_weights(shape, 42)
    for plain_ckpt, prox_ckpt in zip(plain.final_round, prox.final_round, strict=True):
        assert (_distance(load_checkpoint(prox_ckpt["path"])[0], start)
                < 0.5 * _distance(load_checkpoint(plain_ckpt["path"])[0], start))


def test_scaffold_writes_control_variates_corrects_round_two_and_resumes(tmp_path, shard_files, dask_client):
    shape = ModelShape("mlp", 40, 10, 16)
    base = {"source_uri": "x", "local_epochs": 1, "merge_rounds": 2, "model_kind": "mlp", "hidden_size": 16,
            "local_optimizer": "sgd"}  # SCAFFOLD's correction is defined on SGD steps; FedAvg alike to compare
    scaffold = train(shard_files, ENCODER, shape, RunParams(**base, merge_strategy="scaffold"), tmp_path / "s",
                     dask_client)
    fedavg = train(shard_files, ENCODER, shape, RunParams(**base), tmp_path / "f", dask_client)
    assert (tmp_path / "s" / "round-01" / "control.safetensors").exists()
    assert all(c["control"]["sha256"] for r in scaffold.rounds for c in r)
    # round 1 has no correction yet (c = c_i = 0): the same weights as FedAvg; round 2 is corrected
    assert _weights(scaffold.rounds[0]) == _weights(fedavg.rounds[0])
    assert _weights(scaffold.rounds[1]) != _weights(fedavg.rounds[1])
    _, meta = load_checkpoint(scaffold.final_round[0]["path"])
    assert meta["control_sha256"].count(":") == 1 and meta["control_out_sha256"]
    (tmp_path / "s" / "round-02" / "shard-001.control.safetensors").unlink()  # a torn attempt's leftovers
    again = train(shard_files, ENCODER, shape, RunParams(**base, merge_strategy="scaffold"), tmp_path / "s",
                  dask_client)
    assert [c["resumed"] for c in again.final_round] == [True, False]
    assert [c["sha256"] for c in again.final_round] == [c["sha256"] for c in scaffold.final_round]
    assert again.merged == scaffold.merged


def test_dp_sgd_spends_the_epsilon_budget_over_all_rounds(tmp_path, shard_files, dask_client):
    shape = ModelShape("mlp", 40, 10, 16)
    params = RunParams(source_uri="x", local_epochs=1, merge_rounds=2, model_kind="mlp", hidden_size=16,
                       batch_size=50, dp_epsilon=3.0, dp_max_grad_norm=1.0)
    trained = train(shard_files, ENCODER, shape, params, tmp_path / "dp", dask_client)
    first, last = ([c["epsilon"] for c in r] for r in trained.rounds)
    assert all(2.9 < e <= 3.05 for e in last) and all(e < 2.9 for e in first)  # delta = 1/200 per shard
    state = load_checkpoint(trained.merged[-1]["path"])[0]
    assert all(torch.isfinite(t).all() for t in state.values())
    again = train(shard_files, ENCODER, shape, params, tmp_path / "dp-again", dask_client)
    assert _weights(again.final_round) == _weights(trained.final_round)  # seeded noise: bit-equal reruns


def test_a_run_goes_on_from_another_runs_shards_without_running_the_stages_before_again(data_root, dask_client,
                                                                                        monkeypatch):
    """`run_in_process(done=...)`, as the federated benchmark compares strategies: a second run trains and merges
    with its own strategy on the first run's shards; ingest to shard run once."""
    from lepton_tasks.orchestration import pipeline
    from tests.conftest import MNIST_SPEC

    monkeypatch.setenv("LEPTON_DASK_ADDRESS", dask_client.scheduler.address)
    landing = data_root / "landing" / "m"
    landing.mkdir(parents=True)
    mnist_frame(300).to_parquet(landing / "m.parquet", index=False)
    conf = {"source_uri": "landing/m/", "num_shards": 2, "merge_rounds": 1, "local_epochs": 1, "model_kind": "mlp",
            "hidden_size": 8}
    shards, _ = pipeline.run_in_process(pipeline.context(MNIST_SPEC, "first", conf), last="shard")
    median = pipeline.context(MNIST_SPEC, "median", {**conf, "merge_strategy": "median"})
    manifests, seconds = pipeline.run_in_process(median, last="merge", done=shards)
    assert set(seconds) == {"cluster", "train", "merge"} and manifests["shard"] == shards["shard"]
    assert not median.stage_dir("ingest").exists() and median.stage_dir("merge").exists()
    assert manifests["merge"].strategy == "median"


def test_each_strategy_trains_locally_with_its_papers_optimizer_unless_told_otherwise():
    from lepton_tasks.stages.train import local_optimizer

    def optimizer(**params):
        return RunParams(source_uri="x", **params).optimizer

    assert optimizer() == "adam" and optimizer(merge_strategy="median") == "adam"
    assert {optimizer(merge_strategy=s) for s in ("fedprox", "fedavgm", "fedadam", "scaffold")} == {"sgd"}
    assert optimizer(merge_strategy="scaffold", local_optimizer="adam") == "adam"
    assert optimizer(local_optimizer="sgd") == "sgd"
    job = ShardJob("shard-000", 1, [], 1, {}, ModelShape("mlp", 4, 2, 4), {}, "", 1, 0.05, 8, 0, "", "",
                   optimizer="sgd", momentum=0.9)
    made = local_optimizer(job, [torch.zeros(2, requires_grad=True)])
    assert isinstance(made, torch.optim.SGD) and made.defaults["momentum"] == 0.9 and made.defaults["lr"] == 0.05
    adam = local_optimizer(ShardJob(**{**job.__dict__, "optimizer": "adam"}), [torch.zeros(2, requires_grad=True)])
    assert isinstance(adam, torch.optim.Adam)
