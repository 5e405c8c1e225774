"""`make bench`: every stage against the best hand-written baseline, measured in the same run on this machine.

Writes `bench/results/summary.json` ({"machine", "benchmarks": {NAME: {"value", "baseline", "ratio", "goal",
"unit", "higher_is_better", "met", ...}}}), one detail file per benchmark beside it, and PNG plots. Names:
shard, validate, train, orchestration_overhead, merge_vs_central, compression_size, compression_latency,
scale_10x, scale_100x, scaffold_profile. `python -m bench.run NAME...` runs a subset (merged into an existing summary).
CPU figures here are not GPU claims; see the README for the GPU path.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time

import torch

from bench import plots, profiling, stages, whole_run
from bench.common import RESULTS, mnist_frame, record, write_json
from bench.quality import merge_grid, merge_vs_central


def machine() -> dict:
    import psutil

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def bench_merge(work) -> dict:
    from lepton_tasks.demo_data import make_house_prices
    from lepton_tasks.specs import find_spec

    mnist = mnist_frame(5000)  # the package's 4000 train rows first, then its 1000 test rows
    loaded = find_spec("lepton_mnist1d")
    defaults = loaded.spec.run_defaults()
    headline = merge_vs_central(loaded, mnist, 4000, defaults)
    mlp = merge_vs_central(loaded, mnist, 4000, defaults.model_copy(update={"model_kind": "mlp", "hidden_size": 100}))
    houses = find_spec("lepton_house_prices")
    regression = merge_vs_central(houses, make_house_prices(6000, 42), 4800, houses.spec.run_defaults())
    grid = merge_grid(loaded, mnist, 4000, defaults.model_copy(update={"local_epochs": 2}))
    at_four = [p for p in grid if p["shards"] == 4]
    plots.merge_grid(grid, RESULTS / "merge_vs_central.png")
    write_json("merge_vs_central.json", {"cnn_defaults": headline, "mlp": mlp, "house_prices": regression,
                                         "grid_local_epochs_2": grid})
    return record(headline["value"], headline["baseline"], "merged within 1 point of central at 4 shards",
                  "accuracy", True, headline["gap"] <= 0.01,
                  gap=headline["gap"], shards=defaults.num_shards, rounds=defaults.merge_rounds,
                  local_epochs=defaults.local_epochs, grid_gap_at_4_shards={p["rounds"]: p["gap"] for p in at_four},
                  mlp_gap=mlp["gap"], house_prices_r2=(regression["value"], regression["baseline"]))


def bench_shard(work) -> dict:
    summary, detail = stages.shard_bench(work)
    write_json("shard.json", detail)
    plots.shard_memory(detail["curve"], RESULTS / "shard_memory.png")
    return summary


def bench_validate(work) -> dict:
    summary, detail = stages.validate_bench(work)
    write_json("validate.json", detail)
    return summary


def bench_train(work) -> dict:
    summary, detail = stages.train_bench(work)
    write_json("train.json", detail)
    plots.train_scaling(detail["scaling"], RESULTS / "train_scaling.png")
    return summary


def bench_compression(work) -> dict:
    size, latency, detail = stages.compression_bench(work)
    write_json("compression.json", detail)
    return {"compression_size": size, "compression_latency": latency}


def bench_orchestration(work) -> dict:
    summary, detail = whole_run.orchestration_bench(work)
    write_json("orchestration_overhead.json", detail)
    return summary


def bench_profile(work) -> dict:
    summary, detail = profiling.profile_bench(work)
    write_json("scaffold_profile.json", detail)
    return summary


def bench_scale(work) -> dict:
    ten, hundred, detail = whole_run.scale_bench(work)
    write_json("scale.json", detail)
    plots.scale(detail["curve"], RESULTS / "scale.png")
    return {"scale_10x": ten, "scale_100x": hundred}


BENCHES = {"shard": bench_shard, "validate": bench_validate, "train": bench_train,
           "orchestration_overhead": bench_orchestration, "merge_vs_central": bench_merge,
           "compression": bench_compression, "scale": bench_scale, "scaffold_profile": bench_profile}


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
        summary["benchmarks"].update(result if name in ("compression", "scale") else {name: result})
        print(f"== {name}: {time.perf_counter() - started:.0f}s", flush=True)
        write_json("summary.json", summary)
    for name, bench in summary["benchmarks"].items():
        print(f"{name:24} {'met' if bench['met'] else 'MISSED':6} value {bench['value']:.4g} vs baseline "
              f"{bench['baseline']:.4g} {bench['unit']} (goal: {bench['goal']})")
    print(summary_path)


if __name__ == "__main__":
    main(sys.argv[1:])
