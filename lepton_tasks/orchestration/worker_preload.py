"""What every Lepton Dask worker imports as it starts (Dask's `distributed.worker.preload`, set in
`cluster.LEPTON_DASK_CONFIG`): torch and `torch._dynamo` (which building a torch optimizer imports the first
time), the libraries that read a shard and write a checkpoint (pandas, pyarrow's Parquet reader, safetensors),
and the train stage's own modules; where the working area is an object store, its client, with one call to it
(importing s3fs and botocore, finding the credentials and connecting take a second or two of a fresh worker).

Without it, each fresh worker paid those imports inside its first shard, on the train stage's clock. They run on
a thread of their own, so the worker joins its scheduler at once and the run's cluster is up as soon as before:
the imports overlap the stages before train (ingest, validate, drift, shard), and a task that needs a module
still being imported waits for that import only (Python's import lock).
"""

from __future__ import annotations

import threading

_done = threading.Event()


def dask_setup(worker) -> None:  # Dask calls this once the module is imported
    threading.Thread(target=_import, name="lepton-preload", daemon=True).start()


def preloaded(timeout: float | None = None) -> bool:
    """Whether this worker's preload has finished (waiting up to `timeout` seconds for it)."""
    return _done.wait(timeout)


def _import() -> None:
    from lepton_tasks.core import store

    try:
        with store.IMPORTS:  # a task's first store call waits for these (see store.IMPORTS)
            _import_all(store)
    finally:
        _done.set()


def _import_all(store) -> None:
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch

    import lepton_tasks.stages.train  # noqa: F401

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo now, not in the first shard
    if (area := store.work_area()).store is not None:
        _first_store_call(store, area)


def _first_store_call(store, area) -> None:
    try:
        store.filesystem(area).exists(area.store)
    except Exception as err:  # the store not answering yet: the first task waits for it, and says so
        import logging

        logging.getLogger(__name__).info("the working area's store did not answer the preload: %s", err)
