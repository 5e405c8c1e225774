"""Where a pipeline's data comes from: a CSV, Parquet or JSON-lines file, folder or glob (local path or any fsspec
URI), one day of a date-templated source or a window of them; listed and read batch by batch, errors naming the file.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from lepton_tasks.core.errors import BadSource
from lepton_tasks.core.store import store_error, work_area
from lepton_tasks.data.windows import DaySource

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".csv.gz": "csv", ".jsonl": "jsonl",
           ".ndjson": "jsonl", ".jsonl.gz": "jsonl", ".json": "jsonl"}


def resolve_uri(source_uri: str, data_root: Path) -> str:
    """A relative local path is read under the data root (and may not leave it); URIs with a scheme and
    absolute paths are taken as given, since whoever sets them chose the location on purpose."""
    if "://" in source_uri or Path(source_uri).is_absolute():
        return source_uri
    root = Path(data_root).resolve()
    resolved = (root / source_uri).resolve()
    if not resolved.is_relative_to(root):
        raise BadSource(f"param 'source_uri' ('{source_uri}') resolves to {resolved}, outside the data root {root}")
    area = work_area()
    if area.store is not None and root == area.local:  # the working area is a store: read it there, on any host
        return area.url(resolved.relative_to(root).as_posix())
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
    except Exception as err:
        raised = _source_error(uri, err, f"cannot list source '{uri}': {type(err).__name__}: {err}")
        if raised is err:
            raise
        raise raised from None
    files = sorted(p for p in candidates if _format_of(p) is not None and fmt in (None, _format_of(p)))
    if not files:
        wanted = ", ".join(ext for ext, f in FORMATS.items() if fmt in (None, f))
        raise BadSource(f"source '{uri}' holds no {fmt or 'CSV, Parquet or JSON-lines'} file (looked for {wanted})")
    return fs, files


def _source_error(url: str, err: Exception, unreadable: str) -> Exception:
    """What to raise for `err`, met listing or reading the source at `url`: the store's error where a store is at
    fault, BadSource(`unreadable`) where the source is (a symlink loop, a local permission error, a corrupt file),
    else `err` itself (a BadSource already, or a bug)."""
    if (mapped := store_error(url, err)) is not None:
        return mapped
    if isinstance(err, (OSError, RecursionError, EOFError, UnicodeDecodeError, pa.ArrowException)):
        return BadSource(unreadable)
    return err


def _format_of(path: str) -> str | None:
    name = path.lower()
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


def read_batches(fs, path: str):
    """Record batches of one source file, raising BadSource with the file named on any read error."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    try:
        if fs.size(path) == 0:
            raise BadSource(f"source file '{path}' is empty (0 bytes)")
        with fs.open(path, "rb", compression="infer") as handle:
            if _format_of(path) == "parquet":
                yield from pq.ParquetFile(handle).iter_batches(batch_size=65536)
            elif _format_of(path) == "jsonl":
                yield from pajson.open_json(handle)
            else:
                # an empty CSV field is a missing value, for text columns too
                yield from pacsv.open_csv(handle, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except Exception as err:  # a remote store's client raises its own error classes, not only OSError
        raised = _source_error(_url(fs, path), err, f"cannot read '{path}' as {_format_of(path)}: {err}")
        if raised is err:
            raise
        raise raised from err


def _url(fs, path: str) -> str:
    """`path` (as a filesystem lists it: no scheme) with its filesystem's scheme."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


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


def missing(sources: list[DaySource], data_root: Path, fmt: str | None = None) -> list[DaySource]:
    """The days whose URI holds no data file yet. An untemplated source is never waited for: ingest says exactly
    what is wrong with it (missing, empty, unreadable)."""
    return list(list_days([s for s in sources if s.day is not None], data_root, fmt)[1])
