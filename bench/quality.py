"""Merged vs central: the pipeline's own shard, train and merge stages against central training of the same rows.

Quality is always scored on freshly generated MNIST-1D samples (the package's generator with a seed no training
data uses), never on rows tiled from the training data.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lepton_tasks.ml.features import Encoder, fit, partition_stats
from lepton_tasks.ml.metrics import worsening
from lepton_tasks.ml.models import evaluate, init_weights, load_checkpoint, load_model, loss_fn
from lepton_tasks.ml.tensors import load_xy, model_shape

FRESH_SEED = 1_000_003  # held-out samples: a generator seed no benchmark trains on
TRAIN_ROWS, FRESH_ROWS = 4000, 2000


def fresh_samples(encoder: Encoder | dict, rows: int = FRESH_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` newly generated MNIST-1D samples, encoded as the model's input."""
    from lepton_tasks.tools.demo_data import mnist1d_frame

    encoder = Encoder.from_dict(encoder) if isinstance(encoder, dict) else encoder
    frame = mnist1d_frame(rows, FRESH_SEED)
    return torch.from_numpy(encoder.encode_features(frame)), torch.from_numpy(encoder.encode_target(frame["label"]))


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


def train_central(loaded, frame, params, epochs: int):
    """A model trained centrally on `frame`: (shape, state, encoder, encoded training features)."""
    torch.set_num_threads(1)
    encoder = fit(loaded.spec, partition_stats(frame, loaded.spec))
    x = torch.from_numpy(encoder.encode_features(frame))
    y = torch.from_numpy(encoder.encode_target(frame[encoder.target]))
    shape = model_shape(encoder, params.model_kind, params.hidden_size)
    return shape, _train(shape, init_weights(shape, params.seed), x, y, epochs, params, params.seed), encoder, x


def merge_vs_central(work: Path, loaded, seed: int) -> dict:
    """One run of the pipeline's stages up to merge (in process, on the Dask cluster it is given) over 4000 generated
    MNIST-1D rows with the spec's defaults and `seed`, vs central training of the same training rows (the shards'
    union) from the same initialisation for the same epochs (rounds x local epochs); both scored on fresh samples."""
    from lepton_tasks.orchestration import pipeline
    from lepton_tasks.tools.demo_data import mnist1d_frame

    data_root = work / f"merge-{seed}"
    landing = data_root / "landing" / "mnist1d"
    landing.mkdir(parents=True)
    mnist1d_frame(TRAIN_ROWS, seed).to_parquet(landing / "mnist1d.parquet", index=False)
    os.environ["LEPTON_DATA_ROOT"] = str(data_root)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{data_root}/mlflow.db"
    ctx = pipeline.context(loaded, f"merge-{seed}", {"seed": seed})
    manifests, seconds = pipeline.run_in_process(ctx, last="merge")
    shards, merged = manifests["shard"], manifests["merge"]
    shape = model_shape(shards.encoder, ctx.params.model_kind, ctx.params.hidden_size)
    xt, yt = fresh_samples(shards.encoder)
    merged_state, _ = load_checkpoint(Path(merged.merged_path), merged.merged_sha256)
    merged_score = evaluate(load_model(shape, merged_state), shape, xt, yt)
    torch.set_num_threads(1)
    x, y = load_xy([f for s in shards.shards for f in s.files], shards.encoder)
    epochs = ctx.params.local_epochs * ctx.params.merge_rounds
    central_state = _train(shape, init_weights(shape, seed), x, y, epochs, ctx.params, seed)
    central_score = evaluate(load_model(shape, central_state), shape, xt, yt)
    metric = loaded.spec.metric
    return {"merged": merged_score[metric], "central": central_score[metric],
            "gap": worsening(metric, central_score[metric], merged_score[metric]), "seed": seed,
            "train_rows": len(y), "fresh_rows": len(yt), "stage_seconds": seconds,
            "params": {k: getattr(ctx.params, k) for k in ("num_shards", "merge_rounds", "local_epochs",
                                                           "model_kind", "hidden_size")}}
