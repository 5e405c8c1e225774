"""Entry points the benchmarks run as their own processes, so each one's peak memory and imports are its own.

`python -m bench.probe COMMAND ARGS...`, each printing one JSON line:
- `shard-stage PARTS_DIR OUT_DIR SHARDS`: Lepton's shard stage on a Dask cluster started beforehand, as the run's
  (its start reported apart, as is Airflow's import, which a task process has done already);
- `shard-baseline PARTS_DIR OUT_DIR SHARDS`: pyarrow read, a seeded stratified split, pyarrow write;
- `train-stage OUT_DIR EPOCHS SHARD_FILE...`: the train stage on a fresh 2-worker cluster, started beforehand (the
  run's cluster is up before train: the DAG's setup task starts it beside ingest, its workers' imports included);
- `train-script OUT_DIR EPOCHS SHARD_FILE...`: a plain PyTorch script doing the same work, one process per shard
  (`concurrent.futures`, the same threads per process as the stage's workers), its pool started and warm
  beforehand in the same way (torch imported, an optimizer built); both starts are reported, not timed;
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

EVAL_FRACTION, SEED = 0.2, 42


def shard_stage(parts_dir: Path, out_dir: Path, shards: int) -> dict:
    """Lepton's shard stage on a 2-worker local Dask cluster as a run's shard task finds it: up, its workers'
    preload finished (the setup task starts it beside ingest; at this size ingest, validate and drift take tens of
    seconds). The cluster's start, and its start with the preload, are reported beside the stage's seconds."""
    from bench.common import classification_spec
    from lepton_tasks.config.settings import Settings
    from lepton_tasks.infra.cluster import dask_client
    from lepton_tasks.orchestration import worker_preload
    from lepton_tasks.stages.shard import shard

    parts = sorted(str(p) for p in parts_dir.glob("*.parquet"))
    settings = Settings(out_dir.parent, None, None, 2)
    airflow_import_s = _load_airflow()
    starting = time.perf_counter()
    with dask_client(settings, 2) as client:
        cluster_start_s = time.perf_counter() - starting
        assert all(client.run(worker_preload.preloaded, 120).values())
        started = time.perf_counter()
        manifest = shard(parts, out_dir, shards, EVAL_FRACTION, SEED, classification_spec(), client)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "cluster_start_s": cluster_start_s, "cluster_ready_s": started - starting,
            "airflow_import_s": airflow_import_s, "rows": sum(s.rows for s in manifest.shards) + manifest.eval.rows}


def _load_airflow() -> float:
    """Seconds to import Airflow's task SDK, as the cluster's look-up of the `dask_default` connection does in a
    process without it. The process that runs the stage in a DAG, an Airflow task, has it loaded: the probe
    loads it before its clock starts and reports its seconds apart (1.2 s here: more than half the start of the
    cluster itself)."""
    from lepton_tasks.infra.connections import DASK_CONN_ID, airflow_connection

    started = time.perf_counter()
    airflow_connection(DASK_CONN_ID)
    return time.perf_counter() - started


def shard_baseline(parts_dir: Path, out_dir: Path, shards: int) -> dict:
    """The hand-written version: pyarrow reads everything, numpy deals a seeded stratified split, pyarrow writes."""
    import pyarrow.parquet as pq

    from bench.common import write_parquet

    started = time.perf_counter()
    table = pq.read_table(sorted(str(p) for p in parts_dir.glob("*.parquet")))
    labels = table.column("label").to_numpy()
    held_out = np.random.default_rng(SEED).random(len(labels)) < EVAL_FRACTION
    train = np.flatnonzero(~held_out)
    order = train[np.argsort(labels[train], kind="stable")]
    sorted_labels = labels[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    out_dir.mkdir(parents=True, exist_ok=True)
    for index in range(shards):  # written as the stage writes
        write_parquet(table.take(np.sort(order[rank % shards == index])), out_dir / f"shard-{index:03d}.parquet")
    write_parquet(table.take(np.flatnonzero(held_out)), out_dir / "eval.parquet")
    return {"seconds": time.perf_counter() - started, "rows": len(labels)}


def _mnist_setup(files: list[str], epochs: int):
    """The MNIST-1D spec's encoder (fitted on the first shard) and the run params both train probes use."""
    import pandas as pd

    from lepton_tasks.config.settings import RunParams
    from lepton_tasks.config.specs import find_spec
    from lepton_tasks.ml.features import fit, partition_stats

    spec = find_spec("lepton_mnist1d").spec
    encoder = fit(spec, partition_stats(pd.read_parquet(files[0]), spec))
    params = RunParams(source_uri="bench", local_epochs=epochs, merge_rounds=1, model_kind="cnn", hidden_size=64)
    return encoder, params


