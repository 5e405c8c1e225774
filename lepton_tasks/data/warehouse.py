"""A SQL source: a table (a window of days of one partition column, or all of it) or a query, read through an
Airflow connection and streamed into Parquet batch by batch.

    source: {conn_id: warehouse, table: events, partition_column: day, window_days: 3}
    source: {conn_id: warehouse, query: "SELECT * FROM events WHERE day >= '{window_start}' AND day < '{next_ds}'"}

A query's placeholders (see `QUERY_PLACEHOLDERS`) are bound by the driver as parameters, quoted or not, never
pasted into the SQL. A table's rows come ordered by its primary key (else by every column), so that a retry reads
the same rows in the same order and resumption, which keys on the stage's checksum, finds its work; a query
should end in its own ORDER BY for the same reason.

PostgreSQL is read with `COPY (...) TO STDOUT (FORMAT csv)` into Arrow's CSV reader, typed by the query's own
result columns (measured in `bench/`: several times the rows/s of a server-side cursor); any other database
SQLAlchemy reaches (SQLite here) through a server-side cursor, in batches.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lepton_tasks.core.errors import BadSource, LeptonError, WarehouseAccessDenied, WarehouseUnavailable
from lepton_tasks.data.windows import DaySource, window_dates

if TYPE_CHECKING:
    import pyarrow as pa

QUERY_PLACEHOLDERS = ("ds", "ds_nodash", "window_start", "next_ds", "yyyy", "mm", "dd")
IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_$]*"
TABLE_NAME = rf"^{IDENTIFIER}(\.{IDENTIFIER})?$"  # table or schema.table
BATCH_ROWS = 65536
CSV_BLOCK_BYTES = 4 << 20
log = logging.getLogger(__name__)
_PLACEHOLDER = re.compile(r"'\{(\w+)\}'|\{(\w+)\}")  # '{ds}' and {ds} alike: the quotes belong to the parameter


@dataclass(frozen=True)
class SqlSource:
    """A table or query behind the Airflow connection `conn_id`."""

    conn_id: str
    table: str | None = None
    query: str | None = None
    partition_column: str | None = None

    @property
    def uri(self) -> str:
        """How runs, reports and the Airflow form name it (never the SQL, never the login)."""
        return f"sql://{self.conn_id}/{self.table or 'query'}"


def check_query(query: str) -> str:
    """The query, if its every `{...}` is a known placeholder (raises ValueError naming the others)."""
    unknown = sorted({a or b for a, b in _PLACEHOLDER.findall(query)} - set(QUERY_PLACEHOLDERS))
    if unknown:
        raise ValueError(f"query holds unknown placeholder(s) {unknown}; allowed: "
                         f"{', '.join('{' + p + '}' for p in QUERY_PLACEHOLDERS)}")
    return query


def window_values(ds: dt.date, window_days: int) -> dict[str, str]:
    """The values a run dated `ds` binds: its window is [window_start, next_ds), `window_days` days ending on ds."""
    start, after = ds - dt.timedelta(days=window_days - 1), ds + dt.timedelta(days=1)
    return {"ds": ds.isoformat(), "ds_nodash": ds.strftime("%Y%m%d"), "window_start": start.isoformat(),
            "next_ds": after.isoformat(), "yyyy": f"{ds.year:04d}", "mm": f"{ds.month:02d}", "dd": f"{ds.day:02d}"}


# ---- the connection ------------------------------------------------------------------------------------------


def connection(conn_id: str):
    """The Airflow connection `conn_id` (a task's, or AIRFLOW_CONN_* outside Airflow); BadSource if undefined."""
    try:
        from airflow.sdk import Connection

        return Connection.get(conn_id)
    except Exception as err:
        raise BadSource(f"Airflow connection '{conn_id}' (the source's conn_id) is not defined: {err}") from None


def describe(conn) -> str:
    """The connection as error messages name it: id, type, host, database and login, never the password."""
    if conn.conn_type == "sqlite":
        return f"connection '{conn.conn_id}' (sqlite:///{(conn.host or '').lstrip('/')})"
    where = f"{conn.login + '@' if conn.login else ''}{conn.host or ''}{':' + str(conn.port) if conn.port else ''}"
    return f"connection '{conn.conn_id}' ({conn.conn_type}://{where}/{conn.schema or ''})"


def engine(conn):
    """A SQLAlchemy engine for the connection: PostgreSQL through psycopg 3, SQLite on the file named by its host,
    any other type through its provider's hook."""
    import sqlalchemy as sa

    if conn.conn_type in ("postgres", "postgresql"):
        url = sa.URL.create("postgresql+psycopg", username=conn.login, password=conn.password, host=conn.host,
                            port=conn.port, database=conn.schema or None)
        return sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 10})
    if conn.conn_type == "sqlite":
        return sa.create_engine(sa.URL.create("sqlite", database=conn.host), poolclass=sa.pool.NullPool)
    try:
        return conn.get_hook().get_sqlalchemy_engine()
    except Exception as err:
        raise BadSource(f"{describe(conn)}: no SQL driver for type '{conn.conn_type}' ({err}); install its Airflow "
                        "provider") from None


