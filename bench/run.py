"""`make bench`: quality and cost of the merged model against central training, measured in one run.

Writes bench/results/merge_vs_central.json. Figures are ratios against a baseline measured in the same run on
the same machine: central training sees the same rows, epochs budget (rounds x local epochs), batch size,
learning rate and initialisation as the shards; both are scored on MNIST-1D's standard 1000-row test split.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from lepton_tasks.config import RunParams
from lepton_tasks.demo_data import make_mnist1d
from lepton_tasks.merge import fedavg
from lepton_tasks.models import ModelShape, accuracy, init_weights, load_model

RESULTS = Path(__file__).parent / "results"


def _train(shape, state, x, y, epochs, params, seed):
    model = load_model(shape, state).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=params.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(params.batch_size):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fedavg_run(shape, x, y, params):
    shards = [torch.arange(i, len(y), params.num_shards) for i in range(params.num_shards)]
    state = init_weights(shape, params.seed)
    for rnd in range(params.merge_rounds):
        states = [_train(shape, state, x[s], y[s], params.local_epochs, params, params.seed + 31 * rnd + i)
                  for i, s in enumerate(shards)]
        state = fedavg(states, [len(s) for s in shards])
    return state


def merge_vs_central(params: RunParams) -> dict:
    """Merged (FedAvg) vs central accuracy on the standard 4000/1000 split, same data and budget."""
    torch.set_num_threads(1)
    features, labels = make_mnist1d(5000, 42)  # the package's train rows first, then its test rows
    x, y, xt, yt = (torch.from_numpy(a) for a in (features[:4000], labels[:4000], features[4000:], labels[4000:]))
    shape = ModelShape(params.model_kind, 40, 10, params.hidden_size)
    started = time.perf_counter()
    merged = accuracy(load_model(shape, _fedavg_run(shape, x, y, params)), xt, yt)
    merged_s = time.perf_counter() - started
    started = time.perf_counter()
    central_state = _train(shape, init_weights(shape, params.seed), x, y,
                           params.local_epochs * params.merge_rounds, params, params.seed)
    central = accuracy(load_model(shape, central_state), xt, yt)
    central_s = time.perf_counter() - started
    return {"value": merged, "baseline": central, "ratio": merged / central, "goal": "within 0.02 of central",
            "unit": "accuracy", "higher_is_better": True, "merged_train_s": merged_s, "central_train_s": central_s,
            "gap_points": 100 * (central - merged), "params": params.model_dump()}


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "torch": torch.__version__, "cpu_threads": 1}, "benchmarks": {}}
    for kind in ("cnn", "mlp"):
        params = RunParams(model_kind=kind, hidden_size=64 if kind == "cnn" else 100)
        results["benchmarks"][f"merge_vs_central_{kind}"] = merge_vs_central(params)
        print(kind, json.dumps({k: v for k, v in results["benchmarks"][f"merge_vs_central_{kind}"].items()
                                if k != "params"}))
    (RESULTS / "merge_vs_central.json").write_text(json.dumps(results, indent=2))
    print(RESULTS / "merge_vs_central.json")


if __name__ == "__main__":
    main()
