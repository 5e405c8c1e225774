"""`make bench`: quality and cost of the merged model against central training, measured in one run.

Writes bench/results/merge_vs_central.json. Figures are ratios against a baseline measured in the same run on
the same machine: central training sees the same rows, epochs budget (rounds x local epochs), batch size,
learning rate, initialisation and feature encoding as the shards. MNIST-1D is scored on its standard 1000-row
test split (accuracy); the house-prices example on 1200 held-out rows (R², MAE in k EUR).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from lepton_tasks.demo_data import make_house_prices, make_mnist1d
from lepton_tasks.features import fit, partition_stats
from lepton_tasks.merge import fedavg
from lepton_tasks.metrics import HIGHER_IS_BETTER, worsening
from lepton_tasks.models import evaluate, init_weights, load_model, loss_fn
from lepton_tasks.specs import find_spec
from lepton_tasks.train import model_shape

RESULTS = Path(__file__).parent / "results"


def _train(shape, state, x, y, epochs, params, seed):
    model = load_model(shape, state).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=params.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(params.batch_size):
            loss = loss_fn(shape, model(x[idx]), y[idx])
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


def _tensors(loaded, frame, train_rows: int):
    """Encode as the pipeline does (encoder fitted on the training rows); first rows train, the rest test."""
    encoder = fit(loaded.spec, partition_stats(frame.iloc[:train_rows], loaded.spec))
    x = torch.from_numpy(encoder.encode_features(frame))
    y = torch.from_numpy(encoder.encode_target(frame[encoder.target]))
    return encoder, x[:train_rows], y[:train_rows], x[train_rows:], y[train_rows:]


def merge_vs_central(pipeline: str, frame, train_rows: int, **overrides) -> dict:
    """Merged (FedAvg) vs central on the same rows, encoding and budget, scored on held-out rows."""
    torch.set_num_threads(1)
    loaded = find_spec(pipeline)
    params = loaded.spec.run_defaults().model_copy(update=overrides)
    encoder, x, y, xt, yt = _tensors(loaded, frame, train_rows)
    shape = model_shape(encoder, params.model_kind, params.hidden_size)
    metric = loaded.spec.metric
    started = time.perf_counter()
    merged = evaluate(load_model(shape, _fedavg_run(shape, x, y, params)), shape, xt, yt)
    merged_s = time.perf_counter() - started
    started = time.perf_counter()
    central_state = _train(shape, init_weights(shape, params.seed), x, y,
                           params.local_epochs * params.merge_rounds, params, params.seed)
    central = evaluate(load_model(shape, central_state), shape, xt, yt)
    central_s = time.perf_counter() - started
    return {"value": merged[metric], "baseline": central[metric], "ratio": merged[metric] / central[metric],
            "goal": f"{metric} within 0.02 of central", "unit": metric, "higher_is_better": HIGHER_IS_BETTER[metric],
            "gap": worsening(metric, central[metric], merged[metric]), "merged_metrics": merged,
            "central_metrics": central, "merged_train_s": merged_s, "central_train_s": central_s,
            "params": params.model_dump()}


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "torch": torch.__version__, "cpu_threads": 1}, "benchmarks": {}}
    features, labels = make_mnist1d(5000, 42)  # the package's 4000 train rows first, then its 1000 test rows
    import pandas as pd

    mnist = pd.DataFrame(features, columns=[f"x_{i:02d}" for i in range(40)]).assign(label=labels)
    runs = {
        "merge_vs_central_cnn": ("lepton_mnist1d", mnist, 4000, {}),
        "merge_vs_central_mlp": ("lepton_mnist1d", mnist, 4000, {"model_kind": "mlp", "hidden_size": 100}),
        "merge_vs_central_house_prices": ("lepton_house_prices", make_house_prices(6000, 42), 4800, {}),
    }
    for name, (pipeline, frame, train_rows, overrides) in runs.items():
        results["benchmarks"][name] = merge_vs_central(pipeline, frame, train_rows, **overrides)
        print(name, json.dumps({k: v for k, v in results["benchmarks"][name].items() if k != "params"}))
    (RESULTS / "merge_vs_central.json").write_text(json.dumps(results, indent=2))
    print(RESULTS / "merge_vs_central.json")


if __name__ == "__main__":
    main()