def sql_error(conn, err: BaseException, doing: str) -> Exception:
    """What a database error met while `doing` means: the server down (retryable), the login refused, or a
    fault in the source (a missing table or column, a query error). The driver's message never holds the
    password; the SQLAlchemy wrapper's text (statement, parameters) is left out."""
    import sqlalchemy as sa

    orig = getattr(err, "orig", None) or err
    message = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    text = f"{describe(conn)}: {doing}: {message}"
    if isinstance(err, sa.exc.OperationalError) or type(orig).__name__ == "OperationalError":
        lowered = message.lower()
        if any(word in lowered for word in ("password", "authentication", "role", "permission", "access denied")):
            return WarehouseAccessDenied(f"{text}: check the login and password of Airflow connection "
                                         f"'{conn.conn_id}'")
        if conn.conn_type != "sqlite" and any(word in lowered for word in ("connect", "timeout", "server", "closed")):
            return WarehouseUnavailable(f"{text}; Airflow's retry tries again")
    return BadSource(text)


@contextmanager
def database_errors(conn, doing: str) -> Iterator[None]:
    """A database's errors met while `doing` as Lepton's (`sql_error`); Lepton's own pass as they are."""
    try:
        yield
    except LeptonError:
        raise
    except Exception as err:
        raise sql_error(conn, err, doing) from None


# ---- what to read ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    """The SQL a run reads and its bound parameters."""

    sql: str  # with :name parameters (SQLAlchemy's text())
    params: dict[str, str]


def statement(source: SqlSource, sa_conn, ds: dt.date, window_days: int, ordered: bool = True) -> Statement:
    """The run's SELECT: the table's window (checked against the database: table, columns, key) or the query.
    `ordered`: a table's rows by its key (what an extract needs; a probe for rows does not)."""
    values = window_values(ds, window_days)
    if source.query is not None:
        return _bind(source.query, values)
    quote = sa_conn.dialect.identifier_preparer.quote
    schema, _, name = source.table.rpartition(".")
    columns, key = _table_columns(sa_conn, source, schema or None, name)
    sql = f"SELECT * FROM {'.'.join(quote(p) for p in source.table.split('.'))}"
    if source.partition_column is not None:
        column = quote(source.partition_column)
        sql += f" WHERE {column} >= '{{window_start}}' AND {column} < '{{next_ds}}'"
    if ordered:
        sql += " ORDER BY " + ", ".join(quote(c) for c in (key or columns))
    return _bind(sql, values)


def _bind(sql: str, values: dict[str, str]) -> Statement:
    """`sql` with each placeholder made a :parameter, the rest escaped for text() (a literal ':30' stays one)."""
    out, used, last = [], {}, 0
    for match in _PLACEHOLDER.finditer(sql):
        name = match.group(1) or match.group(2)
        out.append(sql[last:match.start()].replace(":", "\\:"))
        out.append(f":{name}")
        used[name] = values[name]
        last = match.end()
    out.append(sql[last:].replace(":", "\\:"))
    return Statement("".join(out), used)


