"""Ingest: a CSV, Parquet or JSON-lines source (local path or any fsspec URI, a file, folder or glob) or a SQL
table or query (`lepton_tasks.data.warehouse`) into an immutable, run-scoped Parquet stage.

The source is streamed batch by batch into Parquet parts (one per source file), so memory stays bounded by a
batch, not by the data set.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from pathlib import Path

import pyarrow as pa

from lepton_tasks.core.errors import BadSource
from lepton_tasks.core.storage import atomic_dir, parquet_dictionary_columns, sha256_files
from lepton_tasks.data import windows
from lepton_tasks.data.manifests import IngestManifest
from lepton_tasks.data.sources import list_days, read_batches, resolve_uri
from lepton_tasks.data.warehouse import SqlSource, extract, window_values
from lepton_tasks.data.windows import DaySource

log = logging.getLogger(__name__)


def _copy_file(fs, path: str, target: Path, schema: pa.Schema | None) -> tuple[int, pa.Schema, str]:
    """Stream one source file into one Parquet part; returns rows, schema and the source's sha256."""
    import pyarrow.parquet as pq

    rows, writer = 0, None
    try:
        for batch in read_batches(fs, path):
            if schema is not None and not batch.schema.equals(schema):
                raise BadSource(f"source file '{path}' has schema {_schema_text(batch.schema)}, "
                                f"unlike the first file's {_schema_text(schema)}")
            schema = batch.schema
            writer = writer or pq.ParquetWriter(target, batch.schema,
                                                use_dictionary=parquet_dictionary_columns(batch.schema))
            writer.write_batch(batch)
            rows += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None or rows == 0:
        raise BadSource(f"source file '{path}' holds no data rows")
    return rows, schema, _sha256_remote(fs, path)


def _sha256_remote(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _schema_text(schema: pa.Schema) -> str:
    return "{" + ", ".join(f"{f.name}: {f.type}" for f in schema) + "}"


def _check_columns(source: str, part: Path, schema: pa.Schema, expected: dict[str, str]) -> None:
    """The columns the spec names are there, once each, as text or numbers as it says (`source`: what error
    messages call the source: "source file 'x.csv'", say)."""
    names = schema.names
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise BadSource(f"{source} has duplicate column names {duplicated}")
    missing = [c for c in expected if c not in names]
    if missing:
        delimiter = next((d for d in ";\t|" if len(names) == 1 and d in names[0]), None)
        hint = f"; it looks delimited by {delimiter!r}, not ','" if delimiter else ""
        raise BadSource(f"{source} lacks column(s) {missing} that the pipeline spec names "
                        f"(it has {names[:12]}{'...' if len(names) > 12 else ''}){hint}")
    for column, kind in expected.items():
        arrow_type = schema.field(column).type
        if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
            raise BadSource(f"column '{column}' of {source} is not valid UTF-8 text")
        if kind == "numeric" and (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)):
            raise BadSource(f"column '{column}' of {source} is numeric in the pipeline spec but holds "
                            f"text, e.g. {_first_non_number(part, column)!r}")


def _first_non_number(part: Path, column: str) -> str | None:
    import pyarrow.parquet as pq

    for value in pq.read_table(part, columns=[column]).column(0).to_pylist():
        try:
            float(value)
        except (TypeError, ValueError):
            if value is not None:
                return value
    return None


