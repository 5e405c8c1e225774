"""Shared by the benchmarks: interleaved repeats and the result record, peak-RSS measurement of a process tree,
test data."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

RESULTS = Path(__file__).parent / "results"
PROBE = [sys.executable, "-m", "bench.probe"]


T = TypeVar("T")
REPEATS = 3  # every benchmark: at least three repeats, value and baseline interleaved


@dataclass
class Repeats:
    """Per repeat: the value, the baseline measured beside it, and whatever else each measurement reported."""

    values: list[float] = field(default_factory=list)
    baselines: list[float] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [v / b for v, b in zip(self.values, self.baselines, strict=True)]


Measurement = Callable[[], "float | tuple[float, dict]"]


def alternating(measures: dict[str, Callable[[], T]], repeats: int = REPEATS) -> Iterator[dict[str, T]]:
    """Each round's results of every measure, their order reversed every other round, so that a machine growing
    slower or faster over the run (caches, thermal state, a neighbour) weighs on all of them alike."""
    names = list(measures)
    for index in range(repeats):
        yield {name: measures[name]() for name in (names if index % 2 == 0 else names[::-1])}


def _with_detail(result) -> tuple[float, dict]:
    return result if isinstance(result, tuple) else (result, {})


def interleaved(value: Measurement, baseline: Measurement, repeats: int = REPEATS, label: str = "") -> Repeats:
    """Measure value and baseline `repeats` times, alternating which goes first. Each measurement returns its
    figure, or (figure, detail)."""
    out = Repeats()
    for index, measured in enumerate(alternating({"value": value, "baseline": baseline}, repeats)):
        (figure, detail), (base, base_detail) = _with_detail(measured["value"]), _with_detail(measured["baseline"])
        out.values.append(figure)
        out.baselines.append(base)
        out.details.append({"value": detail, "baseline": base_detail})
        print(f"{label} repeat {index + 1}/{repeats}: value {out.values[-1]:.4g}, baseline {out.baselines[-1]:.4g}, "
              f"ratio {out.ratios[-1]:.3f}", flush=True)
    return out


def record(measured: Repeats, goal: str, unit: str, higher_is_better: bool, met: Callable[[float], bool],
           **detail) -> dict:
    """One benchmark in summary.json's shape: medians of value and baseline, `ratio` the median of the per-repeat
    ratios (value / baseline), `spread` their min and max, whether the median ratio meets the goal (`met`), and
    the worst repeat's ratio and whether it does too (`worst_met`): a goal met by the median is no floor."""
    ratios = measured.ratios
    ratio = statistics.median(ratios)
    worst = min(ratios) if higher_is_better else max(ratios)
    return {"value": statistics.median(measured.values), "baseline": statistics.median(measured.baselines),
            "ratio": ratio, "repeats": len(ratios), "spread": [min(ratios), max(ratios)], "goal": goal,
            "unit": unit, "higher_is_better": higher_is_better, "met": bool(met(ratio)), "worst": worst,
            "worst_met": bool(met(worst)), **detail}


