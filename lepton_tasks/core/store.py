"""The working area on an object store (`LEPTON_DATA_ROOT=s3://bucket/prefix`, or any fsspec URL).

Stages keep reading and writing plain local paths, under this host's copy of the working area (`LEPTON_SCRATCH`,
the same path on every host); this module moves what they write to the store and fetches what they read from it,
so that a host (an Airflow worker, a Dask worker) needs nothing but the store and the standard credentials
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ... or the machine's role) to go on where another left off.

Commit without rename. A store has no atomic folder rename, so a stage folder (`storage.atomic_dir`) is uploaded
under `{stage}/attempt-{id}/` and then `{stage}/_COMMITTED.json` (the attempt, its files and their sizes) is
written last: the one object readers trust. An attempt that died half-way has no commit naming it and is never
read; a later commit removes it. A single file (a checkpoint, a summary, the report) is one PUT, which a store
makes visible whole or not at all, so it is written in place (a retry resuming from checkpoints finds them).

Locally (a plain path, or `file://`) every function here does nothing: the working area is the local folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lepton_tasks.core.errors import LeptonError, StoreAccessDenied, StoreUnavailable

STORE_ERRORS = (StoreUnavailable, StoreAccessDenied)  # the store failed (not what was asked of it)

log = logging.getLogger(__name__)
T = TypeVar("T")

DATA_ROOT_ENV = "LEPTON_DATA_ROOT"  # a local folder, or the store's URL
SCRATCH_ENV = "LEPTON_SCRATCH"  # this host's copy of a store working area
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_ROOT = REPO_ROOT / "var" / "data"
DEFAULT_SCRATCH = REPO_ROOT / "var" / "scratch"
COMMIT = "_COMMITTED.json"  # the store's record of a stage's committed attempt
LOCAL_COMMIT = ".committed.json"  # the same record in this host's copy, once every file of it is here
_ATTEMPT = re.compile(r"^\.(?P<stage>.+)\.tmp-(?P<attempt>[0-9a-f]+)$")  # storage.atomic_dir's temporary folder
RUN_DEPTH = 3  # pipeline / run / stage: the folder a commit covers
HOST_LOCAL = "cluster"  # a run's folder of this host's own processes (its local Dask cluster): never on the store

# where each store's client reads its credentials (the environment, or the machine's role when they are unset)
CREDENTIAL_SETTINGS = {"s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the instance role)",
                       "gs": "GOOGLE_APPLICATION_CREDENTIALS (or the instance's service account)",
                       "abfs": "AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY (or a managed identity)"}
PATIENCE_ENV = "LEPTON_STORE_PATIENCE_S"  # how long an operation waits for a store that does not answer
DEFAULT_PATIENCE_S = 60.0
RETRY_EVERY_S = 3.0
# a store that does not answer fails fast (LEPTON_STORE_PATIENCE_S waits for it) rather than after botocore's
# minutes; checksums only where S3 requires them, as botocore did before 1.36 (sizes and our own sha256 check what
# we read): computed on every byte they cost more than the transfer itself (bench object_store: downloads at 1.8x)
S3_CLIENT = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"},
             "request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}


@dataclass(frozen=True)
class WorkArea:
    """Where run folders live: `local` (this host's folder) and, for an object store, its URL."""

    local: Path
    store: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkArea:
        env = (os.environ if environ is None else environ).get
        return _work_area(env(DATA_ROOT_ENV, str(DEFAULT_DATA_ROOT)), env(SCRATCH_ENV, str(DEFAULT_SCRATCH)))

    def key(self, path: Path) -> str | None:
        """The store key of a local path (a temporary stage folder maps to its attempt), None where `path` is
        outside the working area or there is no store."""
        if self.store is None:
            return None
        try:
            parts = Path(path).resolve().relative_to(self.local).parts
        except ValueError:
            return None
        if len(parts) >= RUN_DEPTH and parts[RUN_DEPTH - 1] == HOST_LOCAL:
            return None
        mapped = []
        for part in parts:
            match = _ATTEMPT.match(part)
            mapped += [match["stage"], f"attempt-{match['attempt']}"] if match else [part]
        return "/".join(mapped)

    def url(self, key: str) -> str:
        return f"{self.store}/{key}"


def _work_area(data_root: str, scratch: str) -> WorkArea:
    if data_root.startswith("file://"):
        data_root = data_root.removeprefix("file://")
    if "://" not in data_root:
        return WorkArea(Path(data_root).resolve())
    return WorkArea(Path(scratch).resolve(), data_root.rstrip("/"))


_THIS_HOST_ONLY: ContextVar[bool] = ContextVar("this_host_only", default=False)


def work_area() -> WorkArea:
    """The working area as configured; inside `this_host_only`, this host's copy of it alone."""
    area = WorkArea.from_env()
    return WorkArea(area.local) if _THIS_HOST_ONLY.get() else area


@contextmanager
def this_host_only() -> Iterator[None]:
    """Read and write this host's copy only, the store left alone: where the store is what failed, what is said
    about it (a failed stage's summary, the run's report) is kept here rather than waiting on the store again."""
    token = _THIS_HOST_ONLY.set(True)
    try:
        yield
    finally:
        _THIS_HOST_ONLY.reset(token)


# held while a thread imports what builds ASTs (s3fs, through anyio's lazy importer; a Dask worker's preload of
# torch): CPython 3.11 fails ("AST constructor recursion depth mismatch") when two threads build ASTs at once, as
# a worker's preload thread and its first task's store call did in CI
IMPORTS = threading.RLock()


def filesystem(area: WorkArea):
    """The store's fsspec filesystem (fsspec keeps one instance per arguments), listings never cached: another
    host may have written since. Made under `IMPORTS`: its first call imports s3fs."""
    import fsspec

    protocol = area.store.split("://", 1)[0]
    extra = {"config_kwargs": S3_CLIENT} if protocol in ("s3", "s3a") else {}
    with IMPORTS:
        return fsspec.filesystem(protocol, use_listings_cache=False, **extra)


def in_attempt(path: Path) -> bool:
    """Whether `path` lies in a stage's temporary folder (uploaded when the stage commits, not before)."""
    return any(_ATTEMPT.match(part) for part in Path(path).parts)


# --- writing ---------------------------------------------------------------------------------------------------


def put(*paths: Path) -> None:
    """Upload finished local files to their keys, several at once (each object appears whole or not at all)."""
    area = work_area()
    keyed = [(str(path), area.key(path)) for path in paths]
    keyed = [(local, key) for local, key in keyed if key is not None]
    if keyed:
        _patiently(area, keyed[0][1], lambda: filesystem(area).put(
            [local for local, _ in keyed], [area.url(key) for _, key in keyed]))


def publish(tmp: Path, final: Path) -> None:
    """Commit a stage folder written in `tmp` (storage.atomic_dir's) as `final`: its files under the attempt's
    prefix (those that Dask workers uploaded already are kept), then the commit record, last; then older attempts
    are removed. Called before the local rename, so a failed upload leaves nothing committed here or there."""
    area = work_area()
    if (key := area.key(final)) is None:
        return
    attempt = _ATTEMPT.match(Path(tmp).name)["attempt"]
    prefix, fs = f"{key}/attempt-{attempt}", filesystem(area)

    def upload() -> dict:
        uploaded = _listing(fs, area.url(prefix))  # by Dask workers, or by an upload that was cut short
        files, pending = {}, []
        for local in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            rel = local.relative_to(tmp).as_posix()
            files[rel] = local.stat().st_size
            if uploaded.get(rel) != files[rel]:
                pending.append((str(local), area.url(f"{prefix}/{rel}")))
        if pending:  # concurrently (fsspec batches them)
            fs.put([local for local, _ in pending], [url for _, url in pending])
        record = {"attempt": attempt, "files": dict(sorted({**uploaded, **files}.items()))}
        fs.pipe_file(area.url(f"{key}/{COMMIT}"), json.dumps(record, sort_keys=True).encode())
        return record

    record = _patiently(area, key, upload)
    files = record["files"]
    _remove_other_attempts(fs, area, key, attempt)
    if all((Path(tmp) / rel).is_file() for rel in files):
        (Path(tmp) / LOCAL_COMMIT).write_text(json.dumps(record, sort_keys=True))


def _listing(fs, url: str) -> dict[str, int]:
    """Files under `url` (relative names) and their sizes; {} when there are none."""
    base = url.split("://", 1)[1].rstrip("/")
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    return {name[len(base) + 1:]: int(info["size"]) for name, info in found.items() if info["type"] == "file"}


def _remove_other_attempts(fs, area: WorkArea, key: str, attempt: str) -> None:
    try:
        stale = [p for p in fs.ls(area.url(key).split("://", 1)[1], detail=False)
                 if p.rsplit("/", 1)[-1].startswith("attempt-") and not p.endswith(f"attempt-{attempt}")]
        if stale:
            fs.rm(stale, recursive=True)
    except Exception as err:  # never read anyway (no commit names them): a later commit tries again
        log.info("older attempts of %s stay for now: %s", key, err)


# --- reading ---------------------------------------------------------------------------------------------------


def committed(stage_dir: Path) -> dict | None:
    """The store's commit record of a stage folder, None when it has none (not committed, or not a stage)."""
    area = work_area()
    if (key := area.key(stage_dir)) is None:
        return None
    def read() -> dict | None:
        try:
            return json.loads(filesystem(area).cat_file(area.url(f"{key}/{COMMIT}")))
        except FileNotFoundError:
            return None

    return _patiently(area, key, read)


def fetch(path: Path, refresh: bool = False) -> bool:
    """Make sure this host holds `path`: a file of a committed stage is downloaded from that attempt unless the
    local copy has its size; any other file (a checkpoint, a summary) unless it is here already (`refresh`: read
    the store's copy anyway, for files that change, such as the report). False where neither has it."""
    area, path = work_area(), Path(path)
    if (key := area.key(path)) is None or in_attempt(path):
        return path.exists()
    found, committed_size = _object(area, key)
    if found is None:
        return False
    if path.is_file() and (path.stat().st_size == committed_size if committed_size is not None else not refresh):
        return True
    return _download(area, [(found, path)])


def remote(path: Path) -> str | None:
    """The store URL of a file this host does not hold (its committed attempt's, for a stage's file), to read a
    part of it in place (a Parquet footer); None where the local file is there to read, or there is no store."""
    area, path = work_area(), Path(path)
    if path.exists() or (key := area.key(path)) is None or in_attempt(path):
        return None
    found, _ = _object(area, key)
    return area.url(found) if found is not None else None


def _object(area: WorkArea, key: str) -> tuple[str | None, int | None]:
    """Where the file of store key `key` is read: in its stage's committed attempt, with the committed size (None
    where the commit does not list it), or at `key` itself, size unknown, for a file outside a committed stage."""
    parts = Path(key).parts
    stage_dir = area.local.joinpath(*parts[:RUN_DEPTH])
    record = committed(stage_dir) if len(parts) > RUN_DEPTH else None
    if record is None:
        return key, None
    rel = "/".join(parts[RUN_DEPTH:])
    if rel not in record["files"]:
        return None, None
    return _attempt_key(stage_dir, record, rel, area), record["files"][rel]


def _attempt_key(stage_dir: Path, record: dict, rel: str, area: WorkArea) -> str:
    return f"{area.key(stage_dir)}/attempt-{record['attempt']}/{rel}"


def open_remote(url: str):
    """A seekable file on the store (reads fetch byte ranges)."""
    area = work_area()
    return _patiently(area, url.removeprefix(f"{area.store}/"), lambda: filesystem(area).open(url, "rb"))


def checkout(stage_dir: Path) -> None:
    """This host's copy of a whole stage folder: its committed attempt, or (train's checkpoints, written file by
    file) every object under it."""
    area, stage_dir = work_area(), Path(stage_dir)
    if (key := area.key(stage_dir)) is None:
        return
    record = committed(stage_dir)
    marker = stage_dir / LOCAL_COMMIT
    if record is not None:
        if marker.is_file() and json.loads(marker.read_text()) == record:
            return
        wanted = [rel for rel, size in record["files"].items()
                  if not ((stage_dir / rel).is_file() and (stage_dir / rel).stat().st_size == size)]
        _download(area, [(_attempt_key(stage_dir, record, rel, area), stage_dir / rel) for rel in wanted])
        marker.write_text(json.dumps(record, sort_keys=True))
        return
    found = _patiently(area, key, lambda: _listing(filesystem(area), area.url(key)))
    _download(area, [(f"{key}/{rel}", stage_dir / rel) for rel, size in found.items()
                     if not ((stage_dir / rel).is_file() and (stage_dir / rel).stat().st_size == size)])


def _download(area: WorkArea, objects: list[tuple[str, Path]]) -> bool:
    """Copy objects (key, local path) here, several at once, each to a temporary name and then renamed: a reader
    never sees half a file. False if one is absent."""
    if not objects:
        return True
    temporary = []
    for _, path in objects:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.append(path.with_name(f".{path.name}.dl-{uuid.uuid4().hex[:8]}"))
    try:
        _patiently(area, objects[0][0], lambda: filesystem(area).get(
            [area.url(key) for key, _ in objects], [str(tmp) for tmp in temporary]))
        for tmp, (_, path) in zip(temporary, objects, strict=True):
            os.replace(tmp, path)
        return True
    except FileNotFoundError:
        return False
    finally:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)