def ingest(source_uri: str, data_root: Path, stage_dir: Path, fmt: str | None = None,
           expected: dict[str, str] | None = None, ds: dt.date | None = None,
           window_days: int = 1) -> IngestManifest:
    """Copy the source into `stage_dir` as Parquet parts and describe what was written.

    `fmt` restricts the files read to one format; every column in `expected` ({name: "numeric" | "any"}) must be
    in the source, numeric ones as numbers. A source URI templated on the date reads the `window_days` days
    ending with `ds` (see `lepton_tasks.data.windows`); a day without data fails the stage, naming it.
    """
    days = _window(source_uri, data_root, fmt, ds, window_days)
    schema, rows, files, window = None, 0, [], []
    with atomic_dir(stage_dir) as tmp:
        for day, (fs, day_files) in days.items():
            listed = []
            for path in day_files:
                part = tmp / f"part-{len(files):05d}.parquet"
                part_rows, schema, digest = _copy_file(fs, path, part, schema)
                _check_columns(f"source file '{path}'", part, schema, expected or {})
                rows += part_rows
                files.append(path)
                listed.append({"path": path, "rows": part_rows, "sha256": digest})
                log.info("ingested %s: %d rows", path, part_rows)
            window.append({"day": day.day, "uri": resolve_uri(day.uri, data_root), "files": listed})
    parts = sorted(Path(stage_dir).glob("part-*.parquet"))
    return IngestManifest(
        source_uri=resolve_uri(source_uri, data_root),
        source_files=files,
        source_sha256=hashlib.sha256("".join(f["sha256"] for d in window for f in d["files"]).encode()).hexdigest(),
        stage_dir=str(stage_dir),
        parts=[str(p) for p in parts],
        rows=rows,
        columns={f.name: str(f.type) for f in schema},
        sha256=sha256_files(parts),
        bytes=sum(p.stat().st_size for p in parts),
        window=window,
    )


def ingest_sql(source: SqlSource, stage_dir: Path, expected: dict[str, str], ds: dt.date,
               window_days: int) -> IngestManifest:
    """Stream a SQL source's rows for the window ending `ds` into one Parquet part (a row group per batch) and
    describe what was written: the statement, its bound values, rows, and the digest of what the database sent."""
    import pyarrow.parquet as pq

    with atomic_dir(stage_dir) as tmp:
        part, writer = tmp / "part-00000.parquet", None

        def write(batch: pa.RecordBatch) -> None:
            nonlocal writer
            writer = writer or pq.ParquetWriter(part, batch.schema,
                                                use_dictionary=parquet_dictionary_columns(batch.schema))
            writer.write_batch(batch)

        try:
            statement, read = extract(source, ds, window_days, write)
        finally:
            if writer is not None:
                writer.close()
        if read.rows == 0:
            bounds = window_values(ds, window_days)
            raise BadSource(f"{source.uri} (connection '{source.conn_id}') returned no rows for the window "
                            f"{bounds['window_start']} to {bounds['ds']}")
        _check_columns(source.uri, part, read.schema, expected)
        log.info("ingested %s: %d rows", source.uri, read.rows)
    parts = sorted(Path(stage_dir).glob("part-*.parquet"))
    return IngestManifest(
        source_uri=source.uri, source_files=[], source_sha256=read.sha256, stage_dir=str(stage_dir),
        parts=[str(p) for p in parts], rows=read.rows, columns={f.name: str(f.type) for f in read.schema},
        sha256=sha256_files(parts), bytes=sum(p.stat().st_size for p in parts),
        window=[{"day": ds.isoformat(), "uri": source.uri, "statement": statement.sql, "values": statement.params,
                 "rows": read.rows}])


def _window(source_uri: str, data_root: Path, fmt: str | None, ds: dt.date | None,
            window_days: int) -> dict[DaySource, tuple[object, list[str]]]:
    """Each day's resolved URI with its filesystem and files; BadSource naming every day without data."""
    if windows.is_templated(source_uri) and ds is None:
        raise BadSource(f"param 'source_uri' ('{source_uri}') is templated on the run's date, but the run has none")
    days = windows.resolve(source_uri, ds or dt.date.today(), window_days)
    listed, absent = list_days(days, data_root, fmt)
    untemplated = absent.pop(DaySource(None, source_uri), None)
    if untemplated is not None:
        raise untemplated
    if absent:
        raise BadSource(f"no data for {len(absent)} of the {len(days)} day(s) of the window ending {ds}: "
                        + "; ".join(f"{day.day}: {err}" for day, err in absent.items()))
    return listed
