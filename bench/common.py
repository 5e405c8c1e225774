"""Shared by the benchmarks: the result record, peak-RSS measurement of a process tree, test data."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
PROBE = [sys.executable, "-m", "bench.probe"]


def record(value: float, baseline: float, goal: str, unit: str, higher_is_better: bool, met: bool, **detail) -> dict:
    """One benchmark in summary.json's shape: the value, the baseline measured in the same run, their ratio."""
    return {"value": value, "baseline": baseline, "ratio": value / baseline if baseline else None, "goal": goal,
            "unit": unit, "higher_is_better": higher_is_better, "met": bool(met), **detail}


def run_measured(args: list[str], timeout: int = 1800) -> tuple[dict, int]:
    """Run `python -m bench.probe ARGS`; its JSON output and the peak RSS (bytes) of its whole process tree
    (a Dask cluster's workers included), sampled every 50 ms."""
    import psutil

    process = subprocess.Popen([*PROBE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()

    def sample() -> None:
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate(timeout=timeout)
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"bench.probe {' '.join(args)} exited {process.returncode}:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), peak[0]


def write_classification_parts(out_dir: Path, rows: int, parts: int, features: int = 8, seed: int = 0) -> list[str]:
    """`rows` rows of `features` float32 columns and a 10-class label, as `parts` Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index, count in enumerate(np.diff(np.linspace(0, rows, parts + 1).astype(int))):
        columns = {f"f{i}": rng.standard_normal(count, dtype=np.float32) for i in range(features)}
        columns["label"] = rng.integers(0, 10, count)
        path = out_dir / f"part-{index:05d}.parquet"
        pq.write_table(pa.table(columns), path)
        paths.append(str(path))
    return paths


def classification_spec(features: int = 8):
    from lepton_tasks.specs import PipelineSpec

    return PipelineSpec(name="bench", source={"uri": "bench", "format": "parquet"},
                        features={f"f{i}": "numeric" for i in range(features)},
                        target={"column": "label", "classes": list(range(10))})


def mnist_frame(rows: int, seed: int = 42):
    """MNIST-1D rows: the package's 5000 generated rows, tiled (with small noise) up to `rows`."""
    from lepton_tasks.demo_data import mnist1d_frame

    demo = mnist1d_frame(5000, seed)
    frame = demo.iloc[np.arange(rows) % len(demo)].reset_index(drop=True)
    features = [c for c in frame.columns if c != "label"]
    noise = np.random.default_rng(seed).normal(0, 0.01, (rows, len(features))).astype(np.float32)
    frame[features] += noise * (np.arange(rows) >= len(demo))[:, None]  # the first 5000 rows stay as generated
    return frame


def write_json(name: str, value) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(value, indent=2, default=str))
    return path
