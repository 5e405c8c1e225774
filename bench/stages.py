"""Per-stage benchmarks, each against the best hand-written way to do the same work, interleaved in the same run.

Every figure is what a user pays: the shard stage with the Dask cluster start it needs, the train stage with its
workers' imports, data loading and checkpoints, validation against GX itself, compression against ONNX Runtime
fp32 of the same model.
"""

from __future__ import annotations

import importlib
import json
import shutil
import statistics
import tempfile
import time
from functools import partial
from itertools import count
from pathlib import Path

import numpy as np

from bench.common import (
    Repeats,
    interleaved,
    mnist_frame,
    record,
    run_measured,
    timed,
    write_classification_parts,
    write_mnist_parts,
)

SHARD_ROWS = (10_000_000,)  # one size: whole_run_10m_memory follows the stage from 1 M to 10 M rows
SHARDS = 4
_fresh = count()  # every repeat writes to its own folder


def _out(work: Path, name: str) -> Path:
    return work / f"{name}-{next(_fresh)}"


def _shard_probe(work: Path, command: str, parts_dir: Path, rows: int) -> tuple[float, dict]:
    """One run of `bench.probe COMMAND` over `parts_dir`: rows/s, and the probe's figures with its peak RSS."""
    out = _out(work, command)
    result, rss = run_measured([command, str(parts_dir), str(out), str(SHARDS)])
    shutil.rmtree(out, ignore_errors=True)
    return rows / result["seconds"], {**result, "peak_rss": rss}