def machine_cpu_seconds() -> float:
    """CPU-seconds every process on this machine has used so far (busy time in /proc/stat): a stage's own, its
    Dask workers' and a local store server's together."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in stat.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable, *args, **kwargs) -> tuple[object, float]:
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - started


def run_measured(args: list[str], timeout: int = 1800) -> tuple[dict, int]:
    """Run `python -m bench.probe ARGS`; its JSON output and the peak RSS (bytes) of its whole process tree
    (a Dask cluster's workers included)."""
    process = subprocess.Popen([*PROBE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeMemory([process.pid], clusters=False) as memory:
        out, err = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"bench.probe {' '.join(args)} exited {process.returncode}:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), memory.peak


class TreeMemory:
    """Peak summed RSS, sampled every 50 ms, of the process trees under `roots` (a probe, or an Airflow
    deployment's components with their task processes) and, with `clusters`, of every Lepton Dask cluster
    process on this machine with its workers (a run's cluster runs in a session of its own)."""

    def __init__(self, roots: list[int], clusters: bool = True):
        self.roots, self.clusters, self.peak, self._done = roots, clusters, 0, threading.Event()
        self.samples: list[tuple[float, int]] = []  # (epoch seconds, summed RSS) since the last reset
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def reset(self) -> None:
        self.peak, self.samples = 0, []

    def peak_between(self, start: float, end: float) -> int:
        """The highest sample from `start` to `end` (epoch seconds); 0 where none fell in that window."""
        return max((rss for at, rss in self.samples if start <= at <= end), default=0)

    def _sample(self) -> None:
        """One read of /proc/PID/stat per process and sample (its parent and RSS; a command line only once per
        process): psutil walking each root's children and every command line at each sample took a tenth of a
        core, beside the runs being measured."""
        page = os.sysconf("SC_PAGE_SIZE")
        is_cluster: dict[tuple[int, str], bool] = {}  # by (pid, start time): a reused pid is another process
        while not self._done.is_set():
            children, rss, clusters = {}, {}, []
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                try:
                    with open(f"/proc/{name}/stat", "rb") as stat:
                        fields = stat.read().rsplit(b")", 1)[1].split()  # after "pid (command name)"
                    pid = int(name)
                    children.setdefault(int(fields[1]), []).append(pid)
                    rss[pid] = int(fields[21]) * page
                    key = (pid, fields[19].decode())
                    if self.clusters and key not in is_cluster:
                        with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                            is_cluster[key] = b"lepton_tasks.infra.cluster" in cmdline.read()
                    if is_cluster.get(key):
                        clusters.append(pid)
                except (OSError, IndexError, ValueError):
                    continue  # gone between the listing and the read
            tree, todo = set(), [*self.roots, *clusters]
            while todo:
                pid = todo.pop()
                if pid in rss and pid not in tree:
                    tree.add(pid)
                    todo.extend(children.get(pid, []))
            total = sum(rss[pid] for pid in tree)
            self.samples.append((time.time(), total))
            self.peak = max(self.peak, total)
            time.sleep(0.05)


@contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Environment variables set (None: unset) for the block, and put back as they were after it."""
    before = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            os.environ.pop(name, None) if value is None else os.environ.update({name: value})
        yield
    finally:
        for name, value in before.items():
            os.environ.pop(name, None) if value is None else os.environ.update({name: value})


@contextmanager
def shared_cluster() -> Iterator[str]:
    """One 2-worker Dask cluster (Lepton's worker settings) as the external scheduler (LEPTON_DASK_ADDRESS) of every
    stage run in the block, as `make up` gives the DAGs: runs compared on their results pay no cluster start."""
    from distributed import LocalCluster

    from lepton_tasks.infra.cluster import worker_config

    with worker_config(), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            environ(LEPTON_DASK_ADDRESS=cluster.scheduler_address):
        yield cluster.scheduler_address


def write_classification_parts(out_dir: Path, rows: int, parts: int, features: int = 8, seed: int = 0) -> list[str]:
    """`rows` rows of `features` float32 columns and a 10-class label, as `parts` Parquet files."""
    import pyarrow as pa

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index, count in enumerate(np.diff(np.linspace(0, rows, parts + 1).astype(int))):
        columns = {f"f{i}": rng.standard_normal(count, dtype=np.float32) for i in range(features)}
        columns["label"] = rng.integers(0, 10, count)
        path = out_dir / f"part-{index:05d}.parquet"
        write_parquet(pa.table(columns), path)
        paths.append(str(path))
    return paths


def write_parquet(table, path: Path) -> None:
    """A bench data file, dictionary-encoded as Lepton writes its own stages (not in float columns): pyarrow's
    default took most of `make bench`'s data set-up (about 28 s for 10 M rows of 40 features, 3 s without). Value
    and baseline read the same files."""
    import pyarrow.parquet as pq

    from lepton_tasks.core.storage import parquet_dictionary_columns

    pq.write_table(table, path, use_dictionary=parquet_dictionary_columns(table.schema))


def classification_spec(features: int = 8):
    from lepton_tasks.config.specs import PipelineSpec

    return PipelineSpec(name="bench", source={"uri": "bench", "format": "parquet"},
                        features={f"f{i}": "numeric" for i in range(features)},
                        target={"column": "label", "classes": list(range(10))})


def mnist_frame(rows: int, seed: int = 42):
    """MNIST-1D rows: the package's 5000 generated rows, tiled (with small noise) up to `rows`. Tiled rows are
    near-copies of each other: fine for speed and memory, never for quality (see bench.quality.fresh_samples)."""
    from lepton_tasks.tools.demo_data import mnist1d_frame

    return _tiled(mnist1d_frame(min(rows, 5000), seed), rows, seed, keep=5000)


def _tiled(demo, rows: int, seed: int, keep: int):
    """`demo` repeated up to `rows` rows, every row after the first `keep` moved by N(0, 0.01) noise (in numpy: a
    10 M-row set is 20 of these)."""
    import pandas as pd

    features = [c for c in demo.columns if c != "label"]
    index = np.arange(rows) % len(demo)
    noise = np.random.default_rng(seed).standard_normal((rows, len(features)), dtype=np.float32) * np.float32(0.01)
    noise[:keep] = 0
    frame = pd.DataFrame(demo[features].to_numpy(np.float32)[index] + noise, columns=features)
    frame["label"] = demo["label"].to_numpy()[index]
    return frame[list(demo.columns)]


def write_mnist_parts(folder: Path, rows: int, rows_per_part: int = 500_000) -> list[str]:
    """`rows` MNIST-1D rows as Parquet parts of at most `rows_per_part` rows (at least two), made part by part so
    that 10 M rows never sit in memory at once: one generated set of 5000 rows, tiled with fresh noise per part
    (generating MNIST-1D takes seconds a set; the data is for speed and memory, as `mnist_frame` says)."""
    import pyarrow as pa

    from lepton_tasks.tools.demo_data import mnist1d_frame

    folder.mkdir(parents=True, exist_ok=True)
    demo = mnist1d_frame(5000, 42)
    sizes = np.diff(np.linspace(0, rows, max(2, -(-rows // rows_per_part)) + 1).astype(int))
    paths = []
    for index, size in enumerate(sizes):
        paths.append(str(folder / f"part-{index:05d}.parquet"))
        frame = _tiled(demo, int(size), seed=42 + index, keep=5000 if index == 0 else 0)
        write_parquet(pa.Table.from_pandas(frame, preserve_index=False), Path(paths[-1]))
    return paths


def write_json(name: str, value) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(value, indent=2, default=str))
    return path