def _table_columns(sa_conn, source: SqlSource, schema: str | None, name: str) -> tuple[list[str], list[str]]:
    """The table's columns and primary key; BadSource naming the table or partition column that is not there."""
    import sqlalchemy as sa

    inspector = sa.inspect(sa_conn)
    if not inspector.has_table(name, schema=schema):
        tables = inspector.get_table_names(schema=schema)
        raise BadSource(f"table '{source.table}' does not exist (through connection '{source.conn_id}'; tables: "
                        f"{', '.join(tables[:20]) or 'none'})")
    columns = [c["name"] for c in inspector.get_columns(name, schema=schema)]
    if source.partition_column is not None and source.partition_column not in columns:
        raise BadSource(f"table '{source.table}' has no column '{source.partition_column}' (the source's "
                        f"partition_column; it has {columns[:20]})")
    key = inspector.get_pk_constraint(name, schema=schema).get("constrained_columns") or []
    return columns, key


# ---- reading -------------------------------------------------------------------------------------------------------


@dataclass
class Extract:
    """What was read: its schema, row count and the digest of the bytes as the database sent them."""

    rows: int = 0
    schema: pa.Schema | None = None
    sha256: str = ""


def extract(source: SqlSource, ds: dt.date, window_days: int, write_batch, reader=None) -> tuple[Statement, Extract]:
    """Stream the run's rows into `write_batch(batch)`; the statement read and what came. `reader`: how batches
    come (default: COPY on PostgreSQL, a server-side cursor elsewhere; the benchmark compares the two)."""
    conn = connection(source.conn_id)
    db = engine(conn)
    try:
        with database_errors(conn, f"reading {source.uri}"), db.connect() as sa_conn:
            stmt = statement(source, sa_conn, ds, window_days)
            reader = reader or (_copy_batches if db.dialect.name == "postgresql" else _cursor_batches)
            digest, result = hashlib.sha256(), Extract()
            for batch, raw in reader(sa_conn, stmt):
                digest.update(raw)
                result.schema = result.schema or batch.schema
                write_batch(batch)
                result.rows += batch.num_rows
            result.sha256 = digest.hexdigest()
            return stmt, result
    finally:
        db.dispose()


class _CopyStream(io.RawIOBase):
    """COPY's chunks (a row each) as a file Arrow's CSV reader pulls from, each read filled whole (a short read
    would end Arrow's block there); keeps the bytes read since the last `take()`."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._pending, self._read = chunks, bytearray(), []

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        wanted = len(buffer)
        while len(self._pending) < wanted:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._pending += chunk
        size = min(wanted, len(self._pending))
        read = bytes(self._pending[:size])
        del self._pending[:size]
        buffer[:size] = read
        self._read.append(read)
        return size

    def take(self) -> bytes:
        read, self._read = b"".join(self._read), []
        return read


def _arrow_type(type_oid: int) -> pa.DataType:
    """The Arrow type a PostgreSQL column's CSV text is read as (text where not listed)."""
    import pyarrow as pa

    types = {16: pa.bool_(), 20: pa.int64(), 21: pa.int64(), 23: pa.int64(), 700: pa.float64(), 701: pa.float64(),
             1700: pa.float64(), 1082: pa.date32(), 1114: pa.timestamp("us"), 1184: pa.timestamp("us", tz="UTC")}
    return types.get(type_oid, pa.string())


