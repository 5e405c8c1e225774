"""Ingest: a CSV/Parquet source (local path or any fsspec URI) into an immutable, run-scoped Parquet stage.

The source is streamed batch by batch into Parquet parts (one per source file), so memory stays bounded by a
batch, not by the data set.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from lepton_tasks.errors import BadSource
from lepton_tasks.storage import atomic_dir, sha256_files

log = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".csv.gz": "csv"}


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

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_uri(source_uri: str, data_root: Path) -> str:
    """A relative local path is read under the data root; URIs with a scheme and absolute paths as given."""
    if "://" in source_uri or Path(source_uri).is_absolute():
        return source_uri
    return str(Path(data_root) / source_uri)


def list_source_files(uri: str) -> tuple[object, list[str]]:
    """The filesystem and the sorted data files behind a file, folder or glob URI."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if any(ch in path for ch in "*?["):
        candidates = fs.glob(path)
    elif fs.isdir(path):
        candidates = [p for p in fs.find(path) if not Path(p).name.startswith((".", "_"))]
    elif fs.exists(path):
        candidates = [path]
    else:
        raise BadSource(f"source '{uri}' does not exist")
    files = sorted(p for p in candidates if _format_of(p) is not None)
    if not files:
        raise BadSource(f"source '{uri}' holds no CSV or Parquet file (looked for {', '.join(FORMATS)})")
    return fs, files


def _format_of(path: str) -> str | None:
    name = path.lower()
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


def _batches(fs, path: str):
    """Record batches of one source file, raising BadSource with the file named on any read error."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fs.size(path) == 0:
        raise BadSource(f"source file '{path}' is empty (0 bytes)")
    try:
        with fs.open(path, "rb", compression="infer") as handle:
            if _format_of(path) == "parquet":
                yield from pq.ParquetFile(handle).iter_batches(batch_size=65536)
            else:
                yield from pacsv.open_csv(handle)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
        raise BadSource(f"cannot read '{path}' as {_format_of(path)}: {err}") from err


def _copy_file(fs, path: str, target: Path, schema: pa.Schema | None) -> tuple[int, pa.Schema, str]:
    """Stream one source file into one Parquet part; returns rows, schema and the source's sha256."""
    import pyarrow.parquet as pq

    rows, writer = 0, None
    try:
        for batch in _batches(fs, path):
            if schema is not None and not batch.schema.equals(schema):
                raise BadSource(f"source file '{path}' has schema {_schema_text(batch.schema)}, "
                                f"unlike the first file's {_schema_text(schema)}")
            schema = batch.schema
            writer = writer or pq.ParquetWriter(target, batch.schema)
            writer.write_batch(batch)
            rows += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise BadSource(f"source file '{path}' holds no data (no header, no rows)")
    return rows, schema, _sha256_remote(fs, path)


def _sha256_remote(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _schema_text(schema: pa.Schema) -> str:
    return "{" + ", ".join(f"{f.name}: {f.type}" for f in schema) + "}"


def ingest(source_uri: str, data_root: Path, stage_dir: Path) -> IngestManifest:
    """Copy the source into `stage_dir` as Parquet parts and describe what was written."""
    uri = resolve_uri(source_uri, data_root)
    fs, files = list_source_files(uri)
    schema, rows, source_digests = None, 0, []
    with atomic_dir(stage_dir) as tmp:
        for index, path in enumerate(files):
            part_rows, schema, digest = _copy_file(fs, path, tmp / f"part-{index:05d}.parquet", schema)
            rows += part_rows
            source_digests.append(digest)
            log.info("ingested %s: %d rows", path, part_rows)
    parts = sorted(Path(stage_dir).glob("part-*.parquet"))
    return IngestManifest(
        source_uri=uri,
        source_files=files,
        source_sha256=hashlib.sha256("".join(source_digests).encode()).hexdigest(),
        stage_dir=str(stage_dir),
        parts=[str(p) for p in parts],
        rows=rows,
        columns={f.name: str(f.type) for f in schema},
        sha256=sha256_files(parts),
        bytes=sum(p.stat().st_size for p in parts),
    )
