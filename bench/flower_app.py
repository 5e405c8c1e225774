"""The Flower side of `flower_side_by_side` and `flower_parity`, run as `python bench/flower_app.py JOB.json` in
Flower's own virtual environment (`make bench` builds it: flwr[simulation] pins FastAPI, Starlette and protobuf
versions that Airflow's api-server cannot share).

It trains what the Lepton run trained: the same encoded shards (written by `bench.federated`), the same model
from the same initial weights, the same local loop (the same optimizer, Adam or SGD as the strategy's paper
trains, the same seeded shuffles, FedProx's proximal term), the same rounds; Flower's own strategies aggregate
(FedAvg, FedProx, FedAvgM, FedAdam, FedMedian, FedTrimmedAvg), one after another in one run of Flower's
simulation engine (Ray, one CPU per client), each from the same initial weights. Prints {"seconds"}: the wall
time of `run_simulation`, Ray's start included; writes each strategy's final weights.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg
from flwr.simulation import run_simulation
from safetensors.torch import load_file

from lepton_tasks.ml.models import ModelShape, build_model, load_checkpoint, loss_fn, save_checkpoint

JOB = json.loads(Path(sys.argv[1]).read_text()) if __name__ == "__main__" else {}
client = ClientApp()
server = ServerApp()


def _optimizer(config, parameters) -> torch.optim.Optimizer:
    if config.get("optimizer", "adam") == "sgd":
        return torch.optim.SGD(parameters, lr=float(config["lr"]), momentum=float(config.get("momentum", 0.0)))
    return torch.optim.Adam(parameters, lr=float(config["lr"]))


@client.train()
def train(msg: Message, context: Context) -> Message:
    """One shard's local epochs, as Lepton's `train._fit` runs them (the same seed for the same shard and round)."""
    torch.set_num_threads(1)
    index = int(context.node_config["partition-id"])
    config = msg.content["config"]
    shard = load_file(JOB["shards"][index])
    x, y = shard["x"], shard["y"]
    shape = ModelShape(**JOB["shape"])
    model = build_model(shape)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    mu = float(config.get("proximal-mu", 0.0))
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = _optimizer(config, model.parameters())
    generator = torch.Generator().manual_seed(JOB["seed"] * 1_000_003 + int(config["server-round"]) * 1_009 + index)
    for _ in range(JOB["local_epochs"]):
        for idx in torch.randperm(len(y), generator=generator).split(JOB["batch_size"]):
            loss = loss_fn(shape, model(x[idx]), y[idx])
            if mu:
                loss = loss + mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start, strict=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(y)})})
    return Message(content=content, reply_to=msg)


def _strategy(run: dict, nodes: dict):
    """Flower's own strategy for Lepton's name, with the same hyperparameters."""
    name = run["strategy"]
    if name == "fedprox":
        return FedProx(proximal_mu=run["fedprox_mu"], **nodes)
    if name == "fedavgm":
        return FedAvgM(server_learning_rate=run["server_learning_rate"], server_momentum=run["server_momentum"],
                       **nodes)
    if name == "fedadam":
        return FedAdam(eta=run["server_learning_rate"], beta_1=run["server_momentum"], beta_2=run["adam_beta2"],
                       tau=run["adam_tau"], **nodes)
    if name == "median":
        return FedMedian(**nodes)
    if name == "trimmed_mean":
        return FedTrimmedAvg(beta=run["trim_fraction"], **nodes)
    return FedAvg(**nodes)


@server.main()
def main(grid: Grid, context: Context) -> None:
    shards = len(JOB["shards"])
    nodes = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": shards,
             "min_available_nodes": shards}
    saved = load_checkpoint(Path(JOB["init"]))[0]
    order = build_model(ModelShape(**JOB["shape"])).state_dict()  # the clients' order: FedAvgM pairs arrays by it
    for run in JOB["runs"]:
        initial = ArrayRecord({name: saved[name] for name in order})
        local = ConfigRecord({"optimizer": run["optimizer"], "lr": run["learning_rate"],
                              "momentum": run.get("momentum", 0.0)})
        result = _strategy(run, nodes).start(grid=grid, initial_arrays=initial, num_rounds=JOB["rounds"],
                                             train_config=local)
        save_checkpoint(Path(run["out"]), result.arrays.to_torch_state_dict(), {"strategy": run["strategy"]})


if __name__ == "__main__":
    started = time.perf_counter()
    run_simulation(server_app=server, client_app=client, num_supernodes=len(JOB["shards"]),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": JOB["cpus"], "include_dashboard": False}})
    print(json.dumps({"seconds": time.perf_counter() - started}))