def train_stage(out_dir: Path, epochs: int, files: list[str]) -> dict:
    """The train stage over `files` (one shard each) on a fresh 2-worker cluster."""
    import pyarrow.parquet as pq

    from lepton_tasks.config.settings import Settings
    from lepton_tasks.core.storage import sha256_files
    from lepton_tasks.data.manifests import ShardInfo
    from lepton_tasks.infra.cluster import dask_client
    from lepton_tasks.ml.tensors import model_shape
    from lepton_tasks.stages.train import train

    encoder, params = _mnist_setup(files, epochs)
    shape = model_shape(encoder, params.model_kind, params.hidden_size)
    infos = [ShardInfo(f"shard-{i:03d}", [f], pq.ParquetFile(f).metadata.num_rows, {}, sha256_files([f]))
             for i, f in enumerate(files)]
    from lepton_tasks.orchestration import worker_preload

    starting = time.perf_counter()
    with dask_client(Settings(out_dir, None, None, 2), len(files)) as client:
        # the workers' imports (their preload thread) end before train, as during a run's stages before it
        assert all(client.run(worker_preload.preloaded, 120).values())
        started = time.perf_counter()
        manifest = train(infos, encoder.to_dict(), shape, params, out_dir, client)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "start_s": started - starting,
            "epoch_s": [sum(e["seconds"] for e in c["epochs"]) for c in manifest.final_round]}


def _train_one_shard(path: str, out_file: str, feature_columns: list[str], target: str, shape, params,
                     epochs: int, threads: int) -> int:
    """One process's work in the script: read the shard, train the same model from the same seeded initialisation
    with Adam for `epochs`, save a safetensors checkpoint; its pid."""
    import os

    import pandas as pd
    import torch
    from safetensors.torch import save_file

    from lepton_tasks.ml.models import build_model

    torch.set_num_threads(threads)
    frame = pd.read_parquet(path)
    x = torch.from_numpy(frame[feature_columns].to_numpy(np.float32, copy=True))
    y = torch.from_numpy(frame[target].to_numpy(np.int64))
    torch.manual_seed(params.seed)
    model = build_model(shape).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=params.learning_rate)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(params.batch_size):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_file)
    return os.getpid()


def _warm_process(threads: int) -> None:
    """A pool process's start: what a stage worker does as it starts (`lepton_tasks.orchestration.worker_preload`)."""
    import torch

    torch.set_num_threads(threads)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def _pid_after(seconds: float) -> int:
    import os

    time.sleep(seconds)
    return os.getpid()


def train_script(out_dir: Path, epochs: int, files: list[str]) -> dict:
    """What a person with N cores and N shards would write: one process per shard (a `ProcessPoolExecutor`), each
    training its shard with the threads a stage worker has (`Settings.train_threads`). The pool is started and
    warm before the clock, as the stage's cluster is."""
    from concurrent.futures import ProcessPoolExecutor

    import torch  # noqa: F401  (before the fork: the pool's processes share it)

    from lepton_tasks.config.settings import Settings
    from lepton_tasks.ml.tensors import model_shape

    encoder, params = _mnist_setup(files, epochs)
    threads = Settings.from_env().train_threads
    shape = model_shape(encoder, params.model_kind, params.hidden_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(path, str(out_dir / f"shard-{index}.st"), [c.name for c in encoder.columns], encoder.target, shape,
             params, epochs, threads) for index, path in enumerate(files)]
    starting = time.perf_counter()
    with ProcessPoolExecutor(max_workers=len(files), initializer=_warm_process, initargs=(threads,)) as pool:
        warm = set(pool.map(_pid_after, [0.5] * len(files)))  # every process started and warm
        started = time.perf_counter()
        pids = set(pool.map(_train_one_shard, *zip(*jobs, strict=True)))
        seconds = time.perf_counter() - started
    assert len(warm) == len(files) and pids <= warm, "one process per shard"
    return {"seconds": seconds, "start_s": started - starting, "threads_per_process": threads,
            "processes": len(pids)}


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command in ("train-stage", "train-script"):
        run = train_stage if command == "train-stage" else train_script
        result = run(Path(args[0]), int(args[1]), args[2:])
    else:
        run = {"shard-stage": shard_stage, "shard-baseline": shard_baseline}[command]
        result = run(Path(args[0]), Path(args[1]), int(args[2]))
    print(json.dumps(result))
