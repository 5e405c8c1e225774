"""`object_store`: the working area on an S3-compatible store against the same work on local disk, interleaved.

The store is moto's standalone server on this machine (what the tests use; a real store is farther away and
faster per byte). Both sides read the same local source files; what differs is LEPTON_DATA_ROOT.
- `object_store_run`: every stage of a 1M-row run, as the DAG wires them (`pipeline.run_in_process`: one host,
  its copy of the working area kept between stages as one Airflow worker keeps it), wall seconds;
- `shard_on_store` and `train_on_store`: the stage on a host that holds nothing of the run (its copy removed
  before the clock): what it fetches (the validated parts, the shards) and commits (shards, checkpoints) is
  timed with it. The run's cluster is up before the clock, its workers' preload done, as a run's shard task finds
  it (the setup task starts it beside ingest).
- `shard_store_bound`: the most `shard_on_store` could reach on this machine, from two measurements: the shard
  stage's transfers alone (each worker fetches the validated part it shards and puts pieces the size of its shard
  files, nothing read, split or hashed between) and the whole stage on local disk. A stage on the store does both,
  so it takes at least the transfers' wall seconds, and at least the CPU-seconds of both (the store server's and
  the clients' included: all on this machine's cores) spread over every core.
"""

from __future__ import annotations

import os
import shutil
import time
from itertools import count
from pathlib import Path

from bench.common import Repeats, environ, interleaved, machine_cpu_seconds, record, write_mnist_parts

ROWS = 1_000_000
CONF = {"num_shards": 2, "merge_rounds": 2, "local_epochs": 1, "hidden_size": 32, "model_kind": "mlp"}
STORE_ROOT = "s3://lepton/work"  # tests.store's bucket
_fresh = count()


