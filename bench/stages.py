"""Per-stage benchmarks, each against the baseline a user would write by hand, measured in the same run."""

from __future__ import annotations

import importlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import mnist_frame, record, run_measured, write_classification_parts

SHARD_ROWS = (1_000_000, 3_000_000, 10_000_000)
SHARDS = 4


def shard_bench(work: Path, sizes=SHARD_ROWS) -> tuple[dict, dict]:
    """Rows/s and peak RSS of the shard stage vs pyarrow read + stratified split + write, as rows grow."""
    curve = []
    for rows in sizes:
        parts_dir = work / f"shard-in-{rows}"
        write_classification_parts(parts_dir, rows, parts=max(1, rows // 500_000))
        ours, ours_rss = run_measured(["shard-stage", str(parts_dir), str(work / f"shard-out-{rows}"), str(SHARDS)])
        base, base_rss = run_measured(["shard-baseline", str(parts_dir), str(work / f"shard-base-{rows}"),
                                       str(SHARDS)])
        input_bytes = sum(p.stat().st_size for p in parts_dir.glob("*.parquet"))
        curve.append({"rows": rows, "input_bytes": input_bytes, "stage_s": ours["seconds"],
                      "baseline_s": base["seconds"], "stage_rows_per_s": rows / ours["seconds"],
                      "baseline_rows_per_s": rows / base["seconds"], "stage_peak_rss": ours_rss,
                      "baseline_peak_rss": base_rss})
        print(f"shard {rows:>10} rows: stage {ours['seconds']:.1f}s {ours_rss / 2**20:.0f} MiB, "
              f"pyarrow {base['seconds']:.1f}s {base_rss / 2**20:.0f} MiB", flush=True)
        for folder in ("shard-in", "shard-out", "shard-base"):
            shutil.rmtree(work / f"{folder}-{rows}", ignore_errors=True)
    top = curve[-1]
    ratio = top["stage_rows_per_s"] / top["baseline_rows_per_s"]
    rss_growth = curve[-1]["stage_peak_rss"] / curve[0]["stage_peak_rss"]
    summary = record(top["stage_rows_per_s"], top["baseline_rows_per_s"],
                     f">= 0.8x pyarrow rows/s at {top['rows']:,} rows, memory bounded", "rows/s", True,
                     ratio >= 0.8, rows=top["rows"], stage_peak_rss=top["stage_peak_rss"],
                     baseline_peak_rss=top["baseline_peak_rss"],
                     stage_rss_growth=rss_growth, rows_growth=curve[-1]["rows"] / curve[0]["rows"])
    return summary, {"curve": curve, "shards": SHARDS, "workers": 2}


def _pandas_checks(frame, suite: dict) -> dict[str, int]:
    """The suite's expectations in plain pandas: unexpected count per expectation."""
    failures = {}
    for index, expectation in enumerate(suite["expectations"]):
        kind, kw = expectation["type"], expectation["kwargs"]
        column = frame[kw["column"]] if "column" in kw else None
        if kind == "expect_table_columns_to_match_ordered_list":
            bad = int(list(frame.columns) != kw["column_list"])
        elif kind == "expect_table_row_count_to_be_between":
            bad = int(not (kw.get("min_value") or 0) <= len(frame) <= (kw.get("max_value") or len(frame)))
        elif kind == "expect_column_values_to_not_be_null":
            bad = int(column.isna().sum())
        elif kind == "expect_column_values_to_be_in_type_list":
            bad = int(str(column.dtype) not in kw["type_list"])
        elif kind == "expect_column_values_to_be_between":
            values = column.dropna()
            bad = int(((values < kw["min_value"]) | (values > kw["max_value"])).sum())
        elif kind == "expect_column_values_to_be_in_set":
            bad = int((~column.dropna().isin(kw["value_set"])).sum())
        else:
            raise ValueError(f"no pandas baseline for {kind}")
        failures[f"{index}:{kind}"] = bad
    return failures


VALIDATE_ROWS = (1_000_000, 4_000_000)


def _timed(fn, *args, **kwargs) -> tuple[object, float]:
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - started


def _mnist_parts(folder: Path, rows: int, rows_per_part: int = 500_000) -> list[str]:
    """MNIST-1D rows as Parquet parts of at most `rows_per_part` rows (at least two)."""
    folder.mkdir(parents=True)
    frame, parts = mnist_frame(rows), []
    for index, chunk in enumerate(np.array_split(np.arange(rows), max(2, rows // rows_per_part))):
        parts.append(str(folder / f"part-{index:05d}.parquet"))
        frame.iloc[chunk].to_parquet(parts[-1], index=False)
    return parts


def _pandas_on_parts(parts: list[str], suite: dict) -> dict[str, int]:
    import pandas as pd

    return _pandas_checks(pd.concat(map(pd.read_parquet, parts), ignore_index=True), suite)


def validate_bench(work: Path, sizes=VALIDATE_ROWS) -> tuple[dict, dict]:
    """Rows/s of the GX stage (suite, result JSON, data docs) vs the same checks in plain pandas, both reading the
    same Parquet parts: in memory (the pipeline's way up to LEPTON_VALIDATE_MEMORY_BYTES) and partition by
    partition on a 2-worker Dask cluster (started before the clock, as in the shard benchmark), at two sizes.
    GX's import (once per task process) is timed apart; the marginal rate (the slope between the two sizes)
    shows what is per row and what is fixed per run."""
    import json

    from lepton_tasks.cluster import dask_client
    from lepton_tasks.config import EXPECTATIONS_DIR, Settings
    from lepton_tasks.validate import validate

    suite_file = EXPECTATIONS_DIR / "mnist1d.json"
    suite = json.loads(suite_file.read_text())
    _, import_s = _timed(importlib.import_module, "great_expectations")  # once per task process
    validate_warm = work / "validate-warm.parquet"
    mnist_frame(1000).to_parquet(validate_warm, index=False)
    validate([str(validate_warm)], suite_file, work / "validate-warm")  # first-call set-up, as import is
    curve = []
    with dask_client(Settings(work, None, None, 2), 2) as client:
        _, worker_import_s = _timed(client.run, importlib.import_module, "great_expectations")
        validate([str(validate_warm)] * 2, suite_file, work / "validate-warm-dask", client=client)
        for rows in sizes:
            parts = _mnist_parts(work / f"validate-in-{rows}", rows)
            memory, memory_s = _timed(validate, parts, suite_file, work / f"validate-mem-{rows}")
            dask, dask_s = _timed(validate, parts, suite_file, work / f"validate-dask-{rows}", client=client)
            checks = [_timed(_pandas_on_parts, parts, suite) for _ in "ab"]
            failures, baseline_s = min(checks, key=lambda c: c[1])  # the better of two: it is short and noisy
            assert memory.failed == dask.failed == 0 and not any(failures.values()), "benchmark data must pass"
            curve.append({"rows": rows, "in_memory_s": memory_s, "dask_s": dask_s, "pandas_s": baseline_s,
                          "dask_partitions": dask.partitions, "expectations": memory.evaluated})
            print(f"validate {rows:>9} rows: in memory {memory_s:.1f}s, Dask {dask_s:.1f}s "
                  f"({dask.partitions} partitions), pandas {baseline_s:.2f}s", flush=True)
            shutil.rmtree(work / f"validate-in-{rows}")
    first, last = curve[0], curve[-1]
    added = last["rows"] - first["rows"]
    marginal = {way: added / (last[f"{way}_s"] - first[f"{way}_s"]) for way in ("in_memory", "dask", "pandas")}
    ratio = first["pandas_s"] / first["in_memory_s"]  # the pipeline's way at this size
    summary = record(first["rows"] / first["in_memory_s"], first["rows"] / first["pandas_s"],
                     ">= 0.5x the rows/s of the same checks in pandas", "rows/s", True, ratio >= 0.5,
                     rows=first["rows"], way="in memory", expectations=first["expectations"],
                     stage_s=first["in_memory_s"], dask_s=first["dask_s"], worker_gx_import_s=worker_import_s,
                     baseline_s=first["pandas_s"], gx_import_s=import_s,
                     marginal_rows_per_s=marginal, marginal_ratio_in_memory=marginal["in_memory"] / marginal["pandas"],
                     marginal_ratio_dask=marginal["dask"] / marginal["pandas"])
    return summary, {"curve": curve, "gx_import_s": import_s, "worker_gx_import_s": worker_import_s,
                     "marginal_rows_per_s": marginal, "workers": 2,
                     "suite": suite_file.name}


def _bare_loop(shape, state, x, y, epochs: int, batch_size: int, lr: float, seed: int) -> float:
    """A single-process PyTorch loop on in-memory tensors: seconds for `epochs` epochs."""
    from lepton_tasks.models import load_model, loss_fn

    model = load_model(shape, state).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(batch_size):
            loss = loss_fn(shape, model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def train_bench(work: Path, rows: int = 20_000, epochs: int = 3) -> tuple[dict, dict]:
    """One shard trained by the train stage on a Dask worker vs a bare loop (CPU, 1 thread each), then the
    train stage's wall time for N shards on 2 workers against N x one shard."""
    from lepton_tasks.cluster import dask_client
    from lepton_tasks.config import RunParams, Settings
    from lepton_tasks.models import init_weights, save_checkpoint
    from lepton_tasks.storage import sha256_files
    from lepton_tasks.train import load_xy, model_shape, train

    frame = mnist_frame(rows * 4)
    files, encoder = _mnist_shards(work, frame, 4)
    shape = model_shape(encoder, "cnn", 64)
    params = RunParams(source_uri="bench", local_epochs=epochs, merge_rounds=1, model_kind="cnn", hidden_size=64)
    init = init_weights(shape, params.seed)
    torch.set_num_threads(1)
    x, y = load_xy([files[0]], encoder)
    baseline_s = min(_bare_loop(shape, init, x, y, epochs, params.batch_size, params.learning_rate, 1)
                     for _ in range(2))  # the better of two: this machine's timings wander by ~20%
    save_checkpoint(work / "init.safetensors", init, {})
    scaling = []
    for shards in (1, 2, 4):
        infos = [{"name": f"shard-{i:03d}", "files": [files[i]], "rows": rows, "sha256": sha256_files([files[i]])}
                 for i in range(shards)]
        with dask_client(Settings(work, None, None, min(shards, 2)), shards) as client:
            started = time.perf_counter()
            manifest = train(infos, encoder, shape, params, work / f"train-{shards}", client)
            wall = time.perf_counter() - started
        epoch_s = [sum(e["seconds"] for e in c["epochs"]) for c in manifest.final_round]
        scaling.append({"shards": shards, "workers": min(shards, 2), "wall_s": wall, "epoch_s": epoch_s})
        print(f"train {shards} shard(s) on {min(shards, 2)} worker(s): {wall:.1f}s", flush=True)
    one = scaling[0]
    worker_rate = rows * epochs / sum(one["epoch_s"])
    baseline_rate = rows * epochs / baseline_s
    for point in scaling:
        point["vs_n_times_one"] = point["wall_s"] / (point["shards"] * one["wall_s"])
    summary = record(worker_rate, baseline_rate, ">= 0.9x the samples/s of a bare PyTorch loop (CPU)",
                     "samples/s", True, worker_rate / baseline_rate >= 0.9, device="cpu", rows=rows,
                     epochs=epochs, stage_wall_s_one_shard=one["wall_s"],
                     samples_per_s_incl_load_and_save=rows * epochs / one["wall_s"])
    return summary, {"rows_per_shard": rows, "epochs": epochs, "model": "cnn-64", "baseline_s": baseline_s,
                     "scaling": scaling}


def _mnist_shards(work: Path, frame, count: int) -> tuple[list[str], dict]:
    from lepton_tasks.features import fit, partition_stats
    from lepton_tasks.specs import find_spec

    spec = find_spec("lepton_mnist1d").spec
    encoder = fit(spec, partition_stats(frame, spec)).to_dict()
    files = []
    for index, part in enumerate(np.array_split(np.arange(len(frame)), count)):
        path = work / f"train-in-{index}.parquet"
        frame.iloc[part].to_parquet(path, index=False)
        files.append(str(path))
    return files, encoder


def compression_bench(work: Path) -> tuple[dict, dict, dict]:
    """The compress stage on the default CNN (trained on MNIST-1D's 4000 training rows): the chosen variant's
    size and CPU latency against the fp32 PyTorch model."""
    from bench.quality import train_central
    from lepton_tasks.compress import compress
    from lepton_tasks.demo_data import mnist1d_frame
    from lepton_tasks.models import save_checkpoint
    from lepton_tasks.specs import find_spec

    frame = mnist1d_frame(5000, 42)  # the package's 4000 train rows first, then its 1000 test rows
    loaded = find_spec("lepton_mnist1d")
    params = loaded.spec.run_defaults()
    shape, state, (xt, yt), calibration = train_central(loaded, frame, 4000, params, epochs=10)
    merged = work / "merged.safetensors"
    sha = save_checkpoint(merged, state, {})
    manifest = compress(merged, sha, shape, (xt, yt), work / "compress", "accuracy", params.compression_tolerance,
                        params.prune_sparsity, calibration[:1024].numpy())
    chosen = next(v for v in manifest.variants if v.name == manifest.chosen)
    ref = manifest.reference
    size = record(chosen.bytes, ref.bytes, "<= 1/3.5 of the fp32 PyTorch model's bytes (3.5x smaller)", "bytes",
                  False, ref.bytes / chosen.bytes >= 3.5, chosen=chosen.name, times_smaller=ref.bytes / chosen.bytes,
                  accuracy_drop=ref.score - chosen.score, tolerance=manifest.tolerance)
    latency = record(chosen.latency_p50_ms, ref.latency_p50_ms, ">= 2x faster (p50) than fp32 PyTorch, CPU",
                     "ms p50", False, ref.latency_p50_ms / chosen.latency_p50_ms >= 2, chosen=chosen.name,
                     p99_ms=chosen.latency_p99_ms, fp32_p99_ms=ref.latency_p99_ms,
                     speedup_p50=ref.latency_p50_ms / chosen.latency_p50_ms,
                     speedup_p99=ref.latency_p99_ms / chosen.latency_p99_ms)
    detail = {"reference": vars(ref), "variants": [vars(v) for v in manifest.variants], "chosen": manifest.chosen}
    return size, latency, detail


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="lepton-bench-"))
