"""`scaffold_profile`: `lepton new-pipeline` profiles every row of its source; here 10 M MNIST-1D-shaped rows
(40 float32 features and a label) in 20 Parquet files read through a glob, against pyarrow merely reading the
same files batch by batch (the floor any profiler pays). Value and baseline are interleaved (bench.common);
the ratio is the median of the per-repeat ratios, with their spread. Goal: the 10 M rows in under 30 s."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.common import interleaved, record, timed, write_classification_parts

ROWS = 10_000_000
GOAL_S = 30.0


def _read_only(files: list[str]) -> None:
    import pyarrow.parquet as pq

    for path in files:
        for _ in pq.ParquetFile(path).iter_batches(batch_size=65536):
            pass


def profile_bench(work: Path, rows: int = ROWS) -> tuple[dict, dict]:
    from lepton_tasks.data.source_profile import profile_source

    files = write_classification_parts(work / "source", rows, parts=20, features=40)
    pattern = str(work / "source" / "part-*.parquet")
    measured = interleaved(lambda: rows / timed(profile_source, pattern, None, {"label"})[1],
                           lambda: rows / timed(_read_only, files)[1], label="scaffold profile")
    seconds = rows / statistics.median(measured.values)
    summary = record(measured, f"{rows:,} rows profiled in under {GOAL_S:.0f} s", "rows/s", True,
                     lambda r: seconds < GOAL_S, seconds=seconds, rows=rows)
    return summary, {"rows": rows, "files": len(files), "profile_rows_per_s": measured.values,
                     "read_rows_per_s": measured.baselines, "ratios": measured.ratios}
