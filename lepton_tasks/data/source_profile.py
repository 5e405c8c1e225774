"""Profile a source for `lepton new-pipeline`: every row of every file, streamed batch by batch; a SQL table in
its database (`profile_table`).

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
from lepton_tasks.data.warehouse import SqlSource

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


def profile_table(source: SqlSource, counted: set[str] = frozenset(), sample_rows: int = SAMPLE_ROWS,
                  seed: int = 0) -> SourceProfile:
    """Profile a SQL source's whole table in the database: counts, nulls, min, max and whole-number checks in one
    aggregate query, value counts by GROUP BY, quantiles from a sample the database draws (PostgreSQL's
    TABLESAMPLE, else ORDER BY random()); only the aggregates and the sample leave the database."""
    import sqlalchemy as sa

    from lepton_tasks.data import warehouse

    conn = warehouse.connection(source.conn_id)
    db = warehouse.engine(conn)
    try:
        with warehouse.database_errors(conn, f"profiling {source.uri}"), db.connect() as sa_conn:
            schema, _, name = source.table.rpartition(".")
            inspector = sa.inspect(sa_conn)
            if not inspector.has_table(name, schema=schema or None):
                raise BadSource(f"table '{source.table}' does not exist (through connection '{source.conn_id}')")
            columns = inspector.get_columns(name, schema=schema or None)
            table = sa.table(name, *(sa.column(c["name"]) for c in columns), schema=schema or None)
            profiles = {c["name"]: ColumnProfile(c["name"], _sql_numeric(c["type"])) for c in columns}
            rows = _aggregate(sa_conn, table, profiles)
            for c in columns:  # as for files: the target, text, booleans and integers
                if c["name"] in counted or not profiles[c["name"]].numeric or isinstance(c["type"], sa.Integer):
                    profiles[c["name"]].counts = _value_counts(sa_conn, table, c["name"])
            _sample(sa_conn, table, profiles, rows, sample_rows, seed)
    finally:
        db.dispose()
    if rows == 0:
        raise BadSource(f"table '{source.table}' (connection '{source.conn_id}') holds no rows to profile")
    return SourceProfile([source.uri], rows, profiles)


def _sql_numeric(sql_type) -> bool:
    import sqlalchemy as sa

    return isinstance(sql_type, (sa.Integer, sa.Float, sa.Numeric)) and not isinstance(sql_type, sa.Boolean)


def _aggregate(sa_conn, table, profiles: dict[str, ColumnProfile]) -> int:
    """Rows, and each column's nulls (and min, max, whether all whole, for numbers), in one query."""
    import sqlalchemy as sa

    items = [sa.func.count()]
    for column in profiles.values():
        c = table.c[column.name]
        items.append(sa.func.count(c))
        if column.numeric:
            items += [sa.func.min(c), sa.func.max(c), sa.func.sum(sa.case((c != sa.func.round(c), 1), else_=0))]
    values = list(sa_conn.execute(sa.select(*items).select_from(table)).one())
    rows = values.pop(0)
    for column in profiles.values():
        column.nulls = rows - values.pop(0)
        if column.numeric:
            low, high, fractional = values.pop(0), values.pop(0), values.pop(0)
            column.low, column.high = (None if low is None else float(low)), (None if high is None else float(high))
            column.integral = not fractional
    return rows


def _value_counts(sa_conn, table, name: str) -> dict | None:
    """A column's values and their rows, most frequent first; None past MAX_TRACKED distinct values."""
    import sqlalchemy as sa

    c = table.c[name]
    query = sa.select(c, sa.func.count()).where(c.is_not(None)).group_by(c).order_by(sa.func.count().desc()) \
        .limit(MAX_TRACKED + 1)
    # dates and decimals as text, so that a suite can hold them as JSON
    counts = {value if isinstance(value, (str, int, float, bool)) else str(value): count
              for value, count in sa_conn.execute(query)}
    return None if len(counts) > MAX_TRACKED else counts


def _sample(sa_conn, table, profiles: dict[str, ColumnProfile], rows: int, sample_rows: int, seed: int) -> None:
    """The numeric columns' values in a sample of about `sample_rows` rows, drawn by the database."""
    import sqlalchemy as sa

    numeric = [name for name, column in profiles.items() if column.numeric]
    if not numeric or not rows:
        return
    share = min(100.0, 100.0 * sample_rows / rows)
    if sa_conn.dialect.name == "postgresql":
        sampled = sa.tablesample(table, sa.func.bernoulli(share), seed=sa.literal(seed))
        query = sa.select(*(sampled.c[n] for n in numeric))
    else:
        query = sa.select(*(table.c[n] for n in numeric)).order_by(sa.func.random()).limit(sample_rows)
    values = np.array(sa_conn.execute(query).all(), dtype=np.float64).reshape(-1, len(numeric))
    for index, name in enumerate(numeric):
        column = values[:, index]
        profiles[name].sample = column[~np.isnan(column)]
