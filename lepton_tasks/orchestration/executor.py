"""`PreloadingLocalExecutor`: Airflow's LocalExecutor, with the stage libraries imported and the pipeline DAGs
built before it forks, and a scheduler loop that wakes when a task ends.

LocalExecutor forks its worker processes from the scheduler, and each worker forks one process per task. A
module imported in the scheduler before those forks is already imported in every task, so the stage libraries
(torch, MLflow, Great Expectations, Dask, pyarrow: 1-5 s each on two cores) cost their import once per scheduler
start instead of once per task: the same idea as gunicorn's `--preload`. The pipeline DAGs are built there too
(`prebuilt.py`), so a task's parse of its DAG file takes 10 ms rather than 65. The tasks, their isolation (one
process each) and their retries are LocalExecutor's.

The scheduler's loop sleeps `[scheduler] scheduler_idle_sleep_time` whenever it counts itself idle, and Airflow 3.3
counts the loop that takes in a task's end as idle too (its `process_executor_events` returns the events left after
taking out the tasks' ones), so the next task of a run waited out most of that second. Here the executor paces the
idle loop instead: a heartbeat that sent no new work waits up to IDLE_WAIT_S (Airflow's default idle sleep) for a
task to end, and returns as soon as one does. airflow.cfg then sets the scheduler's own sleep to 5 ms: an idle
scheduler still loops about once a second, and a task's end reaches the next loop at once.

A task's end is told twice. The task process itself, once its state is committed, writes a byte to a pipe made
here before the forks (`TaskEndListener`, an Airflow listener the Lepton plugin registers). The worker's result
follows when the task's supervisor has reaped the process: usually at once, but a heartbeat interval later
(`[workers] min_heartbeat_interval`) when the supervisor sees the process's sockets close before it can reap it,
which happens often enough to cost a pipeline run seconds (bench `orchestration_overhead`).

What it uses of Airflow's private API is in `airflow_internals.py`, with the fallback to the stock LocalExecutor.

Set as `[core] executor` in airflow.cfg. LEPTON_PRELOAD_MODULES (comma-separated; empty for none) replaces
the list; a module that fails to import is logged and skipped (the task that needs it imports it, as without
preloading).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
from multiprocessing.connection import wait
from pathlib import Path

from airflow.configuration import conf
from airflow.executors.local_executor import LocalExecutor
from airflow.listeners import hookimpl

from lepton_tasks.orchestration.airflow_internals import WorkSentHook, result_queue_reader
from lepton_tasks.orchestration.prebuilt import prebuild

log = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0  # Airflow's default scheduler_idle_sleep_time: an idle scheduler loops as often as with it
# the libraries the stages use, and the stage modules themselves (`pipeline` imports each inside its task)
STAGE_LIBRARIES = ("pandas", "pyarrow.parquet", "torch", "onnxruntime", "mlflow", "great_expectations", "distributed",
                   "torch._dynamo", "onnxscript",  # what compress's ONNX export imports: 1.5-2 s of each compress task
                   "lepton_tasks.orchestration.pipeline", "lepton_tasks.infra.cluster", "lepton_tasks.ml.champion",
                   *(f"lepton_tasks.stages.{stage}" for stage in ("ingest", "validate", "drift", "shard", "train",
                                                                  "merge", "compress", "register")))
PREBUILT_DAG_FILES = ("lepton_pipelines.py",)  # in [core] dags_folder: the pipeline DAGs (see prebuilt.py)


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


def prepare_task_processes() -> None:
    """In a process that forks the task processes (this executor; a Celery worker, `celery_config`): the stage
    libraries imported and the pipeline DAGs built, once, for every task forked after."""
    seconds = preload(preload_modules())
    log.info("preloaded for the task processes: %s (%.1f s)", seconds, sum(seconds.values()))
    dags_folder = Path(conf.get("core", "dags_folder"))
    built = prebuild([dags_folder / name for name in PREBUILT_DAG_FILES if (dags_folder / name).is_file()])
    log.info("prebuilt for the task processes: %s", built)


_task_end_pipe: tuple[int, int] | None = None  # (read, write): made by the executor before its forks


def _open_task_end_pipe() -> int:
    """A non-blocking pipe that every task process forked from here inherits; its read end."""
    global _task_end_pipe
    if _task_end_pipe is None:
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        _task_end_pipe = (read_end, write_end)
    return _task_end_pipe[0]


def _drain(read_end: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(read_end, 4096):
            pass


class TaskEndListener:
    """Run in each task process as it finishes (after its state is committed): wakes the scheduler that forked
    it. Nothing in any other process (no pipe there), and never an error: a full pipe means the scheduler is
    awake already."""

    @staticmethod
    def _tell() -> None:
        if _task_end_pipe is not None:
            with contextlib.suppress(OSError):
                os.write(_task_end_pipe[1], b"\0")

    @hookimpl
    def on_task_instance_success(self, previous_state, task_instance) -> None:
        self._tell()

    @hookimpl
    def on_task_instance_failed(self, previous_state, task_instance, error) -> None:
        self._tell()

    @hookimpl
    def on_task_instance_skipped(self, previous_state, task_instance) -> None:
        self._tell()


class PreloadingLocalExecutor(WorkSentHook, LocalExecutor):
    """LocalExecutor whose forked workers (and so every task process) start with the stage libraries loaded and the
    pipeline DAGs built, and whose idle heartbeat waits for a task to end rather than the scheduler sleeping a fixed
    time."""

    idle_wait_s: float = IDLE_WAIT_S
    _sent_work = False  # since the last sync: a heartbeat that sent work leaves the scheduler to loop again at once
    _task_ends: int | None = None  # the read end of the pipe the task processes write to as they finish

    def start(self) -> None:
        if self.is_mp_using_fork:  # with spawn, nothing is inherited: preloading would only cost
            prepare_task_processes()
            self._task_ends = _open_task_end_pipe()
        super().start()

    def on_work_sent(self, workload_list) -> None:
        self._sent_work = self._sent_work or bool(workload_list)

    def sync(self) -> None:
        if not self._sent_work:
            # a task process finishing, or a worker's result (running, success, failure), ends the wait
            waited_on = [result_queue_reader(self)] + ([self._task_ends] if self._task_ends is not None else [])
            if self._task_ends in wait(waited_on, timeout=self.idle_wait_s):
                _drain(self._task_ends)
        self._sent_work = False
        super().sync()