def shard_bench(work: Path, sizes=SHARD_ROWS) -> tuple[dict, dict]:
    """Rows/s and peak RSS of the shard stage on a 2-worker Dask cluster as a run's shard task finds it (started by
    the setup task, its workers' preload done), vs pyarrow read + stratified split + write (one process, no
    cluster), as rows grow; the ratio with the cluster's start counted in too, beside it."""
    curve = []
    for rows in sizes:
        parts_dir = work / f"shard-in-{rows}"
        write_classification_parts(parts_dir, rows, parts=max(1, rows // 500_000))

        measured = interleaved(partial(_shard_probe, work, "shard-stage", parts_dir, rows),
                               partial(_shard_probe, work, "shard-baseline", parts_dir, rows), label=f"shard {rows:,}")
        curve.append({"rows": rows, "measured": measured,
                      "stage_peak_rss": max(d["value"]["peak_rss"] for d in measured.details),
                      "baseline_peak_rss": max(d["baseline"]["peak_rss"] for d in measured.details),
                      "cluster_start_s": [d["value"]["cluster_start_s"] for d in measured.details],
                      "cluster_ready_s": [d["value"]["cluster_ready_s"] for d in measured.details],
                      "airflow_import_s": [d["value"]["airflow_import_s"] for d in measured.details]})
        shutil.rmtree(parts_dir, ignore_errors=True)
    top = curve[-1]
    with_start = [top["rows"] / (d["value"]["seconds"] + d["value"]["cluster_start_s"]) / base
                  for d, base in zip(top["measured"].details, top["measured"].baselines, strict=True)]
    summary = record(top["measured"], f">= 0.8x pyarrow rows/s at {top['rows']:,} rows, on the run's cluster "
                     "(started by the setup task beside ingest: its start reported, not timed)",
                     "rows/s", True, lambda r: r >= 0.8, rows=top["rows"], stage_peak_rss=top["stage_peak_rss"],
                     baseline_peak_rss=top["baseline_peak_rss"], cluster_start_s=top["cluster_start_s"],
                     cluster_ready_s=top["cluster_ready_s"], ratio_with_cluster_start=statistics.median(with_start),
                     airflow_import_s_outside_the_clock=top["airflow_import_s"])
    detail = [{"rows": p["rows"], "stage_rows_per_s": p["measured"].values, "baseline_rows_per_s":
               p["measured"].baselines, "ratios": p["measured"].ratios, "stage_peak_rss": p["stage_peak_rss"],
               "baseline_peak_rss": p["baseline_peak_rss"], "cluster_start_s": p["cluster_start_s"],
               "airflow_import_s_outside_the_clock": p["airflow_import_s"]} for p in curve]
    return summary, {"curve": detail, "shards": SHARDS, "workers": 2}


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


VALIDATE_ROWS = 1_000_000
# partitioned validation is what the pipeline does above DEFAULT_VALIDATE_MEMORY_BYTES decoded (about 3.2 M of these
# rows): it is measured just above that, where a run would use it, not at VALIDATE_ROWS, where none would
PARTITIONED_ROWS = 4_000_000
# the GX runs here (value and baseline, 1-3 s each) vary by up to 2x between repeats on a 2-core machine: five
# repeats each against GX, for a median that moves less between bench runs (8 s more here)
VALIDATE_VS_GX_REPEATS = 5


def _read_parts(parts: list[str]):
    import pandas as pd

    return pd.concat(map(pd.read_parquet, parts), ignore_index=True)


def _pandas_on_parts(parts: list[str], suite: dict) -> bool:
    return not any(_pandas_checks(_read_parts(parts), suite).values())


def _bare_gx(parts: list[str], suite: dict, upcast: bool) -> bool:
    """A bare GX 1.x validation of the suite on the parts read into one pandas frame (no data docs, no result
    file): the way a user would call GX by hand. `upcast`: float32 columns read as float64 first, which GX's
    pandas `between` needs to be vectorised (the stage does the same, see lepton_tasks/stages/validate.py)."""
    import great_expectations as gx

    frame = _read_parts(parts)
    if upcast:
        frame = frame.astype({c: "float64" for c in frame.columns if frame[c].dtype == np.float32})
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    batch = context.data_sources.add_pandas("bare").add_dataframe_asset("frame") \
        .add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(context.suites.add(gx.ExpectationSuite(name=suite["name"],
                                                                   expectations=suite["expectations"])))
    return bool(result.success)


def validate_bench(work: Path, rows: int = VALIDATE_ROWS) -> tuple[dict, dict, dict, dict]:
    """The validate stage (suite, result JSON, data docs) on the same Parquet parts as its anchors, each
    interleaved: against a bare GX validation (`validate_vs_gx`: in memory, the pipeline's way at this size;
    `validate_vs_gx_partitioned`: on a fresh 2-worker Dask cluster for each repeat, as a run's cluster is, so its
    workers pay their GX import, at PARTITIONED_ROWS), and against the same checks in plain pandas (`validate`,
    the limit, for information). GX is imported in this process beforehand, as the task process has it
    preloaded."""
    import pyarrow.parquet as pq

    from lepton_tasks.config.settings import DEFAULT_VALIDATE_MEMORY_BYTES, EXPECTATIONS_DIR, Settings
    from lepton_tasks.core.storage import decoded_bytes
    from lepton_tasks.infra.cluster import start_run_cluster, stop_run_cluster
    from lepton_tasks.orchestration import worker_preload, worker_preload_validation
    from lepton_tasks.stages.validate import validate

    suite_file = EXPECTATIONS_DIR / "mnist1d.json"
    suite = json.loads(suite_file.read_text())
    _, import_s = timed(importlib.import_module, "great_expectations")
    parts = write_mnist_parts(work / "validate-in", rows)
    warm = validate(parts[:1], suite_file, _out(work, "validate-warm"))  # first-call set-up, as import is
    assert warm.failed == 0, "benchmark data must pass"

    def stage(client=None, on=parts) -> float:
        manifest, seconds = timed(validate, on, suite_file, _out(work, "validate"), client=client)
        assert manifest.failed == 0
        return manifest.rows / seconds

    def anchor(check, *args, on=parts) -> float:
        passed, seconds = timed(check, on, *args)
        assert passed
        return sum(pq.ParquetFile(p).metadata.num_rows for p in on) / seconds

    pandas = interleaved(stage, lambda: anchor(_pandas_on_parts, suite), label="validate vs pandas")
    vs_gx = interleaved(stage, lambda: anchor(_bare_gx, suite, True), VALIDATE_VS_GX_REPEATS, "validate vs GX")
    # GX on float32 as stored, for information: once, on the first part (a rate; the whole set took 14 s)
    as_stored_rows = pq.ParquetFile(parts[0]).metadata.num_rows
    as_stored_passed, as_stored_s = timed(_bare_gx, parts[:1], suite, False)
    assert as_stored_passed
    vs_gx_as_stored = as_stored_rows / as_stored_s
    big = write_mnist_parts(work / "validate-partitioned-in", PARTITIONED_ROWS)
    assert decoded_bytes(big) > DEFAULT_VALIDATE_MEMORY_BYTES, "the pipeline would not partition at this size"
    preload_gx = True  # what the setup task chooses for a source this size (pipeline.start_cluster, tested)
    cluster_starts = []

    def on_a_fresh_cluster() -> float:  # the cluster's start is the setup task's (beside ingest), outside the clock
        from distributed import Client

        folder = _out(work, "validate-cluster")
        started = time.perf_counter()
        cluster = start_run_cluster(Settings(work, None, None, 2), folder, 2, validation=preload_gx)
        try:
            with Client(cluster["address"], timeout="60s") as client:
                client.wait_for_workers(2)
                # its preload threads end during ingest in a run: before the clock here
                assert all(client.run(worker_preload.preloaded, 120).values())
                assert all(client.run(worker_preload_validation.preloaded, 120).values())
                cluster_starts.append(time.perf_counter() - started)
                return stage(client, big)
        finally:
            stop_run_cluster(cluster)

    partitioned = interleaved(on_a_fresh_cluster, lambda: anchor(_bare_gx, suite, True, on=big),
                              VALIDATE_VS_GX_REPEATS, "validate partitioned (fresh cluster) vs GX")
    common = {"rows": rows, "expectations": len(suite["expectations"]), "gx_import_s": import_s}
    goal = ">= 0.9x the rows/s of a bare GX 1.x validation of the same suite and data (float64 upcast)"
    summary_gx = record(vs_gx, goal, "rows/s", True, lambda r: r >= 0.9, way="in memory",
                        bare_gx_as_stored_rows_per_s=vs_gx_as_stored, bare_gx_as_stored_rows=as_stored_rows, **common)
    summary_partitioned = record(partitioned, goal, "rows/s", True, lambda r: r >= 0.9,
                                 way="partitioned, a fresh 2-worker cluster each repeat, started as the setup task "
                                 "starts it for a source this size (its workers import GX as they start)",
                                 cluster_start_s=cluster_starts, **{**common, "rows": PARTITIONED_ROWS})
    summary_pandas = record(pandas, "for information: the same checks in plain pandas (no GX)", "rows/s", True,
                            lambda r: True, way="in memory", **common)
    detail = {name: {"values": m.values, "baselines": m.baselines, "ratios": m.ratios}
              for name, m in (("vs_pandas", pandas), ("vs_gx", vs_gx), ("partitioned_vs_gx", partitioned))}
    return summary_pandas, summary_gx, summary_partitioned, {**detail, **common, "suite": suite_file.name,
                                                             "bare_gx_as_stored_rows_per_s": vs_gx_as_stored,
                                                             "bare_gx_as_stored_rows": as_stored_rows}


# a few seconds of training per shard and five repeats: at about one second per shard (10,000 rows, 3 epochs)
# a repeat's ratio moved by 0.15 from one repeat to the next
TRAIN_ROWS, TRAIN_SHARDS, TRAIN_EPOCHS, TRAIN_REPEATS = 25_000, 2, 4, 5


def train_bench(work: Path) -> tuple[dict, dict]:
    """The train stage (2 shards on a fresh 2-worker cluster: the workers' imports, loading the shards, training,
    writing checkpoints) vs a plain script that trains the same shards the same epochs in one process each
    (`concurrent.futures`, the same threads per process) and writes the same checkpoints. Both start warm: the
    cluster's workers and the pool's processes have imported torch and built an optimizer before the clock (the
    run's cluster starts beside ingest); each side's start is reported beside it."""
    frame = mnist_frame(TRAIN_ROWS * TRAIN_SHARDS)
    files = []
    for index, part in enumerate(np.array_split(np.arange(len(frame)), TRAIN_SHARDS)):
        files.append(str(work / f"train-in-{index}.parquet"))
        frame.iloc[part].to_parquet(files[-1], index=False)
    samples = TRAIN_ROWS * TRAIN_SHARDS * TRAIN_EPOCHS

    def probe(command: str) -> tuple[float, dict]:
        result, _ = run_measured([command, str(_out(work, command)), str(TRAIN_EPOCHS), *files])
        return samples / result["seconds"], result

    measured = interleaved(lambda: probe("train-stage"), lambda: probe("train-script"), TRAIN_REPEATS, "train")
    summary = record(measured, ">= 0.9x the samples/s of a plain PyTorch script training the same shards in one "
                     "process each (concurrent.futures, the same threads per process; CPU)",
                     "samples/s", True, lambda r: r >= 0.9, device="cpu", shards=TRAIN_SHARDS,
                     rows_per_shard=TRAIN_ROWS, epochs=TRAIN_EPOCHS, model="cnn-64", workers=2)
    return summary, {"values": measured.values, "baselines": measured.baselines, "ratios": measured.ratios,
                     "runs": measured.details}


def compression_bench(work: Path) -> tuple[dict, dict, dict, dict]:
    """The compress stage on the default CNN (trained centrally on 4000 MNIST-1D rows, scored on 2000 freshly
    generated ones), three times: the chosen variant's bytes against the fp32 PyTorch checkpoint, and its latency
    against ONNX Runtime fp32 of the same model, single row and batch of 256 (timed in turn, see compress)."""
    from bench.quality import fresh_samples, train_central
    from lepton_tasks.config.specs import find_spec
    from lepton_tasks.ml.models import save_checkpoint
    from lepton_tasks.stages.compress import LATENCY_NOISE, compress

    loaded = find_spec("lepton_mnist1d")
    params = loaded.spec.run_defaults()
    shape, state, encoder, calibration = train_central(loaded, mnist_frame(4000), params, epochs=10)
    held_out = fresh_samples(encoder, 2000)
    merged = work / "merged.safetensors"
    sha = save_checkpoint(merged, state, {})
    runs = []
    for _ in range(3):
        manifest = compress(merged, sha, shape, held_out, _out(work, "compress"), loaded.spec.metric,
                            params.compression_tolerance, params.prune_sparsity, calibration[:1024].numpy())
        runs.append(manifest)
        print(f"compress: chose {manifest.chosen}", flush=True)

    def figures(key: str, baseline: str) -> Repeats:
        """`key` of each run's chosen variant against the same figure of `baseline` (a variant, or the reference)."""
        return Repeats([getattr(_variant_named(m, m.chosen), key) for m in runs],
                       [getattr(_variant_named(m, baseline), key) for m in runs])

    chosen = [m.chosen for m in runs]
    drop = [m.reference.score - _variant_named(m, m.chosen).score for m in runs]
    size = record(figures("bytes", "pytorch_fp32"), "<= 1/3.5 of the fp32 PyTorch checkpoint's bytes", "bytes", False,
                  lambda r: r <= 1 / 3.5, chosen=chosen, accuracy_drop=drop, tolerance=params.compression_tolerance)
    not_slower = f"not slower than ONNX Runtime fp32 (p50, within {LATENCY_NOISE:.0%} timing noise)"
    single = record(figures("latency_p50_ms", "onnx_fp32"), f"{not_slower}, single row", "ms p50", False,
                    lambda r: r <= 1 + LATENCY_NOISE, chosen=chosen)
    batch = record(figures("batch_latency_p50_ms", "onnx_fp32"), f"{not_slower}, batch of 256", "ms p50", False,
                   lambda r: r <= 1 + LATENCY_NOISE, chosen=chosen)
    detail = {"runs": [{"chosen": m.chosen, "reference": vars(m.reference), "variants": [vars(v) for v in m.variants]}
                       for m in runs]}
    return size, single, batch, detail


def _variant_named(manifest, name: str):
    """A compress manifest's variant by name, the fp32 PyTorch reference included."""
    return next(v for v in [manifest.reference, *manifest.variants] if v.name == name)


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="lepton-bench-"))
