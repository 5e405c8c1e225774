"""Run-scoped paths, atomic writes and checksums.

Every output lives under `{data_root}/{pipeline}/{run_id}/{stage}/`. A stage writes into a temporary sibling and
renames it into place, so a reader sees either nothing or the whole output, a retry replaces only its own
stage, and a concurrent run of another run_id never touches it. Where the working area is an object store, the
same writes are committed there too, and reads fetch what this host lacks (`core.store`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton_tasks.core import store

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CHUNK = 1 << 20


def safe_name(run_id: str) -> str:
    """A folder name for an Airflow run_id (which holds ':' and '+')."""
    name = _UNSAFE.sub("-", run_id).strip("-.")
    if not name:
        raise ValueError(f"run_id {run_id!r} has no usable characters")
    return name


@dataclass(frozen=True)
class RunPaths:
    """The folders of one pipeline run."""

    root: Path  # {data_root}/{pipeline}/{run}

    @classmethod
    def of(cls, data_root: Path, pipeline: str, run_id: str) -> RunPaths:
        return cls(Path(data_root) / safe_name(pipeline) / safe_name(run_id))

    def stage(self, name: str) -> Path:
        return self.root / name

    @property
    def cluster(self) -> Path:
        """The run's local Dask cluster (its scheduler file and log): this host's, never on a store."""
        return self.root / store.HOST_LOCAL

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def approval(self) -> Path:
        """A person's decision on the run's candidate (its register manifest since), where one was asked for."""
        return self.root / "approval.json"


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        store.publish(tmp, final)
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(final)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; it is renamed onto `final` if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, final)
        if not store.in_attempt(final):  # a file of a stage folder is committed with its folder
            store.put(final)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, value: Any) -> Path:
    """Write JSON atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
    return Path(path)


def write_private(path: Path, text: str) -> Path:
    """Create `path` readable by its owner only (mode 600) and write `text`; refuses to replace an existing file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return Path(path)


def read_json(path: Path) -> Any:
    store.fetch(path, refresh=True)
    return json.loads(Path(path).read_text())


def read_json_if_exists(path: Path) -> Any | None:
    """`read_json`, or None where the file is not there (here, nor on the working area's store)."""
    return json.loads(Path(path).read_text()) if store.fetch(path, refresh=True) else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One checksum over several files, in the order given (names excluded, so a copy checks the same)."""
    return combined_sha256([sha256_file(path) for path in paths])


def combined_sha256(file_digests: list[str]) -> str:
    """`sha256_files` from the files' own digests, in the same order: files hashed where they were written (on
    the workers, in parallel) combine to the same checksum."""
    digest = hashlib.sha256()
    for file_digest in file_digests:
        digest.update(bytes.fromhex(file_digest))
    return digest.hexdigest()


def parquet_dictionary_columns(schema) -> list[str]:
    """The columns worth Parquet dictionary encoding: all but floating-point ones. Measured features hardly repeat,
    so pyarrow's default (every column) spends most of the write time building float dictionaries for a file
    that comes out larger (bench `shard`)."""
    import pyarrow as pa

    return [field.name for field in schema if not pa.types.is_floating(field.type)]


PARTITION_BYTES = 256 << 20  # decoded bytes a partition holds at most (Dask's read_parquet blocksize)


@dataclass(frozen=True)
class ParquetPartition:
    """Consecutive row groups of one Parquet file, read as one piece: `rows` rows from global row `start`, about
    `decoded_bytes` in memory."""

    path: str
    row_groups: tuple[int, ...]
    rows: int
    start: int
    decoded_bytes: int

    def read(self, columns: list[str] | None = None):
        """These rows as a pyarrow Table (only `columns`, in that order, where given)."""
        import pyarrow.parquet as pq

        store.fetch(Path(self.path))
        return pq.ParquetFile(self.path).read_row_groups(list(self.row_groups), columns=columns)


def parquet_partitions(parts: list[str], max_bytes: int = PARTITION_BYTES) -> list[ParquetPartition]:
    """The Parquet `parts` as partitions of whole row groups, at most `max_bytes` decoded each (one row group may
    be more), numbered with global row numbers in file order. Planned from the footers: no data read."""

    partitions, start = [], 0
    for part in parts:
        metadata = parquet_metadata(part)
        groups: list[int] = []
        rows = size = 0
        for index in range(metadata.num_row_groups):
            group = metadata.row_group(index)
            if groups and size + group.total_byte_size > max_bytes:
                partitions.append(ParquetPartition(str(part), tuple(groups), rows, start, size))
                start, groups, rows, size = start + rows, [], 0, 0
            groups.append(index)
            rows, size = rows + group.num_rows, size + group.total_byte_size
        if rows:
            partitions.append(ParquetPartition(str(part), tuple(groups), rows, start, size))
            start += rows
    return partitions


def parquet_metadata(part: str):
    """A Parquet file's footer: from the local file, or read in place on the working area's store (a few byte
    ranges) where this host does not hold it (the task plans partitions; the workers fetch the data)."""
    import pyarrow.parquet as pq

    if (url := store.remote(Path(part))) is not None:
        with store.open_remote(url) as handle:
            return pq.ParquetFile(handle).metadata
    return pq.ParquetFile(part).metadata


def decoded_bytes(parts: list[str]) -> int:
    """The uncompressed size of Parquet parts, from their footers (no data read): about what they take in memory."""
    return sum(partition.decoded_bytes for partition in parquet_partitions(parts))


def parquet_decoded_bytes(fs, path: str) -> int:
    """The uncompressed size of one Parquet file on any fsspec filesystem, from its footer (no data read)."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        metadata = pq.ParquetFile(handle).metadata
        return sum(metadata.row_group(index).total_byte_size for index in range(metadata.num_row_groups))
