"""`make bench`: every stage against the best hand-written way to do the same work, measured in the same run.

Every benchmark interleaves value and baseline at least three times (`bench.common.interleaved`) and writes
`bench/results/summary.json` ({"machine", "benchmarks": {NAME: {"value", "baseline", "ratio" (median of the
per-repeat ratios), "repeats", "spread" [min, max], "goal", "unit", "higher_is_better", "met", ...}}}), one
detail file per benchmark group beside it, and PNG plots. Groups (`python -m bench.run GROUP...` runs some,
merged into an existing summary): shard, validate (validate, validate_vs_gx, validate_vs_gx_partitioned), train,
merge_vs_central, compression (compression_size, compression_latency, compression_latency_batch), scaffold_profile,
sql_ingest (sql_ingest, a PostgreSQL table's window against a hand-written COPY/pyarrow script; validate_in_database,
the validate stage on the extract against GX's SQL engine in the database; sql_ingest.json),
object_store (object_store_run, shard_on_store, train_on_store, shard_store_bound: the working area on moto's S3
server against local disk; object_store.json), scheduler (orchestration_overhead and whole_run_10m_memory, on one
Airflow; details in orchestration.json and whole_run_10m_memory.json), federated (merge strategies on non-IID,
poisoned and private shards: federated.json and federated.png, accuracies without a ratio) and flower
(flower_side_by_side, flower_side_by_side_fedprox: the same work run by Flower in .venv-flower; flower_parity_SPLIT
and federated_gap_closed: six strategies against Flower's own on two non-IID splits).
CPU figures here are not GPU claims; see the README for the GPU path.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import federated, object_store, profiling, stages, warehouse, whole_run
from bench.common import REPEATS, RESULTS, Repeats, record, shared_cluster, write_json
from bench.quality import merge_vs_central


def cpu_model() -> str | None:
    """The processor's model name from /proc/cpuinfo (Linux; None elsewhere): the figures depend on it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)


def machine() -> dict:
    import psutil

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu_model() or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def bench_merge(work) -> dict:
    from lepton_tasks.config.specs import find_spec

    loaded = find_spec("lepton_mnist1d")
    with shared_cluster():  # the seeds' runs are compared on accuracy, not time: one cluster start for all
        runs = [merge_vs_central(work, loaded, seed) for seed in range(42, 42 + REPEATS)]
    for run in runs:
        print(f"merge vs central, seed {run['seed']}: merged {run['merged']:.3f}, central {run['central']:.3f}",
              flush=True)
    # each accuracy is a count over the same fresh rows, so a gap is a whole number of rows: rounded to that, so
    # that a gap of exactly 1 point (20 of 2000 rows) is not 0.010000000000000009 in floating point
    gaps = [round(r["gap"] * r["fresh_rows"]) / r["fresh_rows"] for r in runs]
    write_json("merge_vs_central.json", {"runs": runs})
    summary = record(Repeats([r["merged"] for r in runs], [r["central"] for r in runs]),
                     "merged (shard, train, merge stages) within 1 point of central training, fresh samples",
                     "accuracy", True, lambda r: statistics.median(gaps) <= 0.01, gap=statistics.median(gaps),
                     gaps=gaps, seeds=[r["seed"] for r in runs], params=runs[0]["params"],
                     train_rows=runs[0]["train_rows"], fresh_rows=runs[0]["fresh_rows"])
    return {"merge_vs_central": summary}


def bench_shard(work) -> dict:
    summary, detail = stages.shard_bench(work)
    write_json("shard.json", detail)
    return {"shard": summary}


def bench_validate(work) -> dict:
    pandas, vs_gx, partitioned, detail = stages.validate_bench(work)
    write_json("validate.json", detail)
    return {"validate": pandas, "validate_vs_gx": vs_gx, "validate_vs_gx_partitioned": partitioned}


def bench_train(work) -> dict:
    summary, detail = stages.train_bench(work)
    write_json("train.json", detail)
    return {"train": summary}


def bench_compression(work) -> dict:
    size, latency, batch, detail = stages.compression_bench(work)
    write_json("compression.json", detail)
    return {"compression_size": size, "compression_latency": latency, "compression_latency_batch": batch}


def bench_profile(work) -> dict:
    summary, detail = profiling.profile_bench(work)
    write_json("scaffold_profile.json", detail)
    return {"scaffold_profile": summary}


def bench_sql_ingest(work) -> dict:
    summary, detail = warehouse.sql_ingest_bench(work)
    in_database, validate_detail = warehouse.validate_in_database_bench(work)
    write_json("sql_ingest.json", {**detail, "validate_in_database": validate_detail})
    return {"sql_ingest": summary, "validate_in_database": in_database}


def bench_object_store(work) -> dict:
    summaries, detail = object_store.object_store_bench(work)
    write_json("object_store.json", detail)
    return summaries


def bench_federated(work) -> dict:
    detail = federated.federated_bench(work)
    write_json("federated.json", detail)
    federated.plot(detail, RESULTS / "federated.png")
    for scenario, medians in detail["median_accuracy"].items():
        print(f"{scenario}: " + ", ".join(f"{name} {value:.3f}" for name, value in medians.items()), flush=True)
    return {}  # accuracies side by side, no ratio: federated.json and federated.png


def bench_flower(work) -> dict:
    summaries, detail = federated.flower_side_by_side(work)
    write_json("flower_side_by_side.json", detail)
    parity, parity_detail = federated.flower_parity(work)
    write_json("flower_parity.json", parity_detail)
    return {**summaries, **parity}


def bench_scheduler(work) -> dict:
    summaries = {}
    for group, (summary, detail) in whole_run.scheduler_bench(work).items():
        write_json(f"{group}.json", detail)
        summaries.update(summary)
    return summaries


BENCHES = {"shard": bench_shard, "validate": bench_validate, "train": bench_train, "compression": bench_compression,
           "merge_vs_central": bench_merge, "scaffold_profile": bench_profile, "sql_ingest": bench_sql_ingest,
           "object_store": bench_object_store, "scheduler": bench_scheduler,
           "federated": bench_federated, "flower": bench_flower}


def main(names: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary_path = RESULTS / "summary.json"
    summary = json.loads(summary_path.read_text()) if names and summary_path.exists() else {"benchmarks": {}}
    summary["machine"] = machine()
    for name in names or list(BENCHES):
        work = stages.scratch()
        started = time.perf_counter()
        try:
            result = BENCHES[name](work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        summary["benchmarks"].update(result)
        summary.setdefault("seconds", {})[name] = round(time.perf_counter() - started)
        print(f"== {name}: {time.perf_counter() - started:.0f}s", flush=True)
        write_json("summary.json", summary)
    for name, bench in summary["benchmarks"].items():
        low, high = bench["spread"]
        worst = "" if bench.get("worst_met", True) else f"; worst repeat {bench['worst']:.3g} short of the goal"
        print(f"{name:28} {'met' if bench['met'] else 'MISSED':6} ratio {bench['ratio']:.3g} [{low:.3g}, {high:.3g}] "
              f"x{bench['repeats']}: {bench['value']:.4g} vs {bench['baseline']:.4g} {bench['unit']} "
              f"(goal: {bench['goal']}{worst})")
    print(summary_path)


if __name__ == "__main__":
    main(sys.argv[1:])
