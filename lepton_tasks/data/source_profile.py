"""Profile a source for `lepton new-pipeline`: every row of every file, streamed batch by batch.

Exact, over the whole source: rows, nulls (NaN counts as null, as in validation), numeric min and max, whether a
numeric column holds only whole numbers, and value counts of text, boolean and integer columns and of the target
(up to MAX_TRACKED distinct values, then only "many"). Approximate: quantiles, from a uniform sample of
`sample_rows` rows (the rows with the smallest random keys, so the sample is uniform without knowing the size of
the source in advance). Memory is one batch plus the sample, whatever the source's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lepton_tasks.core.errors import BadSource
from lepton_tasks.data.sources import list_source_files, read_batches

MAX_TRACKED = 1000  # distinct values counted per column; past this a column is high-cardinality
SAMPLE_ROWS = 100_000


def is_numeric(arrow_type: pa.DataType) -> bool:
    return (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)) and not pa.types.is_boolean(
        arrow_type)


@dataclass
class ColumnProfile:
    """What the whole source says about one column."""

    name: str
    numeric: bool
    nulls: int = 0
    low: float | None = None
    high: float | None = None
    integral: bool = True  # every non-null value a whole number (numeric columns)
    counts: dict | None = field(default_factory=dict)  # value -> rows; None past MAX_TRACKED distinct values
    sample: np.ndarray | None = None  # numeric: the sampled rows' non-null values

    def quantile(self, q: float) -> float | None:
        if self.sample is None or not len(self.sample):
            return None
        return float(np.quantile(self.sample, q))


@dataclass
class SourceProfile:
    files: list[str]
    rows: int
    columns: dict[str, ColumnProfile]


class _Profiler:
    """Adds batches up into column profiles and a bottom-k row sample."""

    def __init__(self, schema: pa.Schema, counted: set[str], sample_rows: int, seed: int):
        self.rows = 0
        self.columns = {f.name: ColumnProfile(f.name, is_numeric(f.type)) for f in schema}
        self.counted = {f.name for f in schema if f.name in counted or not is_numeric(f.type)
                        or pa.types.is_integer(f.type)}
        self.sample_rows, self.rng = sample_rows, np.random.default_rng(seed)
        self.keys = np.empty(0)
        self.sampled: dict[str, np.ndarray] = {n: np.empty(0) for n, c in self.columns.items() if c.numeric}

    def add(self, batch: pa.RecordBatch) -> None:
        for name, column in self.columns.items():
            values = batch.column(name)
            if column.numeric:
                _add_numeric(column, values)
            else:
                column.nulls += values.null_count
            if name in self.counted and column.counts is not None:
                _add_counts(column, values)
        self._sample(batch)
        self.rows += batch.num_rows

    def _sample(self, batch: pa.RecordBatch) -> None:
        keys = np.concatenate([self.keys, self.rng.random(batch.num_rows)])
        keep = np.argpartition(keys, self.sample_rows)[:self.sample_rows] if len(keys) > self.sample_rows \
            else np.arange(len(keys))
        self.keys = keys[keep]
        for name in self.sampled:
            batch_values = batch.column(name).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
            self.sampled[name] = np.concatenate([self.sampled[name], batch_values])[keep]

    def result(self, files: list[str]) -> SourceProfile:
        for name, values in self.sampled.items():
            self.columns[name].sample = values[~np.isnan(values)]
        return SourceProfile(files, self.rows, self.columns)


def _add_numeric(column: ColumnProfile, values: pa.Array) -> None:
    numbers = values.to_numpy(zero_copy_only=False)
    missing = np.isnan(numbers) if numbers.dtype.kind == "f" else None
    column.nulls += int(missing.sum()) if missing is not None else values.null_count
    present = numbers[~missing] if missing is not None else numbers
    if not len(present):
        return
    low, high = float(present.min()), float(present.max())
    column.low = low if column.low is None else min(column.low, low)
    column.high = high if column.high is None else max(column.high, high)
    if column.integral and numbers.dtype.kind == "f":
        column.integral = bool(np.all(present == np.floor(present)))


def _add_counts(column: ColumnProfile, values: pa.Array) -> None:
    for item in pc.value_counts(values.drop_null()).to_pylist():
        value = item["values"]
        if isinstance(value, float) and value != value:  # NaN: a null, counted as such above
            continue
        column.counts[value] = column.counts.get(value, 0) + item["counts"]
    if len(column.counts) > MAX_TRACKED:
        column.counts = None


def profile_source(uri: str, fmt: str | None, counted: set[str] = frozenset(), sample_rows: int = SAMPLE_ROWS,
                   seed: int = 0) -> SourceProfile:
    """Profile every row of the source's files; `counted` columns get value counts whatever their type."""
    fs, files = list_source_files(uri, fmt)
    profiler = None
    for path in files:
        for batch in read_batches(fs, path):
            if profiler is None:
                profiler = _Profiler(batch.schema, set(counted), sample_rows, seed)
            elif batch.schema.names != list(profiler.columns):
                raise BadSource(f"source file '{path}' has columns {batch.schema.names}, unlike the first file's "
                                f"{list(profiler.columns)}")
            profiler.add(batch)
    if profiler is None or profiler.rows == 0:
        raise BadSource(f"source '{uri}' holds no rows to profile")
    return profiler.result(files)