def _copy_batches(sa_conn, stmt: Statement) -> Iterator[tuple[pa.RecordBatch, bytes]]:
    """PostgreSQL: the statement's rows through COPY ... TO STDOUT as CSV, typed by its result columns."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    from psycopg import sql

    raw = sa_conn.connection.driver_connection  # psycopg's own connection, under SQLAlchemy's
    query, params = _psycopg_query(stmt)
    with raw.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.execute(sql.SQL("SELECT * FROM ({}) AS lepton_source LIMIT 0").format(sql.SQL(query)), params)
        names = [column.name for column in cursor.description]
        types = {column.name: _arrow_type(column.type_code) for column in cursor.description}
        with cursor.copy(sql.SQL("COPY ({}) TO STDOUT (FORMAT csv)").format(sql.SQL(query)), params) as copy:
            stream = _CopyStream(iter(copy))
            try:
                reader = pacsv.open_csv(
                    stream, read_options=pacsv.ReadOptions(column_names=names, block_size=CSV_BLOCK_BYTES),
                    convert_options=pacsv.ConvertOptions(
                        column_types=types, null_values=[""], strings_can_be_null=True,
                        quoted_strings_can_be_null=False, true_values=["t"], false_values=["f"]))
            except pa.ArrowInvalid as err:
                if stream.take():  # Arrow found fault with rows the database sent: a bug here, not in the data
                    raise
                log.debug("%s: no rows", err)
                return
            for batch in reader:
                yield batch, stream.take()


def _psycopg_query(stmt: Statement) -> tuple[str, dict[str, str]]:
    """text()'s :name parameters as psycopg's %(name)s (bound client-side for COPY, which takes none itself)."""
    query = re.sub(r"(?<![:\w\\]):(\w+)", r"%(\1)s", stmt.sql.replace("%", "%%"))
    return query.replace("\\:", ":"), stmt.params


def _cursor_batches(sa_conn, stmt: Statement) -> Iterator[tuple[pa.RecordBatch, bytes]]:
    """Any other database: a server-side cursor, BATCH_ROWS rows at a time, typed by the first batch."""
    import pyarrow as pa
    import sqlalchemy as sa

    result = sa_conn.execution_options(stream_results=True, max_row_buffer=BATCH_ROWS).execute(
        sa.text(stmt.sql), stmt.params)
    names, schema = list(result.keys()), None
    for rows in result.partitions(BATCH_ROWS):
        batch = pa.RecordBatch.from_arrays([pa.array(column) for column in zip(*rows, strict=True)], names=names)
        schema = schema or batch.schema
        batch = batch.cast(schema) if not batch.schema.equals(schema) else batch
        yield batch, batch.serialize().to_pybytes()


def window_days(source: SqlSource, ds: dt.date, days: int) -> list[DaySource]:
    """The days a run reads, oldest first, as `DaySource`s named by the source's URI; one undated entry for a
    table read whole (never waited for)."""
    if source.table is not None and source.partition_column is None:
        return [DaySource(None, source.uri)]
    return [DaySource(day.isoformat(), source.uri) for day in window_dates(ds, days)]


def missing_days(source: SqlSource, days: list[DaySource]) -> list[DaySource]:
    """The days without a row yet: each day of a table's partition column; for a query, the whole window when it
    returns no row (it filters the window itself). A table read whole is never waited for: ingest says if it is
    empty."""
    dated = [day for day in days if day.day is not None]
    if not dated:
        return []
    conn = connection(source.conn_id)
    db = engine(conn)
    try:
        with database_errors(conn, f"looking for rows of {source.uri}"), db.connect() as sa_conn:
            if source.query is not None:
                stmt = statement(source, sa_conn, dt.date.fromisoformat(dated[-1].day), len(dated))
                return [] if _has_rows(sa_conn, stmt) else dated
            # one statement (one look at the table) for every day; each day binds its own bounds
            stmt = statement(source, sa_conn, dt.date.fromisoformat(dated[0].day), 1, ordered=False)
            return [day for day in dated if not _has_rows(sa_conn, Statement(stmt.sql, {
                name: window_values(dt.date.fromisoformat(day.day), 1)[name] for name in stmt.params}))]
    finally:
        db.dispose()


def _has_rows(sa_conn, stmt: Statement) -> bool:
    import sqlalchemy as sa

    probe = f"SELECT 1 FROM ({stmt.sql}) AS lepton_source LIMIT 1"
    return sa_conn.execute(sa.text(probe), stmt.params).first() is not None