def _env(work: Path, on_store: bool, run: str) -> dict[str, str | None]:
    """The working area on the store or on local disk; a tracking DB of the run's own (no champion: no warm
    start, the same work every repeat)."""
    return {"LEPTON_DATA_ROOT": STORE_ROOT if on_store else str(work / "disk"), "LEPTON_SCRATCH": str(work / "scratch"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{work / f'{run}.db'}", "LEPTON_DASK_ADDRESS": None}


def _context(run: str, source: str = "unused"):
    from lepton_tasks.config.specs import find_spec
    from lepton_tasks.orchestration import pipeline

    return pipeline.context(find_spec("lepton_mnist1d"), run, {**CONF, "source_uri": source})


def _forget_local_copy(work: Path) -> None:
    """This host's copy of the store's runs gone: what follows starts as on a host that shares only the store."""
    shutil.rmtree(work / "scratch", ignore_errors=True)


def _whole_run(work: Path, source: Path, on_store: bool) -> tuple[float, dict]:
    from lepton_tasks.orchestration import pipeline

    run = f"run-{next(_fresh)}"
    with environ(**_env(work, on_store, run)):
        started = time.perf_counter()
        manifests, seconds = pipeline.run_in_process(_context(run, str(source)))
        total = time.perf_counter() - started
    _forget_local_copy(work)
    shutil.rmtree(work / "disk", ignore_errors=True)
    return total, {"stages": {k: round(v, 2) for k, v in seconds.items()},
                   "merged_sha256": manifests["merge"].merged_sha256}


def _base(work: Path, source: Path, on_store: bool) -> dict:
    """A run up to its shards, on the store or on disk: the manifests the measured stages start from."""
    from lepton_tasks.orchestration import pipeline

    run = f"base-{next(_fresh)}"
    with environ(**_env(work, on_store, run)):
        return pipeline.run_in_process(_context(run, str(source)), last="shard")[0]


def _stage_rows_per_s(work: Path, on_store: bool, base: dict, name: str, cluster: dict) -> tuple[float, dict]:
    """Rows/s of stage `name` in a fresh run folder (nothing to resume) from the base run's manifests, and its wall
    and machine CPU seconds."""
    from lepton_tasks.orchestration import pipeline

    if on_store:
        _forget_local_copy(work)
    run = f"{name}-{next(_fresh)}"
    with environ(**_env(work, on_store, run)):
        ctx = _context(run)
        cpu, started = machine_cpu_seconds(), time.perf_counter()
        pipeline.run_stage(ctx, name, base, lambda: cluster)
        return _rows_per_s(started, cpu)


def _rows_per_s(started: float, cpu: float) -> tuple[float, dict]:
    seconds = time.perf_counter() - started
    return ROWS / seconds, {"seconds": round(seconds, 3), "cpu_s": round(machine_cpu_seconds() - cpu, 3)}


def _transfer_rows_per_s(work: Path, base: dict, cluster: dict) -> tuple[float, dict]:
    """Rows/s (wall and CPU seconds) of the shard stage's transfers alone, on the run's workers as the stage runs
    them: each partition's part fetched (the first pass), then its pieces put (the second): the base run's shard
    files, fetched before the clock into a fresh run's uncommitted attempt."""
    from distributed import Client

    from lepton_tasks.core import store
    from lepton_tasks.core.storage import parquet_partitions

    _forget_local_copy(work)
    run = f"floor-{next(_fresh)}"
    with environ(**_env(work, True, run)):
        attempt = _context(run).stage_dir("shard").with_name(f".shard.tmp-{next(_fresh):08x}")
        shards = base["shard"]
        pieces: dict[str, list[str]] = {}
        for info in (shards.eval, *shards.shards):
            for made in map(Path, info.files):
                store.fetch(made)
                copy = attempt / made.parent.name / made.name
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(made, copy)
                pieces.setdefault(made.name, []).append(str(copy))
        partitions = parquet_partitions(base["validate"].parts)
        with Client(cluster["address"]) as client:
            cpu, started = machine_cpu_seconds(), time.perf_counter()
            client.gather(client.map(store.fetch, [Path(p.path) for p in partitions], pure=False))
            client.gather([client.submit(store.put, *map(Path, pieces[f"part-{index:05d}.parquet"]), pure=False)
                           for index in range(len(partitions))])
            return _rows_per_s(started, cpu)


def _store_bound(measured: Repeats) -> Repeats:
    """Per repeat, the shard stage's best rows/s on the store (at least the transfers' wall seconds, and at least
    the transfers' and the local stage's CPU-seconds over every core) beside the local stage's rows/s."""
    bound = Repeats(baselines=measured.baselines, details=measured.details)
    for detail in measured.details:
        transfers, local = detail["value"], detail["baseline"]
        seconds = max(transfers["seconds"], (transfers["cpu_s"] + local["cpu_s"]) / os.cpu_count())
        bound.values.append(ROWS / seconds)
    return bound


def object_store_bench(work: Path) -> tuple[dict, dict]:
    from lepton_tasks.tools.s3_server import S3Store

    store = S3Store.start(work)
    try:
        with environ(**store.environ()):
            _warm_up(work)
            return _benches(work)
    finally:
        store.stop()


def _warm_up(work: Path) -> None:
    """A small run on the store before the clock: this process's first imports (torch, GX, MLflow, the S3 client)
    and the local server's first requests are paid once, not by whichever side runs first."""
    source = Path(write_mnist_parts(work / "warm-up", 4000, rows_per_part=2000)[0]).parent
    _whole_run(work, source, True)
    shutil.rmtree(source, ignore_errors=True)


def _benches(work: Path) -> tuple[dict, dict]:
    from distributed import Client

    from lepton_tasks.config.settings import Settings
    from lepton_tasks.infra.cluster import start_run_cluster
    from lepton_tasks.orchestration import pipeline, worker_preload

    source = Path(write_mnist_parts(work / "source", ROWS)[0]).parent
    run = interleaved(lambda: _whole_run(work, source, True), lambda: _whole_run(work, source, False),
                      label="object_store_run")
    summaries = {"object_store_run": record(
        run, f"<= 1.3x the wall seconds of the same {ROWS:,}-row run with the working area on local disk (every "
        "stage in one process, as the DAG wires them; moto's S3 server on this machine)", "s", False,
        lambda r: r <= 1.3, rows=ROWS, params=CONF,
        bit_equal=len({d[side]["merged_sha256"] for d in run.details for side in d}) == 1)}
    detail = {"object_store_run": {"values": run.values, "baselines": run.baselines, "details": run.details}}
    bases = {True: _base(work, source, True), False: _base(work, source, False)}
    with environ(**_env(work, True, "cluster")):  # its workers' environment: the store's settings
        cluster = start_run_cluster(Settings.from_env(), work / "cluster", CONF["num_shards"])
    with Client(cluster["address"]) as client:  # as a run's stages find it: its workers' preload done
        assert all(client.run(worker_preload.preloaded, 120).values())
    try:
        for name in ("shard", "train"):
            measured = interleaved(lambda n=name: _stage_rows_per_s(work, True, bases[True], n, cluster),
                                   lambda n=name: _stage_rows_per_s(work, False, bases[False], n, cluster),
                                   label=f"{name}_on_store")
            summaries[f"{name}_on_store"] = record(
                measured, f">= 0.8x the rows/s of the {name} stage with the working area on local disk (on a host "
                "holding nothing of the run: its inputs fetched from the store, its outputs committed there, in the "
                "clock; the run's cluster up before it)", "rows/s", True, lambda r: r >= 0.8, rows=ROWS, params=CONF)
            detail[f"{name}_on_store"] = {"values": measured.values, "baselines": measured.baselines,
                                          "details": measured.details}
        parts = interleaved(lambda: _transfer_rows_per_s(work, bases[True], cluster),
                            lambda: _stage_rows_per_s(work, False, bases[False], "shard", cluster),
                            label="shard_store_bound")
        bound = _store_bound(parts)
        summaries["shard_store_bound"] = record(
            bound, "the best shard_on_store can be on this machine: at least the stage's transfers alone (the "
            "validated parts down, pieces the size of the shards up, on the run's workers) in wall seconds, and at "
            f"least theirs and the local stage's CPU-seconds over the {os.cpu_count()} cores; below 0.8, "
            "shard_on_store's goal is out of reach here whatever the stage does", "rows/s", True,
            lambda r: r >= 0.8, rows=ROWS, params=CONF)
        detail["shard_store_bound"] = {"values": bound.values, "baselines": bound.baselines, "details": parts.details}
    finally:
        pipeline.stop_cluster(cluster)
    return summaries, detail
