"""Entry points the benchmarks run as their own processes, so each one's peak memory is its own.

`python -m bench.probe shard-stage PARTS_DIR OUT_DIR SHARDS`, `... shard-baseline ...` (seconds of the work,
process and cluster start-up excluded) and `... plain-run DATA_ROOT ROWS CONF_JSON` (the whole pipeline as a
plain script); each prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

EVAL_FRACTION, SEED = 0.2, 42


def shard_stage(parts_dir: Path, out_dir: Path, shards: int) -> dict:
    """Lepton's shard stage on a 2-worker local Dask cluster (as the pipeline starts it)."""
    from bench.common import classification_spec
    from lepton_tasks.cluster import dask_client
    from lepton_tasks.config import Settings
    from lepton_tasks.shard import shard

    parts = sorted(str(p) for p in parts_dir.glob("*.parquet"))
    settings = Settings(out_dir.parent, None, None, 2)
    with dask_client(settings, 2) as client:
        started = time.perf_counter()
        manifest = shard(parts, out_dir, shards, EVAL_FRACTION, SEED, classification_spec(), client)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": sum(s.rows for s in manifest.shards) + manifest.eval.rows}


def shard_baseline(parts_dir: Path, out_dir: Path, shards: int) -> dict:
    """The hand-written version: pyarrow reads everything, numpy deals a seeded stratified split, pyarrow writes."""
    import pyarrow.parquet as pq

    started = time.perf_counter()
    table = pq.read_table(sorted(str(p) for p in parts_dir.glob("*.parquet")))
    labels = table.column("label").to_numpy()
    held_out = np.random.default_rng(SEED).random(len(labels)) < EVAL_FRACTION
    train = np.flatnonzero(~held_out)
    order = train[np.argsort(labels[train], kind="stable")]
    sorted_labels = labels[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    out_dir.mkdir(parents=True, exist_ok=True)
    for index in range(shards):
        pq.write_table(table.take(np.sort(order[rank % shards == index])), out_dir / f"shard-{index:03d}.parquet")
    pq.write_table(table.take(np.flatnonzero(held_out)), out_dir / "eval.parquet")
    return {"seconds": time.perf_counter() - started, "rows": len(labels)}


def plain_run(data_root: Path, rows: int, conf: dict) -> dict:
    """The whole pipeline as a plain script: the same `lepton_tasks.pipeline` functions the DAG's tasks call,
    one after the other in one process; seconds per stage (the shard and train stages start their Dask
    cluster, as under Airflow). LEPTON_DATA_ROOT and MLFLOW_TRACKING_URI come from the environment."""
    from bench.common import mnist_frame
    from lepton_tasks import pipeline
    from lepton_tasks.cluster import dask_client
    from lepton_tasks.specs import find_spec

    landing = data_root / "landing" / "mnist1d" / "mnist1d.parquet"
    if not landing.exists():
        landing.parent.mkdir(parents=True, exist_ok=True)
        mnist_frame(rows).to_parquet(landing, index=False)
    ctx = pipeline.context(find_spec("lepton_mnist1d"), f"plain_{rows}_{time.time_ns()}", conf)
    _, seconds = pipeline.run_in_process(ctx)
    started = time.perf_counter()
    with dask_client(ctx.settings, ctx.params.num_shards):
        pass
    return {"stages": seconds, "total": sum(seconds.values()), "dask_cluster_start_stop_s":
            time.perf_counter() - started, "rows": rows}


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "plain-run":
        print(json.dumps(plain_run(Path(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]))))
    else:
        parts_dir, out_dir, shards = sys.argv[2:5]
        commands = {"shard-stage": shard_stage, "shard-baseline": shard_baseline}
        print(json.dumps(commands[command](Path(parts_dir), Path(out_dir), int(shards))))
