"""Ingest: a CSV, Parquet or JSON-lines source (local path or any fsspec URI, a file, folder or glob) into an
immutable, run-scoped Parquet stage.

The source is streamed batch by batch into Parquet parts (one per source file), so memory stays bounded by a
batch, not by the data set.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from lepton_tasks import window
from lepton_tasks.errors import BadSource
from lepton_tasks.storage import atomic_dir, parquet_dictionary_columns, sha256_files
from lepton_tasks.window import DaySource

log = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".csv.gz": "csv", ".jsonl": "jsonl",
           ".ndjson": "jsonl", ".jsonl.gz": "jsonl", ".json": "jsonl"}


@dataclass
class IngestManifest:
    """What the ingest stage wrote: the stage folder, its parts and their checksums."""

    source_uri: str
    source_files: list[str]
    source_sha256: str
    stage_dir: str
    parts: list[str]
    rows: int
    columns: dict[str, str]  # name -> Arrow type
    sha256: str  # over the stage's Parquet parts
    bytes: int = 0
    notes: list[str] = field(default_factory=list)
    # per day of a date-templated source ({day: None} otherwise): its URI and files, each with rows and sha256
    window: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_uri(source_uri: str, data_root: Path) -> str:
    """A relative local path is read under the data root (and may not leave it); URIs with a scheme and
    absolute paths are taken as given, since whoever sets them chose the location on purpose."""
    if "://" in source_uri or Path(source_uri).is_absolute():
        return source_uri
    root = Path(data_root).resolve()
    resolved = (root / source_uri).resolve()
    if not resolved.is_relative_to(root):
        raise BadSource(f"param 'source_uri' ('{source_uri}') resolves to {resolved}, outside the data root {root}")
    return str(root / source_uri)


def list_source_files(uri: str, fmt: str | None = None) -> tuple[object, list[str]]:
    """The filesystem and the sorted data files behind a file, folder or glob URI (of format `fmt`, if given)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    try:
        if any(ch in path for ch in "*?["):
            candidates = fs.glob(path)
            if not candidates:
                raise BadSource(f"no file matches '{uri}'")
        elif fs.isdir(path):
            candidates = [p for p in fs.find(path) if not Path(p).name.startswith((".", "_"))]
        elif fs.exists(path):
            candidates = [path]
        elif Path(path).is_symlink():
            raise BadSource(f"source '{uri}' is a symlink that loops or points nowhere")
        else:
            raise BadSource(f"source '{uri}' does not exist")
    except (OSError, RecursionError) as err:  # a symlink loop, a permission error, an unreachable store
        raise BadSource(f"cannot list source '{uri}': {type(err).__name__}: {err}") from None
    files = sorted(p for p in candidates if _format_of(p) is not None and fmt in (None, _format_of(p)))
    if not files:
        wanted = ", ".join(ext for ext, f in FORMATS.items() if fmt in (None, f))
        raise BadSource(f"source '{uri}' holds no {fmt or 'CSV, Parquet or JSON-lines'} file (looked for {wanted})")
    return fs, files


def _format_of(path: str) -> str | None:
    name = path.lower()
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


def read_batches(fs, path: str):
    """Record batches of one source file, raising BadSource with the file named on any read error."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    if fs.size(path) == 0:
        raise BadSource(f"source file '{path}' is empty (0 bytes)")
    try:
        with fs.open(path, "rb", compression="infer") as handle:
            if _format_of(path) == "parquet":
                yield from pq.ParquetFile(handle).iter_batches(batch_size=65536)
            elif _format_of(path) == "jsonl":
                yield from pajson.open_json(handle)
            else:
                # an empty CSV field is a missing value, for text columns too
                yield from pacsv.open_csv(handle, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except (pa.ArrowException, OSError, EOFError, UnicodeDecodeError) as err:
        raise BadSource(f"cannot read '{path}' as {_format_of(path)}: {err}") from err


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


def _check_columns(path: str, part: Path, schema: pa.Schema, expected: dict[str, str]) -> None:
    """The columns the spec names are there, once each, as text or numbers as it says."""
    names = schema.names
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise BadSource(f"source file '{path}' has duplicate column names {duplicated}")
    missing = [c for c in expected if c not in names]
    if missing:
        delimiter = next((d for d in ";\t|" if len(names) == 1 and d in names[0]), None)
        hint = f"; it looks delimited by {delimiter!r}, not ','" if delimiter else ""
        raise BadSource(f"source file '{path}' lacks column(s) {missing} that the pipeline spec names "
                        f"(it has {names[:12]}{'...' if len(names) > 12 else ''}){hint}")
    for column, kind in expected.items():
        arrow_type = schema.field(column).type
        if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
            raise BadSource(f"column '{column}' of source file '{path}' is not valid UTF-8 text")
        if kind == "numeric" and (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)):
            raise BadSource(f"column '{column}' of source file '{path}' is numeric in the pipeline spec but holds "
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
    ending with `ds` (see `lepton_tasks.window`); a day without data fails the stage, naming it.
    """
    days = _window(source_uri, data_root, fmt, ds, window_days)
    schema, rows, files, window = None, 0, [], []
    with atomic_dir(stage_dir) as tmp:
        for day, (fs, day_files) in days.items():
            listed = []
            for path in day_files:
                part = tmp / f"part-{len(files):05d}.parquet"
                part_rows, schema, digest = _copy_file(fs, path, part, schema)
                _check_columns(path, part, schema, expected or {})
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


def _window(source_uri: str, data_root: Path, fmt: str | None, ds: dt.date | None,
            window_days: int) -> dict[DaySource, tuple[object, list[str]]]:
    """Each day's resolved URI with its filesystem and files; BadSource naming every day without data."""
    if window.is_templated(source_uri) and ds is None:
        raise BadSource(f"param 'source_uri' ('{source_uri}') is templated on the run's date, but the run has none")
    days = window.resolve(source_uri, ds or dt.date.today(), window_days)
    listed, absent = list_days(days, data_root, fmt)
    untemplated = absent.pop(DaySource(None, source_uri), None)
    if untemplated is not None:
        raise untemplated
    if absent:
        raise BadSource(f"no data for {len(absent)} of the {len(days)} day(s) of the window ending {ds}: "
                        + "; ".join(f"{day.day}: {err}" for day, err in absent.items()))
    return listed


def list_days(days: list[DaySource], data_root: Path, fmt: str | None = None
              ) -> tuple[dict[DaySource, tuple[object, list[str]]], dict[DaySource, BadSource]]:
    """Each day's filesystem and data files, and the error of each day that has none (yet)."""
    listed, absent = {}, {}
    for day in days:
        try:
            listed[day] = list_source_files(resolve_uri(day.uri, data_root), fmt)
        except BadSource as err:
            absent[day] = err
    return listed, absent
