"""Merged (FedAvg) vs central training: same rows, encoding, initialisation and epochs budget.

MNIST-1D is scored on its standard 1000-row test split (the package's 4000 training rows train); the
house-prices example on 1200 held-out rows (R², MAE in k EUR).
"""

from __future__ import annotations

import time

import torch

from lepton_tasks.features import fit, partition_stats
from lepton_tasks.merge import fedavg
from lepton_tasks.metrics import HIGHER_IS_BETTER, worsening
from lepton_tasks.models import evaluate, init_weights, load_model, loss_fn
from lepton_tasks.train import model_shape


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


def train_central(loaded, frame, train_rows: int, params, epochs: int):
    """A centrally trained model: (shape, state, held-out tensors, training features)."""
    torch.set_num_threads(1)
    encoder, x, y, xt, yt = _tensors(loaded, frame, train_rows)
    shape = model_shape(encoder, params.model_kind, params.hidden_size)
    return shape, _train(shape, init_weights(shape, params.seed), x, y, epochs, params, params.seed), (xt, yt), x


def merge_vs_central(loaded, frame, train_rows: int, params) -> dict:
    """Merged vs central on the same rows, encoding and budget (rounds x local epochs), scored on held-out rows."""
    torch.set_num_threads(1)
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
            "unit": metric, "higher_is_better": HIGHER_IS_BETTER[metric],
            "gap": worsening(metric, central[metric], merged[metric]), "merged_metrics": merged,
            "central_metrics": central, "merged_train_s": merged_s, "central_train_s": central_s,
            "params": params.model_dump()}


def merge_grid(loaded, frame, train_rows: int, base_params, shards=(1, 2, 4, 8), rounds=(1, 2, 3, 4, 5)) -> list[dict]:
    """Merged vs central accuracy and training seconds over shards x rounds, same local epochs each."""
    grid = []
    for num_shards in shards:
        for merge_rounds in rounds:
            params = base_params.model_copy(update={"num_shards": num_shards, "merge_rounds": merge_rounds})
            point = merge_vs_central(loaded, frame, train_rows, params)
            grid.append({"shards": num_shards, "rounds": merge_rounds, "merged": point["value"],
                         "central": point["baseline"], "gap": point["gap"], "merged_train_s": point["merged_train_s"],
                         "central_train_s": point["central_train_s"]})
            print(f"merge grid {num_shards} shards x {merge_rounds} rounds: merged {point['value']:.3f} "
                  f"central {point['baseline']:.3f}", flush=True)
    return grid
