"""What the workers of a run whose validation will be partitioned import as they start: Great Expectations and the
validate stage (Dask's worker preload, added by `cluster.start_run_cluster(..., validation=True)`).

GX's import is seconds of CPU per process. A run whose source is big enough for its validation to be partitioned
(`pipeline.start_cluster` decides from the source's size) has its workers pay it while ingest runs, beside which
the run's cluster starts, instead of inside the first partition of validate. It runs on a thread of its own, as
`worker_preload` does. Smaller runs validate in the task process and never need GX on a worker, so their workers do
not import it. Once validation is done the run's workers are restarted without it
(`cluster.restart_without_validation`).
"""

from __future__ import annotations

import os
import threading

from lepton_tasks.infra.cluster import VALIDATION_DONE_ENV

_done = threading.Event()


def dask_setup(worker) -> None:  # Dask calls this once the module is imported
    if os.environ.get(VALIDATION_DONE_ENV):  # restarted after the run's validation: no GX
        _done.set()
        return
    threading.Thread(target=_import, name="lepton-preload-validation", daemon=True).start()


def preloaded(timeout: float | None = None) -> bool:
    """Whether this worker's GX preload has finished (waiting up to `timeout` seconds for it)."""
    return _done.wait(timeout)


def _import() -> None:
    try:
        import great_expectations  # noqa: F401

        import lepton_tasks.stages.validate  # noqa: F401
    finally:
        _done.set()
