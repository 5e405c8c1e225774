"""`scaffold_profile`: `lepton new-pipeline` profiles every row of its source; here 10 M MNIST-1D-shaped rows
(40 float32 features and a label) in 20 Parquet files read through a glob, against pyarrow merely reading the
same files batch by batch (the floor any profiler pays). Value and baseline are interleaved, `REPEATS` times;
the ratio is the median of the per-repeat ratios, with their spread. Goal: the 10 M rows in under 30 s."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.common import record, write_classification_parts

ROWS = 10_000_000
REPEATS = 3
GOAL_S = 30.0


def _read_only(files: list[str]) -> None:
    import pyarrow.parquet as pq

    for path in files:
        for _ in pq.ParquetFile(path).iter_batches(batch_size=65536):
            pass


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def profile_bench(work: Path, rows: int = ROWS) -> tuple[dict, dict]:
    from lepton_tasks.profile import profile_source

    files = write_classification_parts(work / "source", rows, parts=20, features=40)
    pattern = str(work / "source" / "part-*.parquet")
    repeats = []
    for _ in range(REPEATS):
        baseline_s = _timed(lambda: _read_only(files))
        profile_s = _timed(lambda: profile_source(pattern, None, {"label"}))
        repeats.append({"profile_s": profile_s, "read_s": baseline_s, "ratio": baseline_s / profile_s})
    profile_s = statistics.median(r["profile_s"] for r in repeats)
    read_s = statistics.median(r["read_s"] for r in repeats)
    ratios = [r["ratio"] for r in repeats]
    summary = record(rows / profile_s, rows / read_s, f"{rows:,} rows profiled in under {GOAL_S:.0f} s", "rows/s",
                     True, profile_s < GOAL_S, seconds=profile_s, repeats=REPEATS,
                     spread=[min(ratios), max(ratios)])
    summary["ratio"] = statistics.median(ratios)
    return summary, {"rows": rows, "files": len(files), "repeats": repeats}
