"""`PreloadingLocalExecutor`: Airflow's LocalExecutor, with the stage libraries imported before it forks.

LocalExecutor forks its worker processes from the scheduler, and each worker forks one process per task. A
module imported in the scheduler before those forks is already imported in every task, so the stage libraries
(torch, MLflow, Great Expectations, Dask, pyarrow: 1-5 s each on two cores) cost their import once per scheduler
start instead of once per task: the same idea as gunicorn's `--preload`. Nothing else changes: the tasks, their
isolation (one process each) and their retries are LocalExecutor's.

Set as `[core] executor` in airflow.cfg. LEPTON_PRELOAD_MODULES (comma-separated; empty for none) replaces
the list; a module that fails to import is logged and skipped (the task that needs it imports it, as without
preloading).
"""

from __future__ import annotations

import importlib
import logging
import os
import time

from airflow.executors.local_executor import LocalExecutor

log = logging.getLogger(__name__)

STAGE_LIBRARIES = ("pandas", "pyarrow.parquet", "torch", "onnxruntime", "mlflow", "great_expectations",
                   "distributed", "dask.dataframe", "lepton_tasks.pipeline")


def preload_modules() -> tuple[str, ...]:
    listed = os.environ.get("LEPTON_PRELOAD_MODULES")
    if listed is None:
        return STAGE_LIBRARIES
    return tuple(name.strip() for name in listed.split(",") if name.strip())


def preload(modules: tuple[str, ...]) -> dict[str, float]:
    """Import `modules`; seconds each took (failed ones are logged and left out)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # as in the tasks: no network
    seconds = {}
    for name in modules:
        started = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception as err:  # a missing optional library must not stop the scheduler
            log.warning("could not preload %s (%s); tasks will import it themselves", name, err)
            continue
        seconds[name] = round(time.perf_counter() - started, 2)
    return seconds


class PreloadingLocalExecutor(LocalExecutor):
    """LocalExecutor whose forked workers (and so every task process) start with the stage libraries loaded."""

    def start(self) -> None:
        if self.is_mp_using_fork:  # with spawn, nothing is inherited: preloading would only cost
            seconds = preload(preload_modules())
            log.info("preloaded for the task processes: %s (%.1f s)", seconds, sum(seconds.values()))
        super().start()