# --- errors ------------------------------------------------------------------------------------------------------


def _patiently(area: WorkArea, key: str, call: Callable[[], T]) -> T:
    """`call`, tried again while the store does not answer, for LEPTON_STORE_PATIENCE_S (a store restarting, a
    link down for a while); then StoreUnavailable, which Airflow's retry takes up. Refused credentials fail at
    once."""
    deadline = time.monotonic() + float(os.environ.get(PATIENCE_ENV, DEFAULT_PATIENCE_S))
    while True:
        try:
            with _store_errors(area, key):
                return call()
        except StoreUnavailable as err:
            if time.monotonic() >= deadline:
                raise
            log.warning("%s; trying again in %.0f s", err, RETRY_EVERY_S)
            time.sleep(RETRY_EVERY_S)


class _store_errors:  # noqa: N801 (used as a context manager, like contextlib's)
    """Raise a store's own failure as StoreUnavailable (retryable) or StoreAccessDenied, naming the store."""

    def __init__(self, area: WorkArea, key: str) -> None:
        self.url = area.url(key)

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or isinstance(err, (FileNotFoundError, LeptonError)):
            return False
        mapped = store_error(self.url, err)
        if mapped is not None:
            raise mapped from err
        return False


def _causes(err: BaseException | None):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def store_error(uri: str, err: BaseException) -> LeptonError | None:
    """What a remote filesystem's error means for `uri`: the store unreachable (retryable, naming the store) or
    refusing the credentials (naming the setting that holds them), else None. Local paths are never a store."""
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if scheme in ("file", "local"):
        return None
    store = f"{scheme}://{uri.split('://', 1)[1].split('/', 1)[0]}"
    endpoint = os.environ.get("AWS_ENDPOINT_URL") if scheme in ("s3", "s3a") else None
    where = f"the store {store}" + (f" at {endpoint}" if endpoint else "")
    for cause in _causes(err):
        if isinstance(cause, PermissionError) or type(cause).__name__ == "NoCredentialsError":
            setting = CREDENTIAL_SETTINGS.get(scheme.rstrip("a"), "the store's credential settings")
            return StoreAccessDenied(f"{where} refused access to '{uri}' ({type(cause).__name__}: "
                                     f"{str(cause)[:200]}): check {setting}")
        if isinstance(cause, (ConnectionError, TimeoutError)) or "Connect" in type(cause).__name__:
            return StoreUnavailable(f"{where} did not answer for '{uri}' ({type(cause).__name__}: "
                                    f"{str(cause)[:200]}); Airflow's retry tries again")
    return None
