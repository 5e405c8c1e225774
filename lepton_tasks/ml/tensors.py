"""A shard's rows as tensors: encoded features and targets read from Parquet, and the model shape that fits them."""

from __future__ import annotations

from pathlib import Path

import torch

from lepton_tasks.core import store
from lepton_tasks.core.errors import TrainingError
from lepton_tasks.ml.features import Encoder
from lepton_tasks.ml.models import ModelShape

LOAD_BATCH_ROWS = 262_144  # rows decoded at a time while loading a shard


def load_xy(files: list[str], encoder: Encoder | dict,
            max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded features (float32) and targets (class index or value) of Parquet files, only the needed columns;
    with `max_rows`, only the first rows of the first files. Read batch by batch into one preallocated array: a
    shard of millions of rows is never also held whole as a pandas frame (that doubled a train worker's peak)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(encoder, dict):
        encoder = Encoder.from_dict(encoder)
    if not files:
        raise TrainingError("no Parquet files to load")
    columns = [*encoder.source_columns, encoder.target]
    for path in files:  # on a host that shares only the store, its copy of the shard
        store.fetch(Path(path))
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    total = total if max_rows is None else min(total, max_rows)
    if total == 0:  # nothing to stream: the (empty) frame still gives the encodings their dtypes
        frame = pq.read_table(files[0], columns=columns).to_pandas()
        return (torch.from_numpy(encoder.encode_features(frame)),
                torch.from_numpy(encoder.encode_target(frame[encoder.target])))
    features, targets, at = np.empty((total, encoder.width), dtype=np.float32), [], 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=min(total, LOAD_BATCH_ROWS), columns=columns):
            frame = pa.Table.from_batches([batch.slice(0, total - at)]).to_pandas()
            encoder.encode_features(frame, out=features[at:at + len(frame)])
            targets.append(encoder.encode_target(frame[encoder.target]))
            at += len(frame)
            if at == total:
                return torch.from_numpy(features), torch.from_numpy(np.concatenate(targets))
    raise TrainingError(f"read {at} of the {total} rows the Parquet metadata of {files} promised")


def model_shape(encoder: Encoder | dict, kind: str, hidden: int, kwargs: dict | None = None) -> ModelShape:
    """The model that fits this encoding: its input width, outputs and target scale (`kind` a built-in kind or a
    pipeline's own model class, with its `kwargs`)."""
    if isinstance(encoder, dict):
        encoder = Encoder.from_dict(encoder)
    if encoder.task == "regression":
        return ModelShape(kind, encoder.width, 1, hidden, "regression", encoder.target_mean, encoder.target_std,
                          kwargs or {})
    return ModelShape(kind, encoder.width, len(encoder.classes), hidden, kwargs=kwargs or {})


def version_shape(encoder: Encoder | dict, params: dict[str, str]) -> ModelShape:
    """The shape of a registered version from its encoder and its MLflow run's params (strings): its own model
    class and kwargs where the run logged them (`model_class`, `model_kwargs`), else its `model_kind`."""
    import json

    kind = params.get("model_class") or params["model_kind"]
    return model_shape(encoder, kind, int(params["hidden_size"]), json.loads(params.get("model_kwargs") or "{}"))
