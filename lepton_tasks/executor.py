"""`PreloadingLocalExecutor`: Airflow's LocalExecutor, with the stage libraries imported before it forks, and a
scheduler loop that wakes when a task ends.

LocalExecutor forks its worker processes from the scheduler, and each worker forks one process per task. A
module imported in the scheduler before those forks is already imported in every task, so the stage libraries
(torch, MLflow, Great Expectations, Dask, pyarrow: 1-5 s each on two cores) cost their import once per scheduler
start instead of once per task: the same idea as gunicorn's `--preload`. The tasks, their isolation (one process
each) and their retries are LocalExecutor's.

The scheduler's loop sleeps `[scheduler] scheduler_idle_sleep_time` whenever it counts itself idle, and Airflow 3.3
counts the loop that takes in a task's end as idle too (its `process_executor_events` returns the events left after
taking out the tasks' ones), so the next task of a run waited out most of that second. Here the executor paces the
idle loop instead: a heartbeat that sent no new work waits up to IDLE_WAIT_S (Airflow's default idle sleep) for the
next result of a task process, and returns as soon as one comes. airflow.cfg then sets the scheduler's own sleep to
50 ms: an idle scheduler still loops about once a second, and a task's end reaches the next loop at once.

Set as `[core] executor` in airflow.cfg. LEPTON_PRELOAD_MODULES (comma-separated; empty for none) replaces
the list; a module that fails to import is logged and skipped (the task that needs it imports it, as without
preloading).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from multiprocessing.connection import wait

from airflow.executors.local_executor import LocalExecutor

log = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0  # Airflow's default scheduler_idle_sleep_time: an idle scheduler loops as often as with it
STAGE_LIBRARIES = ("pandas", "pyarrow.parquet", "torch", "onnxruntime", "mlflow", "great_expectations",
                   "distributed", "lepton_tasks.pipeline")


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
    """LocalExecutor whose forked workers (and so every task process) start with the stage libraries loaded, and
    whose idle heartbeat waits for a task's result rather than the scheduler sleeping a fixed time."""

    idle_wait_s: float = IDLE_WAIT_S
    _sent_work = False  # since the last sync: a heartbeat that sent work leaves the scheduler to loop again at once

    def start(self) -> None:
        if self.is_mp_using_fork:  # with spawn, nothing is inherited: preloading would only cost
            seconds = preload(preload_modules())
            log.info("preloaded for the task processes: %s (%.1f s)", seconds, sum(seconds.values()))
        super().start()

    def _process_workloads(self, workload_list) -> None:
        super()._process_workloads(workload_list)
        self._sent_work = self._sent_work or bool(workload_list)

    def sync(self) -> None:
        if not self._sent_work:
            # a task process's result (running, success, failure) ends the wait: the pipe becomes readable
            wait([self.result_queue._reader], timeout=self.idle_wait_s)
        self._sent_work = False
        super().sync()
